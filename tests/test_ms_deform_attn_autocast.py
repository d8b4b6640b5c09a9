"""Deformable attention under autocast (CPU, bfloat16 and float16): the op takes and returns value's dtype and sums
in float32 (the CPU kernel reads the reduced value itself, and equals the float32 kernel on its exact conversion),
the compiled CPU op runs (not the grid_sample path), and the sampling locations, offsets and attention weights stay
float32."""
import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, images
from op_helpers import force_pytorch_path

import models.ops.modules.ms_deform_attn as msda_module
from models.ops.functions import (
    ms_deform_attn,
    ms_deform_attn_compiled,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_func,
)
from models.ops.functions.extension import get_cpu_extension
from models.ops.modules import MSDeformAttn

# unit roundoff: half the distance from 1 to the next number (bfloat16 keeps 8 significant bits, float16 11)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
LOW_PRECISION = list(UNIT_ROUNDOFF)
SHAPES = [(6, 8), (3, 4)]


def op_inputs(seed=0, channels=8):
    gen = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(2, num_values, 4, channels, generator=gen)
    locations = torch.rand(2, 30, 4, len(SHAPES), 3, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(2, 30, 4, len(SHAPES), 3, generator=gen)
    shapes = torch.tensor(SHAPES)
    return value, shapes, torch.tensor([0, 48]), locations, weights


@pytest.mark.parametrize("pytorch_path", [False, True], ids=["compiled", "pytorch path"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_op_under_autocast_returns_values_dtype_within_its_rounding(dtype, pytorch_path, monkeypatch):
    """The float32 sum of the rounded value, rounded once: each output element is within 2u of the float32 result
    (u for rounding the value, u for rounding the output) relative to sum |weight * corner weight * value|, which
    the same sum over |value| and |weights| bounds; 1e-6 covers float32's own accumulation order."""
    if pytorch_path:
        force_pytorch_path(monkeypatch)
    elif get_cpu_extension() is None:
        pytest.skip("the CPU op could not be built here")
    value, shapes, starts, locations, weights = op_inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = ms_deform_attn(value.to(dtype), shapes, starts, locations, weights)
    assert out.dtype == dtype
    expected = ms_deform_attn_core_pytorch(value, SHAPES, locations, weights)
    magnitude = ms_deform_attn_core_pytorch(value.abs(), SHAPES, locations, weights.abs())
    error = (out.float() - expected).abs()
    assert (error <= 2 * UNIT_ROUNDOFF[dtype] * magnitude + 1e-6).all(), error.max()
    assert error.max() > 0  # it did round: the comparison is not of float32 with itself


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_op_under_autocast_gradients_come_back_in_the_inputs_dtypes(dtype):
    value, shapes, starts, locations, weights = op_inputs()
    value = value.to(dtype).requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = ms_deform_attn(value, shapes, starts, locations, weights)
    out.float().square().sum().backward()
    assert value.grad.dtype == dtype and locations.grad.dtype == torch.float32 and weights.grad.dtype == torch.float32
    assert all(torch.isfinite(t.grad).all() for t in (value, locations, weights))


@pytest.mark.parametrize("channels", [8, 32])  # the kernel's run-time and compiled channel counts
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cpu_kernel_on_a_reduced_value_equals_the_float32_kernel_on_its_conversion(dtype, channels):
    """A bfloat16 / float16 value converts to float32 exactly, so the kernel that reads it and sums in float32 gives
    the float32 kernel's result on value.float() rounded once: output, grad_value (rounded) and the gradients of
    the locations and weights, bit for bit. The value holds a NaN, an inf and values rounding to ties, and some
    locations fall off the maps."""
    if get_cpu_extension() is None:
        pytest.skip("the CPU op could not be built here")
    value, shapes, starts, locations, weights = op_inputs(seed=3, channels=channels)
    value = value.to(dtype)
    value[0, 5, 1, 2], value[1, 7, 0, 0] = float("nan"), float("inf")
    as_float = value.float()
    out = ms_deform_attn_compiled(value, shapes, starts, locations, weights, 64)
    expected = ms_deform_attn_compiled(as_float, shapes, starts, locations, weights, 64)
    assert out.dtype == dtype and out.isnan().any()
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0, equal_nan=True)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    backward = torch.ops.hdetr.ms_deform_attn_backward
    grads = backward(value, shapes, starts, locations, weights, grad_output, 64)
    expected_grads = backward(as_float, shapes, starts, locations, weights, grad_output.float(), 64)
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    for grad, expected_grad in zip(grads, (expected_grads[0].to(dtype), *expected_grads[1:])):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0, equal_nan=True)


def recorded_calls(monkeypatch):
    """The dtypes of every ms_deform_attn call (value, locations, weights, output) and of every compiled op call."""
    calls = {"module": [], "compiled": []}
    original = msda_module.ms_deform_attn

    def recording(value, shapes, starts, locations, weights, step, sizes):
        out = original(value, shapes, starts, locations, weights, step, sizes)
        calls["module"].append((value.dtype, locations.dtype, weights.dtype, out.dtype))
        return out

    def counting(value, *args):
        calls["compiled"].append(value.dtype)
        return ms_deform_attn_compiled(value, *args)

    monkeypatch.setattr(msda_module, "ms_deform_attn", recording)
    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_compiled", counting)
    return calls


@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_module_under_autocast_keeps_sampling_in_float32(dtype, coords, monkeypatch):
    calls = recorded_calls(monkeypatch)
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    gen = torch.Generator().manual_seed(1)
    query, flatten = torch.randn(2, 30, 32, generator=gen), torch.randn(2, 60, 32, generator=gen)
    reference = torch.rand(2, 30, 2, coords, generator=gen)
    shapes = torch.tensor(SHAPES)
    with torch.autocast("cpu", dtype=dtype):
        out = attn(query, reference, flatten, shapes, torch.tensor([0, 48]), None, tuple(SHAPES))
    assert out.dtype == dtype
    assert calls["module"] == [(dtype, torch.float32, torch.float32, dtype)]
    if get_cpu_extension() is not None:
        assert calls["compiled"] == [dtype]  # the compiled CPU op, fed the value as it is
    reference_out = attn(query, reference, flatten, shapes, torch.tensor([0, 48]), None, tuple(SHAPES))
    # bf16/fp16 projections: the outputs agree to a few units of the low precision (a loose check of sanity; the
    # op's own bound is the test above)
    torch.testing.assert_close(out.float(), reference_out, rtol=0, atol=40 * UNIT_ROUNDOFF[dtype])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_model_under_autocast_runs_the_compiled_op_with_float32_locations(dtype, monkeypatch):
    calls = recorded_calls(monkeypatch)
    model, _, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone"])
    with torch.autocast("cpu", dtype=dtype):
        out = model.train()(images([(64, 96), (80, 64)]))
    assert torch.isfinite(out["pred_boxes"].float()).all()
    assert len(calls["module"]) == args.enc_layers + args.dec_layers
    assert all(loc == torch.float32 and weights == torch.float32 and value == out_dtype
               for value, loc, weights, out_dtype in calls["module"]), calls["module"]
    if get_cpu_extension() is not None:
        assert calls["compiled"] == [dtype] * len(calls["module"])
