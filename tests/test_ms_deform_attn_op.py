"""The registered deformable-attention op (hdetr::ms_deform_attn): torch.library's own checks (schema, fake kernel,
autograd registration, AOT dispatch), float64 gradcheck of the CPU kernel, the dispatcher's choice of path and
dtype, and its errors."""
import pytest
import torch
from op_helpers import force_pytorch_path

from models.ops.functions import (
    ms_deform_attn,
    ms_deform_attn_compiled,
    ms_deform_attn_compiled_backward,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_func,
)
from models.ops.functions.extension import get_cpu_extension, get_extension

SHAPES = [(5, 7), (3, 4), (2, 3)]


@pytest.fixture(scope="module")
def cpu_op():
    """The compiled CPU op (built on first use); skipped where no C++ compiler can build it."""
    if get_cpu_extension() is None:
        pytest.skip("the CPU op could not be built here (the PyTorch path is used)")


def op_inputs(n=2, num_queries=4, heads=2, channels=3, points=2, shapes=SHAPES, dtype=torch.float64, seed=0):
    """(value, spatial_shapes, level_start_index, locations, weights); locations reach past the maps' borders and
    keep off the pixel-centre lines (where bilinear sampling has kinks)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(n, int(sizes.sum()), heads, channels, generator=gen, dtype=dtype)
    locations = torch.rand(n, num_queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    pixels = locations * spatial_shapes.flip(-1).to(dtype)[:, None, :] - 0.5  # [.., L, P, 2] in pixels
    fraction = pixels - pixels.floor()
    locations = torch.where((fraction < 1e-3) | (fraction > 1 - 1e-3), locations + 3e-3 / 8, locations)
    weights = torch.rand(n, num_queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, spatial_shapes, starts, locations, weights


# the CPU kernels' dtypes: (value, sampling locations and attention weights)
CPU_DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
              (torch.float16, torch.float32)]


@pytest.mark.parametrize("value_dtype, weights_dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
def test_opcheck_forward(cpu_op, value_dtype, weights_dtype):
    """Schema, fake kernel, autograd registration and AOT dispatch (static and dynamic shapes) of the op, with and
    without gradients, in each dtype pair of the CPU kernels."""
    value, shapes, starts, locations, weights = op_inputs()
    value, locations, weights = value.to(value_dtype), locations.to(weights_dtype), weights.to(weights_dtype)
    torch.library.opcheck(ms_deform_attn_compiled, (value, shapes, starts, locations, weights, 64))
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    torch.library.opcheck(ms_deform_attn_compiled, (leaves[0], shapes, starts, leaves[1], leaves[2], 1))


@pytest.mark.parametrize("value_dtype, weights_dtype", CPU_DTYPES, ids=lambda d: str(d)[6:])
def test_opcheck_backward(cpu_op, value_dtype, weights_dtype):
    value, shapes, starts, locations, weights = op_inputs()
    grad_output = torch.randn(2, 4, 6, dtype=value_dtype)
    torch.library.opcheck(ms_deform_attn_compiled_backward,
                          (value.to(value_dtype), shapes, starts, locations.to(weights_dtype),
                           weights.to(weights_dtype), grad_output, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_on_cuda(dtype):
    """The op's registration on CUDA tensors, in every dtype of the CUDA kernels."""
    if get_extension() is None:
        pytest.fail("the CUDA op did not load on a machine with a GPU")
    value, shapes, starts, locations, weights = (t.cuda() for t in op_inputs())
    leaves = [t.to(dtype).requires_grad_() for t in (value, locations, weights)]
    torch.library.opcheck(ms_deform_attn_compiled, (leaves[0], shapes, starts, leaves[1], leaves[2], 64))
    grad_output = torch.randn(2, 4, 6, dtype=dtype, device="cuda")
    torch.library.opcheck(ms_deform_attn_compiled_backward,
                          (value.to(dtype), shapes, starts, locations.to(dtype), weights.to(dtype), grad_output, 64))


def test_gradcheck_of_the_cpu_kernel_in_float64(cpu_op):
    """At 2 channels (the run-time channel count); the 32-channel kernels are held to the gradchecked PyTorch path
    by test_op_equals_the_pytorch_path_with_its_gradients."""
    value, shapes, starts, locations, weights = op_inputs(n=2, num_queries=3, channels=2)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_compiled(v, shapes, starts, loc, w, 1), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# channel counts of the CPU kernel's paths: fewer than its 8 lanes of partial sums, lanes and a remainder (both at
# run time), and the 32 of every model-zoo configuration, compiled for that count
KERNEL_CHANNELS = [3, 19, 32]


@pytest.mark.parametrize("channels", KERNEL_CHANNELS)
def test_op_equals_the_pytorch_path_with_its_gradients(cpu_op, channels):
    """In float64 the kernels agree with the PyTorch path (gradchecked in test_ms_deform_attn.py) to rounding, in
    the output and in the gradients of value, locations and weights; locations reach past every border."""
    value, shapes, starts, locations, weights = op_inputs(num_queries=6, heads=3, channels=channels, points=3)
    grad_output = torch.randn(2, 6, 3 * channels, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    compiled = [t.clone().requires_grad_() for t in (value, locations, weights)]
    reference = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_compiled(compiled[0], shapes, starts, compiled[1], compiled[2], 64)
    expected = ms_deform_attn_core_pytorch(reference[0], SHAPES, reference[1], reference[2])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(grad_output)
    expected.backward(grad_output)
    for leaf, reference_leaf in zip(compiled, reference):
        torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-11, atol=1e-11)


def test_fake_kernel_names_bad_shapes():
    value, shapes, starts, locations, weights = op_inputs()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = ms_deform_attn_compiled(value, shapes, starts, locations, weights, 64)
        assert out.shape == (2, 4, 6) and out.dtype == torch.float64
        with pytest.raises(RuntimeError, match="attention_weights must be"):
            ms_deform_attn_compiled(value, shapes, starts, locations, weights[..., :1], 64)
        with pytest.raises(RuntimeError, match="share one dtype"):
            ms_deform_attn_compiled(value, shapes, starts, locations.float(), weights, 64)
        with pytest.raises(RuntimeError, match="expected torch.float32 ones for a torch.bfloat16 value on cpu"):
            ms_deform_attn_compiled(value.bfloat16(), shapes, starts, locations.bfloat16(), weights.bfloat16(), 64)
        assert ms_deform_attn_compiled(value.bfloat16(), shapes, starts, locations.float(), weights.float(),
                                       64).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="spatial_shapes must be"):
            ms_deform_attn_compiled(value, shapes[:2], starts[:2], locations, weights, 64)


def test_dispatcher_takes_the_op_on_the_cpu_in_every_dtype(cpu_op, monkeypatch):
    """float32/float64 run in their own dtype; bfloat16 and float16 values go to the kernel as they are, with float32
    locations and weights, and come back in their dtype; the op's path is taken for all of them."""
    calls = []

    def counting_op(*args):
        calls.append(args[0].dtype)
        return ms_deform_attn_compiled(*args)

    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_compiled", counting_op)
    value, shapes, starts, locations, weights = op_inputs(dtype=torch.float32)
    for dtype, computed in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        calls.clear()
        out = ms_deform_attn(value.to(dtype), shapes, starts, locations, weights)
        assert calls == [dtype] and out.dtype == dtype
        expected = ms_deform_attn_core_pytorch(value.to(dtype).to(computed), SHAPES, locations.to(computed),
                                               weights.to(computed))
        torch.testing.assert_close(out, expected.to(dtype), rtol=1e-6, atol=1e-6)


def test_forced_pytorch_path_computes_in_the_same_dtypes(monkeypatch):
    force_pytorch_path(monkeypatch)
    value, shapes, starts, locations, weights = op_inputs(dtype=torch.float32)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_core_pytorch(value.bfloat16().float(), SHAPES, locations, weights)
    assert torch.equal(out, expected.bfloat16())


def test_compute_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

    def of(device, *dtypes):
        return ms_deform_attn_func.compute_dtype(device, *(torch.empty(0, dtype=d) for d in dtypes))

    assert of(cpu, bf16, bf16, bf16) == fp32 and of(cpu, fp16, fp32, fp32) == fp32 and of(cpu, fp32, fp64, fp32) == fp64
    assert of(cuda, bf16, bf16, bf16) == bf16 and of(cuda, fp16, fp16, fp16) == fp16  # the half kernels
    assert of(cuda, bf16, fp32, fp32) == fp32 and of(cuda, bf16, fp16, fp16) == fp32  # never rounds locations


def test_integer_inputs_are_refused():
    value, shapes, starts, locations, weights = op_inputs()
    with pytest.raises(TypeError, match="attention_weights must be a floating-point tensor"):
        ms_deform_attn(value, shapes, starts, locations, (weights > 0.5).long())


class TinyAttention(torch.nn.Module):
    def forward(self, value, locations, weights):
        shapes = torch.tensor(SHAPES)
        starts = torch.tensor([0, 35, 47])
        return ms_deform_attn(value, shapes, starts, locations, weights, level_sizes=SHAPES)


def test_torch_export_takes_the_pytorch_path(cpu_op):
    """The exported graph holds standard operators only (grid_sample), so that ONNX can translate it."""
    value, _, _, locations, weights = op_inputs(dtype=torch.float32)
    exported = torch.export.export(TinyAttention(), (value, locations, weights), strict=False)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("grid_sampler" in t for t in targets) and not any("hdetr" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(value, locations, weights), TinyAttention()(value, locations, weights),
                               rtol=1e-5, atol=1e-6)
