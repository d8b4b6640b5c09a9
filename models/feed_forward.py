"""The feed-forward block of the transformer layers, linear2(dropout(activation(linear1(x)))); for ReLU without
active dropout it is computed with the ReLU and its gradient in place (the same function, fewer fresh buffers;
equal in float64 to autograd's Linear / ReLU / Linear: tests/test_equivalence.py)."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from util.amp import REDUCED_DTYPES
from util.tracing import is_exporting

_AUTOCAST_CASTS = (torch.float32, *REDUCED_DTYPES)  # the dtypes autocast casts for a linear layer


class _ReluFeedForward(torch.autograd.Function):
    """linear2(relu(linear1(x))) on x [T, C], with the ReLU applied in place to linear1's output and its gradient
    masked in place: the same operations as autograd's Linear / ReLU / Linear nodes, without a second buffer
    of the hidden size [T, F] in the forward and in the backward (on the CPU, glibc maps a buffer over 32 MB
    afresh for every allocation, and each of its pages is faulted in)."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        hidden = torch.addmm(bias1, x, weight1.t()).relu_()  # [T, F]
        ctx.save_for_backward(x, weight1, weight2, hidden)
        return torch.addmm(bias2, hidden, weight2.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight1, weight2, hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need_w2:
            grad_w2 = grad_out.t().mm(hidden)
        if need_b2:
            grad_b2 = grad_out.sum(0)
        if need_x or need_w1 or need_b1:
            grad_hidden = grad_out.mm(weight2)  # [T, F]
            # ReLU's backward (zero where the output is not positive), written into grad_hidden itself
            torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0, grad_input=grad_hidden)
            if need_x:
                grad_x = grad_hidden.mm(weight1)
            if need_w1:
                grad_w1 = grad_hidden.t().mm(x)
            if need_b1:
                grad_b1 = grad_hidden.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _in_place_relu_applies(linear1, linear2, activation, dropout, x):
    """Whether _ReluFeedForward computes the block: ReLU, no active dropout (dropout is another function), both
    biases; under autocast only for the dtypes it casts (float64 stays float64 there); not under torch.export (an
    exported graph has no backward, where the Function saves its memory, and records autograd's Linear / ReLU /
    Linear instead)."""
    autocast_casts_all = not torch.is_autocast_enabled(x.device.type) or all(
        t.dtype in _AUTOCAST_CASTS for t in (x, linear1.weight, linear2.weight))
    return (activation is F.relu and not (dropout.training and dropout.p > 0)
            and linear1.bias is not None and linear2.bias is not None and autocast_casts_all
            and not is_exporting())


def feed_forward(linear1: nn.Linear, linear2: nn.Linear, activation, dropout: nn.Dropout, x):
    """linear2(dropout(activation(linear1(x)))) for x [..., C]; with ReLU and no active dropout (upstream's
    --dropout 0, or evaluation) the same function computed in place where autograd allows.

    Under autocast the in-place Function gets what autocast's linear layers would compute with: x and the
    parameters cast to autocast's dtype (the casts recorded by autograd, so the parameters' gradients come back
    in float32), the products in that dtype."""
    if not _in_place_relu_applies(linear1, linear2, activation, dropout, x):
        return linear2(dropout(activation(linear1(x))))
    if not torch.is_grad_enabled():
        return linear2(F.relu(linear1(x), inplace=True))
    tensors = (x, linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    dtype = None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        tensors = tuple(t.to(dtype) for t in tensors)
    x_2d = tensors[0].reshape(-1, x.shape[-1])  # [T, C] for x [..., C]
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        out = _ReluFeedForward.apply(x_2d, *tensors[1:])
    return out.view(*x.shape[:-1], out.shape[-1])
