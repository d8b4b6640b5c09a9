"""The compiled MultiScaleDeformableAttention op.

On any machine: the nvcc build (one architecture, skipped only without a CUDA toolkit), dispatch and fallback,
and the CUDA kernels' logic run on the CPU through a host emulation. With a GPU: the op against the PyTorch path.
"""
import ctypes
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from op_helpers import force_pytorch_path

from models.ops.functions import (
    extension,
    ms_deform_attn,
    ms_deform_attn_compiled,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_func,
)
from models.ops.modules import MSDeformAttn

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BUILD_TEST_ARCH = "8.0"


def level_start_index(shapes):
    sizes = shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def random_inputs(n, num_queries, heads, channels, levels_hw, points, dtype=torch.float64, device="cpu", seed=0):
    """(value, shapes, start_index, locations, weights); locations reach past every side of the maps."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels_hw, dtype=torch.long)
    value = torch.rand(n, int(shapes.prod(1).sum()), heads, channels, generator=generator, dtype=dtype)
    locations = torch.rand(n, num_queries, heads, len(levels_hw), points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(n, num_queries, heads, len(levels_hw), points, generator=generator, dtype=dtype) + 1e-5
    weights = weights / weights.sum((-2, -1), keepdim=True)
    tensors = (value, shapes, level_start_index(shapes), away_from_pixel_lines(locations, shapes), weights)
    return tuple(t.to(device) for t in tensors)


def away_from_pixel_lines(locations, shapes, margin=1e-3):
    """Moves points off the pixel-centre lines, where d(sample)/d(location) jumps and two implementations
    that round x * W - 0.5 differently would pick different cells."""
    size = shapes.flip(-1).to(locations)[:, None, :]  # [L, 1, 2] (W, H), broadcast over [..., L, P, 2]
    pixels = locations * size - 0.5
    fraction = pixels - pixels.floor()
    near = (fraction < margin) | (fraction > 1 - margin)
    return torch.where(near, locations + 3 * margin / size, locations)


@pytest.fixture
def isolated_extension_state():
    """A fresh, not-yet-tried extension cache, restored afterwards."""
    saved = dict(extension._state)
    extension.reset_extension_cache()
    yield
    extension._state.update(saved)


class FakeCudaTensor:
    """Just enough of a CUDA tensor for the dispatch decision."""
    is_cuda = True
    device = torch.device("cuda")


# ---------------------------------------------------------------------------------------------- nvcc build


@pytest.fixture(scope="module")
def built_module():
    """The op compiled for one architecture into a stable directory (reused by later runs)."""
    from torch.utils.cpp_extension import is_ninja_available

    if extension.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    if not is_ninja_available():
        pytest.skip("ninja not found")
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    build_dir = root / f"MultiScaleDeformableAttention_buildtest_sm{BUILD_TEST_ARCH.replace('.', '')}"
    start = time.perf_counter()
    module = extension.load_extension(arch_list=BUILD_TEST_ARCH, build_directory=build_dir)
    print(f"\nMultiScaleDeformableAttention built (or reused) in {time.perf_counter() - start:.1f} s at {build_dir}")
    return module


def test_nvcc_build_and_import(built_module):
    assert built_module.__name__.startswith("MultiScaleDeformableAttention_")  # the build key follows
    assert callable(built_module.ms_deform_attn_forward) and callable(built_module.ms_deform_attn_backward)
    value, shapes, starts, locations, weights = random_inputs(1, 2, 2, 4, [(3, 4)], 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        built_module.ms_deform_attn_forward(value, shapes, starts, locations, weights, 64)


# ---------------------------------------------------------------------------------------------- dispatch


def test_cpu_tensors_never_touch_the_cuda_extension(monkeypatch):
    def forbidden():
        raise AssertionError("the CUDA extension was consulted for CPU tensors")

    monkeypatch.setattr(extension, "get_extension", forbidden)
    value, shapes, starts, locations, weights = random_inputs(2, 3, 2, 4, [(4, 5), (2, 3)], 2)
    out = ms_deform_attn(value, shapes, starts, locations, weights, 1)
    torch.testing.assert_close(out, ms_deform_attn_core_pytorch(value, shapes, locations, weights), rtol=0,
                               atol=1e-12)


def test_cuda_tensors_take_the_cuda_op_when_it_loads(monkeypatch):
    calls = []
    monkeypatch.setattr(extension, "get_extension", lambda: calls.append(1) or object())
    monkeypatch.setenv("MSDA_FORCE_PYTORCH", "1")  # a switch of old: no longer read
    assert ms_deform_attn_func.use_compiled(FakeCudaTensor())
    assert calls == [1]
    monkeypatch.setattr(extension, "get_extension", lambda: None)
    assert not ms_deform_attn_func.use_compiled(FakeCudaTensor())


def test_compile_failure_warns_one_line_once_and_falls_back(monkeypatch, isolated_extension_state):
    attempts = []

    def broken_build(**kwargs):
        attempts.append(kwargs)
        raise RuntimeError("Error building extension 'MultiScaleDeformableAttention'\n[1/3] nvcc ...\nerror: boom")

    monkeypatch.setattr(extension, "_import_prebuilt", lambda name: None)
    monkeypatch.setattr(extension, "load_extension", broken_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.get_extension() is None
        assert extension.get_extension() is None  # cached: no second build, no second warning
        assert not ms_deform_attn_func.use_compiled(FakeCudaTensor())
    assert len(attempts) == 1
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message
    assert "Error building extension" in message and "PyTorch path" in message


def test_prebuilt_module_is_preferred_to_a_build(monkeypatch, isolated_extension_state):
    prebuilt = object()
    monkeypatch.setattr(extension, "_import_prebuilt", lambda name: prebuilt)
    monkeypatch.setattr(extension, "load_extension", lambda **kwargs: pytest.fail("built despite a prebuilt op"))
    assert extension.get_extension() is prebuilt


def test_model_on_cpu_does_not_load_the_extension(isolated_extension_state):
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 5]])
    out = attn(torch.randn(1, 3, 16), torch.rand(1, 3, 1, 2), torch.randn(1, 20, 16), shapes, torch.tensor([0]))
    assert out.shape == (1, 3, 16)
    assert extension._state["tried"] is False


# ---------------------------------------------------------------------------------------------- kernel logic


def group_size(channels):
    """Lanes per (n, q, m) in the backward kernel, as the launcher picks them."""
    return min(32, 1 << (channels - 1).bit_length())


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """The real kernel source compiled for the CPU with g++ and CUDA shims (src/host_emulation)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    library = tmp_path_factory.mktemp("msda_emulation") / "libmsda_emulated.so"
    source = extension.SOURCE_DIR / "host_emulation" / "emulate_kernels.cpp"
    build = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                            str(source), "-o", str(library)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return ctypes.CDLL(str(library))


def emulated_call(library, name, tensors, sizes):
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    function = getattr(library, name)
    function.restype = None
    function(*pointers, *(ctypes.c_int64(s) for s in sizes[:3]), *(ctypes.c_int(s) for s in sizes[3:]))


def emulated_forward(library, value, shapes, starts, locations, weights, block, grid):
    n, num_values, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    out = value.new_full((n, num_queries, heads * channels), float("nan"))
    suffix = "f64" if value.dtype == torch.float64 else "f32"
    emulated_call(library, f"msda_emulated_forward_{suffix}", (value, shapes, starts, locations, weights, out),
                  (n, num_values, num_queries, heads, channels, levels, points, block, grid))
    return out


def emulated_backward(library, value, shapes, starts, locations, weights, grad_out, block, grid):
    n, num_values, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    grad_value = torch.zeros_like(value)
    grad_locations = torch.full_like(locations, float("nan"))
    grad_weights = torch.full_like(weights, float("nan"))
    suffix = "f64" if value.dtype == torch.float64 else "f32"
    emulated_call(library, f"msda_emulated_backward_{suffix}",
                  (value, shapes, starts, locations, weights, grad_out, grad_value, grad_locations, grad_weights),
                  (n, num_values, num_queries, heads, channels, levels, points, group_size(channels), block, grid))
    return grad_value, grad_locations, grad_weights


KERNEL_CASES = [  # (channels, block, grid): one channel, odd channels (idle lanes), whole warps, > 32 channels
    (1, 64, 2), (5, 64, 1), (8, 32, 3), (32, 64, 2), (40, 64, 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels,block,grid", KERNEL_CASES)
def test_emulated_forward_kernel_matches_pytorch(emulated_kernels, dtype, channels, block, grid):
    value, shapes, starts, locations, weights = random_inputs(2, 5, 3, channels, [(6, 5), (3, 3), (1, 2)], 3, dtype)
    expected = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    out = emulated_forward(emulated_kernels, value, shapes, starts, locations, weights, block, grid)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels,block,grid", KERNEL_CASES)
def test_emulated_backward_kernel_matches_autograd(emulated_kernels, dtype, channels, block, grid):
    value, shapes, starts, locations, weights = random_inputs(2, 4, 2, channels, [(5, 4), (2, 3)], 2, dtype, seed=1)
    grad_out = torch.randn(2, 4, 2 * channels, dtype=dtype, generator=torch.Generator().manual_seed(2))
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[1], inputs[2]).backward(grad_out)
    grads = emulated_backward(emulated_kernels, value, shapes, starts, locations, weights, grad_out, block, grid)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for got, tensor in zip(grads, inputs):
        torch.testing.assert_close(got, tensor.grad, atol=tolerance, rtol=tolerance)


class EmulatedExtension:
    """The extension's interface on CPU tensors, backed by the emulated kernels (im2col chunks as the launcher)."""

    def __init__(self, library):
        self.library = library
        self.steps = []

    def ms_deform_attn_forward(self, value, shapes, starts, locations, weights, im2col_step):
        self.steps.append(im2col_step)
        step = min(value.shape[0], im2col_step)
        return torch.cat([emulated_forward(self.library, value[i:i + step], shapes, starts,
                                           locations[i:i + step].contiguous(), weights[i:i + step], 64, 2)
                          for i in range(0, value.shape[0], step)])

    def ms_deform_attn_backward(self, value, shapes, starts, locations, weights, grad_out, im2col_step):
        step = min(value.shape[0], im2col_step)
        chunks = [emulated_backward(self.library, value[i:i + step], shapes, starts, locations[i:i + step],
                                    weights[i:i + step], grad_out[i:i + step], 64, 2)
                  for i in range(0, value.shape[0], step)]
        return tuple(torch.cat(parts) for parts in zip(*chunks))


def test_registered_op_with_emulated_kernels(emulated_kernels, monkeypatch):
    """The registered op's autograd formula over the CUDA kernels' logic (emulated on CPU tensors)."""
    backend = EmulatedExtension(emulated_kernels)
    monkeypatch.setattr(extension, "compiled_extension", lambda device: backend)
    value, shapes, starts, locations, weights = random_inputs(3, 2, 2, 3, [(4, 3), (2, 2)], 2)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def op(v, loc, attn):
        return ms_deform_attn_compiled(v, shapes, starts, loc, attn, 2)  # chunks of 2 + 1 images

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-5)
    assert set(backend.steps) == {2}


def test_mixed_dtypes_run_in_the_widest_and_return_values_dtype(emulated_kernels, monkeypatch):
    monkeypatch.setattr(extension, "compiled_extension", lambda device: EmulatedExtension(emulated_kernels))
    value, shapes, starts, locations, weights = random_inputs(2, 3, 2, 4, [(4, 3)], 2)
    value = value.float().requires_grad_()
    locations.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights.float(), 64)
    assert out.dtype == torch.float32  # value's
    expected = ms_deform_attn_core_pytorch(value.double(), shapes, locations, weights.float().double())
    torch.testing.assert_close(out, expected.float())
    out.sum().backward()
    assert value.grad.dtype == torch.float32 and locations.grad.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def compiled():
    """The op for CUDA tensors: prebuilt or JIT-built; fails where a toolkit exists but the op does not load."""
    module = extension.get_extension()
    if module is None:
        if extension.find_cuda_home() is None:
            pytest.skip("no prebuilt op and no CUDA toolkit to build it")
        pytest.fail("the compiled op did not load on a CUDA machine with a toolkit")
    return module


UPSTREAM_SIZES = dict(n=1, num_queries=2, heads=2, channels=2, levels_hw=[(6, 4), (3, 2)], points=2)
DECODER_SIZES = dict(n=2, num_queries=300, heads=8, channels=32, levels_hw=[(32, 40), (16, 20), (8, 10), (4, 5)],
                     points=4)


def compiled_apply(value, shapes, starts, locations, weights, im2col_step=64):
    return ms_deform_attn_compiled(value, shapes, starts, locations, weights, im2col_step)


@requires_cuda
@pytest.mark.parametrize("sizes", [UPSTREAM_SIZES, DECODER_SIZES], ids=["upstream", "decoder"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cuda_forward_matches_pytorch(compiled, sizes, dtype, tolerance):
    value, shapes, starts, locations, weights = random_inputs(**sizes, dtype=dtype, device="cuda")
    expected = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    out = compiled_apply(value, shapes, starts, locations, weights)
    assert out.dtype == dtype and out.shape == expected.shape
    assert (out - expected).abs().max().item() < tolerance
    # non-contiguous locations give the same result
    strided = locations.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(compiled_apply(value, shapes, starts, strided, weights), out, atol=0, rtol=0)


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cuda_gradients_match_pytorch(compiled, dtype, tolerance):
    value, shapes, starts, locations, weights = random_inputs(**DECODER_SIZES, dtype=dtype, device="cuda")
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], dtype=dtype,
                           device="cuda")
    reference = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ms_deform_attn_core_pytorch(reference[0], shapes, reference[1], reference[2]).backward(grad_out)
    tested = [t.clone().requires_grad_() for t in (value, locations, weights)]
    compiled_apply(tested[0], shapes, starts, tested[1], tested[2]).backward(grad_out)
    for got, expected in zip(tested, reference):
        torch.testing.assert_close(got.grad, expected.grad, atol=tolerance, rtol=tolerance)


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cuda_kernels_match_the_cpu_kernels(compiled, dtype, tolerance):
    """The two compiled ops on the same decoder-sized inputs: forward and the three gradients."""
    if extension.get_cpu_extension() is None:
        pytest.fail("the CPU op did not build on a machine that builds the CUDA op")
    value, shapes, starts, locations, weights = random_inputs(**DECODER_SIZES, dtype=dtype)
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], dtype=dtype,
                           generator=torch.Generator().manual_seed(3))
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (value, locations, weights)]
        out = compiled_apply(leaves[0], shapes.to(device), starts.to(device), leaves[1], leaves[2])
        out.backward(grad_out.to(device))
        results.append([out.detach().cpu()] + [t.grad.cpu() for t in leaves])
    for name, on_cuda, on_cpu in zip(("output", "value", "locations", "weights"), results[1], results[0]):
        torch.testing.assert_close(on_cuda, on_cpu, atol=tolerance, rtol=tolerance, msg=name)


@requires_cuda
def test_cuda_gradcheck_float64(compiled):
    value, shapes, starts, locations, weights = random_inputs(**UPSTREAM_SIZES, device="cuda")
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def op(v, loc, attn):
        return compiled_apply(v, shapes, starts, loc, attn)

    # grad_value is summed with atomics, so repeated backward passes may differ in the last bits
    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-10)


@requires_cuda
def test_cuda_im2col_step_with_a_remainder(compiled):
    sizes = dict(DECODER_SIZES, n=3, num_queries=50)
    value, shapes, starts, locations, weights = random_inputs(**sizes, dtype=torch.float64, device="cuda")
    grad_out = torch.randn(3, 50, 256, dtype=torch.float64, device="cuda")
    results = []
    for step in (64, 2, 1):  # one chunk; chunks of 2 + 1; one image at a time
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = compiled_apply(inputs[0], shapes, starts, inputs[1], inputs[2], step)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in inputs])
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_cuda_half_kernels(compiled, dtype, tolerance):
    value, shapes, starts, locations, weights = random_inputs(**DECODER_SIZES, dtype=dtype, device="cuda")
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = compiled_apply(inputs[0], shapes, starts, inputs[1], inputs[2])
    assert out.dtype == dtype
    reference = [t.float().requires_grad_() for t in (value, locations, weights)]
    expected = compiled_apply(reference[0], shapes, starts, reference[1], reference[2])
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out.to(dtype).float())
    for got, ref in zip(inputs, reference):
        assert got.grad.dtype == dtype
        scale = ref.grad.abs().max().item()
        assert (got.grad.float() - ref.grad).abs().max().item() < 2 * tolerance * max(scale, 1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_values_dtype_and_float32_locations(compiled, dtype):
    """Under autocast a low-precision value with float32 locations and weights runs the float32 kernel and returns
    value's dtype: the result is the float32 result of the rounded value, rounded once."""
    value, shapes, starts, locations, weights = random_inputs(**DECODER_SIZES, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = ms_deform_attn(value.to(dtype), shapes, starts, locations, weights)
    assert out.dtype == dtype
    expected = ms_deform_attn_core_pytorch(value.to(dtype).float(), shapes, locations, weights)
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)


@requires_cuda
def test_cuda_dispatch_and_forced_fallback(compiled, monkeypatch):
    value, shapes, starts, locations, weights = random_inputs(**DECODER_SIZES, dtype=torch.float32, device="cuda")
    expected = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    calls = []

    def counting_op(*args):
        calls.append(1)
        return ms_deform_attn_compiled(*args)

    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_compiled", counting_op)
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    assert calls == [1]
    assert (out - expected).abs().max().item() < 1e-5
    force_pytorch_path(monkeypatch)
    assert torch.equal(ms_deform_attn(value, shapes, starts, locations, weights), expected)
    assert calls == [1]
