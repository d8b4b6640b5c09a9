"""Fake CUDA for the tests, without a GPU: the model's tensors as FakeTensors on device "cuda" (shapes, dtypes and
devices only; every operator runs its fake/meta kernel), CUDA autocast allowed, the compiled CUDA op stood in for
by a module that fails if a real kernel is ever called, and the host reads of device data recorded by caller.

The autograd engine refuses fake CUDA tensors when no GPU is present (it stashes the CUDA streams of every device,
and torch's CUDA hooks find none), so run_backward() executes the same backward nodes in the engine's order itself.
"""
import collections
import contextlib
import copy
import traceback
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from models.ops.functions import extension

ROOT = Path(__file__).resolve().parents[1]
COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class NoRealKernels:
    """Stands in for the compiled CUDA extension: loaded, as on a GPU machine, but never to be run."""

    def __getattr__(self, name):
        raise AssertionError(f"the real CUDA kernel {name} was called on fake tensors")


def meta_copy(model):
    """A copy of `model` whose parameters and buffers are meta tensors (no data): cheap to copy again."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    meta = tensor.detach().to("meta")
                    store[name] = torch.nn.Parameter(meta, tensor.requires_grad) \
                        if isinstance(tensor, torch.nn.Parameter) else meta
    return model


def to_fake_cuda(model):
    """A copy of `model` (meta or real) with fake CUDA parameters and buffers; call inside fake_cuda()."""
    with unset_fake_temporarily():
        model = copy.deepcopy(model)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cuda")
                    store[name] = torch.nn.Parameter(fake, tensor.requires_grad) \
                        if isinstance(tensor, torch.nn.Parameter) else fake
    return model


def _project_caller():
    """'path:function' of the innermost function in the project outside tests/, or None (a comprehension counts as
    the function around it, as Python 3.12 inlines them)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "tests") and frame.name not in COMPREHENSIONS:
            return f"{path.relative_to(ROOT)}:{frame.name}"
    return None


@contextlib.contextmanager
def recording_host_reads(reads):
    """Within the block every host read of a CUDA tensor (HOST_READ_METHODS, on Tensor and where FakeTensor has
    its own) made by project code is counted in `reads` {(caller, method): count}; a read inside a read (FakeTensor's
    tolist calls item) counts once."""
    originals = {(torch.Tensor, name): getattr(torch.Tensor, name) for name in HOST_READ_METHODS}
    originals.update({(FakeTensor, name): FakeTensor.__dict__[name] for name in HOST_READ_METHODS
                      if name in FakeTensor.__dict__})
    inherited = [(cls, name) for cls, name in originals if name not in cls.__dict__]  # from torch._C.TensorBase
    depth = [0]

    def recorder(original, name):
        def read(self, *args, **kwargs):
            if depth[0] == 0 and self.device.type == "cuda":
                caller = _project_caller()
                if caller is not None:
                    reads[(caller, name)] += 1
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return read

    try:
        for (cls, name), original in originals.items():
            setattr(cls, name, recorder(original, name))
        yield reads
    finally:
        for (cls, name), original in originals.items():
            if (cls, name) in inherited:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """A FakeTensorMode (with a shape environment: data-dependent sizes become symbols, a branch on data fails) in
    which CUDA autocast works and the CUDA op counts as built."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setitem(extension._state, "tried", True)
    monkeypatch.setitem(extension._state, "module", NoRealKernels())
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        yield mode


def _grad_inputs(node, pending):
    """The gradients a node receives, one per forward output; a custom Function gets zeros for the missing ones,
    as the engine materialises them."""
    grads = [pending.get(i) for i in range(len(node._input_metadata))]
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                 for g, m in zip(grads, node._input_metadata)]
    return grads


def _apply(node, grads):
    """[(next edge, gradient)] of one node: a custom Function's backward returns one gradient per forward argument,
    of which those that need one (needs_input_grad) are its edges, in order."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        outputs = node.apply(*grads)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        outputs = [g for g, needed in zip(outputs, node.needs_input_grad) if needed]
        edges = [edge for edge in node.next_functions if edge[0] is not None]
        if len(outputs) != len(edges):
            raise AssertionError(f"{node.name()}: {len(outputs)} gradients for {len(edges)} edges")
        return list(zip(edges, outputs))
    outputs = node(*grads)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [(edge, g) for edge, g in zip(node.next_functions, outputs) if edge[0] is not None]


def run_backward(loss):
    """loss.backward() for fake CUDA tensors: every node of the graph once its consumers are done, gradients summed
    per input and cast / reduced to the input's metadata as the engine does, AccumulateGrad filling .grad."""
    root = loss.grad_fn
    dependencies, seen, stack = collections.Counter(), {root}, [root]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is not None:
                dependencies[node] += 1
                if node not in seen:
                    seen.add(node)
                    stack.append(node)
    pending = collections.defaultdict(dict, {root: {0: torch.ones_like(loss)}})
    ready = [root]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            for (target, slot), grad in _apply(node, _grad_inputs(node, pending.pop(node, {}))):
                if grad is not None:
                    metadata = target._input_metadata[slot]
                    grad = grad.to(metadata.dtype)
                    if tuple(grad.shape) != tuple(metadata.shape):
                        grad = grad.sum_to_size(metadata.shape)
                    received = pending[target]
                    received[slot] = grad if slot not in received else received[slot] + grad
            for target, _ in node.next_functions:
                if target is not None:
                    dependencies[target] -= 1
                    if dependencies[target] == 0:
                        ready.append(target)
