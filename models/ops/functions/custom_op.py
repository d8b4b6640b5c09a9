"""The compiled multi-scale deformable attention as registered torch.library ops (namespace `hdetr`).

hdetr::ms_deform_attn and its gradient hdetr::ms_deform_attn_backward, each with a CPU and a CUDA kernel (the
compiled extensions, loaded on first use), a fake kernel (shapes and dtypes only: FakeTensorMode, torch.compile,
torch.export) and the autograd formula that calls the backward op, so that both trace. The dtypes the kernels
take (weights_dtype): CUDA one floating dtype for value, sampling_locations and attention_weights (float16 and
bfloat16 accumulated in float32); CPU value in float32, float64, bfloat16 or float16, with sampling_locations and
attention_weights in its opmath dtype (float32 for the reduced ones, in which the CPU kernel sums). The output and
grad_value come in value's dtype. ms_deform_attn_func.ms_deform_attn casts to these and chooses between these ops
and the PyTorch path.
"""
import torch
from torch import Tensor

from . import extension

NAMESPACE = "hdetr"


def weights_dtype(value):
    """The dtype of sampling_locations and attention_weights that the kernel of value's device takes with value:
    value's own on CUDA; on the CPU value's opmath dtype (float32 for bfloat16 / float16, in which it sums)."""
    if value.device.type == "cpu" and value.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return value.dtype


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The shape and dtype rules of the kernels (ms_deform_attn_checks.h), for the fake kernels' errors."""
    torch._check(value.dim() == 4, lambda: f"value must be [N, S, M, D], got {tuple(value.shape)}")
    torch._check(sampling_locations.dim() == 6 and sampling_locations.shape[5] == 2,
                 lambda: f"sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}")
    n, _, heads, _ = value.shape
    torch._check(sampling_locations.shape[0] == n and sampling_locations.shape[2] == heads,
                 lambda: f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"{tuple(value.shape)}")
    torch._check(attention_weights.shape == sampling_locations.shape[:5],
                 lambda: f"attention_weights must be {tuple(sampling_locations.shape[:5])}, got "
                         f"{tuple(attention_weights.shape)}")
    levels = sampling_locations.shape[3]
    torch._check(spatial_shapes.shape == (levels, 2) and level_start_index.shape == (levels,),
                 lambda: f"spatial_shapes must be [{levels}, 2] and level_start_index [{levels}], got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    expected = weights_dtype(value)
    torch._check(sampling_locations.dtype == expected and attention_weights.dtype == expected,
                 lambda: f"value, sampling_locations and attention_weights must share one dtype (where the kernel "
                         f"sums a bfloat16 / float16 value in float32, float32 ones), expected {expected} ones for a "
                         f"{value.dtype} value on {value.device.type}, got {sampling_locations.dtype} and "
                         f"{attention_weights.dtype}")


def _kernels(device):
    """The compiled extension module for `device`; a clear error when it is not available."""
    module = extension.compiled_extension(device)
    if module is None:
        raise RuntimeError(f"{NAMESPACE}::ms_deform_attn: the compiled op for {device.type} is not available "
                           "(call models.ops.functions.ms_deform_attn, which then takes the PyTorch path)")
    return module


@torch.library.custom_op(f"{NAMESPACE}::ms_deform_attn", mutates_args=(), device_types=("cpu", "cuda"))
def ms_deform_attn_compiled(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                            sampling_locations: Tensor, attention_weights: Tensor, im2col_step: int) -> Tensor:
    """value [N, S, M, D], spatial_shapes [L, 2] (H_l, W_l) int64, level_start_index [L] int64,
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]."""
    return _kernels(value.device).ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                         sampling_locations, attention_weights, im2col_step)


@ms_deform_attn_compiled.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, heads, channels = value.shape
    return value.new_empty(n, sampling_locations.shape[1], heads * channels)


@torch.library.custom_op(f"{NAMESPACE}::ms_deform_attn_backward", mutates_args=(), device_types=("cpu", "cuda"))
def ms_deform_attn_compiled_backward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                     sampling_locations: Tensor, attention_weights: Tensor, grad_output: Tensor,
                                     im2col_step: int) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output [N, Lq, M * D] -> (grad_value, grad_sampling_locations, grad_attention_weights), shaped and
    typed like the inputs."""
    grads = _kernels(value.device).ms_deform_attn_backward(value, spatial_shapes, level_start_index,
                                                            sampling_locations, attention_weights, grad_output,
                                                            im2col_step)
    return tuple(grads)


@ms_deform_attn_compiled_backward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output, im2col_step):
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.im2col_step = im2col_step


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_compiled_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous(),
        ctx.im2col_step)
    return grad_value, None, None, grad_locations, grad_weights, None


ms_deform_attn_compiled.register_autograd(_backward, setup_context=_setup_context)
