"""The PyTorch multi-scale deformable attention core and the MSDeformAttn module, on the CPU."""
import math

import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, images
from op_helpers import force_pytorch_path

import models.ops.modules.ms_deform_attn as msda_module
from models.ops.functions import as_level_sizes, ms_deform_attn, ms_deform_attn_core_pytorch, spatial_shapes_tensor
from models.ops.modules import MSDeformAttn

SHAPES = [(5, 7), (3, 4), (2, 3)]  # (H, W) of three levels


def level_start_index(shapes):
    """[L] first row of each level in the flattened value."""
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def naive_ms_deform_attn(value, shapes, locations, weights):
    """Per-sampling-point loop with explicit bilinear interpolation; zeros off the map, pixel centres at i + 0.5."""
    n, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    starts = level_start_index(shapes).tolist()
    out = value.new_zeros(n, num_queries, heads, channels)
    for b in range(n):
        for q in range(num_queries):
            for m in range(heads):
                for level, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, level, p, 0].item() * w - 0.5
                        y = locations[b, q, m, level, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = value.new_zeros(channels)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                corner_weight = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                sample += corner_weight * value[b, starts[level] + yy * w + xx, m]
                        out[b, q, m] += weights[b, q, m, level, p] * sample
    return out.flatten(2)


def random_inputs(n=2, num_queries=4, heads=2, channels=3, points=2, shapes=SHAPES, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(n, num_values, heads, channels, generator=generator, dtype=dtype)
    # locations reach past the map on every side
    locations = torch.rand(n, num_queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(n, num_queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.long), locations, weights


def test_core_matches_naive_loop_with_random_points():
    value, shapes, locations, weights = random_inputs()
    expected = naive_ms_deform_attn(value, SHAPES, locations, weights)
    torch.testing.assert_close(ms_deform_attn_core_pytorch(value, shapes, locations, weights), expected)


def test_core_matches_naive_loop_on_border_and_outside_points():
    value, shapes, _, _ = random_inputs(n=1, num_queries=1, points=8)
    special = torch.tensor([
        [0.0, 0.0], [1.0, 1.0], [0.0, 1.0],   # corners of the map: a quarter of the corner pixel
        [0.5, 0.5],                           # centre
        [-0.05, 0.5], [1.05, 0.3],            # just outside: part of the border pixel
        [-0.6, 0.5], [0.5, 2.0],              # far outside: nothing
    ], dtype=torch.float64)
    # [P, 2] -> [1, 1, M, L, P, 2]
    locations = special.expand(1, 1, 2, len(SHAPES), 8, 2).clone()
    weights = torch.linspace(0.1, 1.0, 8, dtype=torch.float64).expand(1, 1, 2, len(SHAPES), 8).clone()
    out = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    torch.testing.assert_close(out, naive_ms_deform_attn(value, SHAPES, locations, weights))

    # exactly on a pixel centre the sample is that pixel
    h, w = SHAPES[0]
    centre = torch.tensor([(2 + 0.5) / w, (1 + 0.5) / h], dtype=torch.float64)
    one_point = centre.expand(1, 1, 2, len(SHAPES), 1, 2).clone()
    only_level0 = torch.zeros(1, 1, 2, len(SHAPES), 1, dtype=torch.float64)
    only_level0[..., 0, :] = 1
    out = ms_deform_attn_core_pytorch(value, shapes, one_point, only_level0)
    torch.testing.assert_close(out.view(2, 3), value[0, 1 * w + 2])


def test_forced_dispatcher_on_cpu_is_the_pytorch_core(monkeypatch):
    value, shapes, locations, weights = random_inputs(dtype=torch.float32)
    expected = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    force_pytorch_path(monkeypatch)
    out = ms_deform_attn(value, shapes, level_start_index(SHAPES), locations, weights, im2col_step=1)
    assert torch.equal(out, expected)


def test_core_gradcheck_float64():
    value, shapes, locations, weights = random_inputs(n=1, num_queries=2, channels=2, shapes=[(3, 4), (2, 2)])
    # keep points away from pixel-centre lines, where bilinear sampling has kinks
    locations = locations.clamp(-0.2, 1.2)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def core(v, loc, attn):
        return ms_deform_attn_core_pytorch(v, shapes, loc, attn)

    assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-5)


def make_module_inputs(n=2, num_queries=5, d_model=16, shapes=((6, 8), (3, 4)), seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    num_values = sum(h * w for h, w in shapes)
    query = torch.randn(n, num_queries, d_model, generator=generator)
    flatten = torch.randn(n, num_values, d_model, generator=generator)
    return query, flatten, shapes_t, level_start_index(shapes)


@pytest.mark.parametrize("coords", [2, 4])
def test_module_output_shape(coords):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flatten, shapes, starts = make_module_inputs()
    reference = torch.rand(2, 5, 2, coords)
    out = attn(query, reference, flatten, shapes, starts)
    assert out.shape == (2, 5, 16)
    assert torch.isfinite(out).all()


def test_module_boxes_without_offsets_sample_the_box_centre():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    query, flatten, shapes, starts = make_module_inputs()
    centres = torch.rand(2, 5, 2, 2)
    boxes = torch.cat([centres, torch.rand(2, 5, 2, 2)], -1)
    torch.testing.assert_close(attn(query, boxes, flatten, shapes, starts),
                               attn(query, centres, flatten, shapes, starts))


def test_module_ignores_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flatten, shapes, starts = make_module_inputs()
    mask = torch.zeros(2, flatten.shape[1], dtype=torch.bool)
    mask[:, ::3] = True
    reference = torch.rand(2, 5, 2, 2)
    out = attn(query, reference, flatten, shapes, starts, mask)
    changed = flatten.masked_fill(mask[..., None], 100.0)
    torch.testing.assert_close(attn(query, reference, changed, shapes, starts, mask), out)


def test_module_rejects_bad_reference_points():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flatten, shapes, starts = make_module_inputs()
    with pytest.raises(ValueError):
        attn(query, torch.rand(2, 5, 2, 3), flatten, shapes, starts)


@pytest.mark.parametrize("pytorch_path", [False, True], ids=["default", "pytorch path"])
@pytest.mark.parametrize("sizes", [((12, 16), (6, 8)), ((3, 4), (3, 4)), ((6, 8), (3, 4), (1, 1))],
                         ids=["more", "fewer", "a level more"])
def test_level_sizes_that_do_not_fit_the_value_are_refused(monkeypatch, pytorch_path, sizes):
    """Upstream asserts the sizes sum to the value's length: the compiled kernels would read past its end (or
    ignore its last rows), the PyTorch path fail in a split; given as a tensor or as ints."""
    if pytorch_path:
        force_pytorch_path(monkeypatch)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flatten, shapes, starts = make_module_inputs()  # levels (6, 8) and (3, 4): 60 positions
    wrong = spatial_shapes_tensor(sizes)
    message = (r"MSDeformAttn of 2 levels: input_spatial_shapes must be \[2, 2\], got \[3, 2\]" if len(sizes) == 3
               else r"ms_deform_attn: the level sizes .* do not fit a value of 60 positions sampled at 2 levels")
    with pytest.raises(ValueError, match=message):
        attn(query, torch.rand(2, 5, 2, 2), flatten, wrong, starts[:1].expand(len(sizes)))
    with pytest.raises(ValueError, match=r"do not fit a value of 60 positions"):
        attn(query, torch.rand(2, 5, 2, 2), flatten, shapes, starts, level_sizes=sizes)


def test_level_sizes_as_python_data():
    shapes = spatial_shapes_tensor([(5, 7), (3, 4)])
    assert shapes.dtype == torch.long and shapes.tolist() == [[5, 7], [3, 4]]
    assert not hasattr(shapes, "level_sizes")  # nothing rides on the tensor
    assert as_level_sizes(shapes) == ((5, 7), (3, 4)) == as_level_sizes([[5, 7], (3, 4)])
    with pytest.raises(ValueError, match="level sizes must be"):
        as_level_sizes([(5, 7, 1)])


def test_module_with_level_sizes_equals_the_module_reading_the_tensor():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flatten, shapes, starts = make_module_inputs()
    reference = torch.rand(2, 5, 2, 2)
    assert torch.equal(attn(query, reference, flatten, shapes, starts, level_sizes=((6, 8), (3, 4))),
                       attn(query, reference, flatten, shapes, starts))


@pytest.mark.parametrize("pytorch_path", [False, True], ids=["default", "pytorch path"])
def test_the_model_passes_level_sizes_as_ints(monkeypatch, pytorch_path):
    """Every deformable attention of the model gets the levels' sizes as Python ints equal to its spatial-shapes
    tensor, so that neither path reads a device tensor for them."""
    if pytorch_path:
        force_pytorch_path(monkeypatch)
    seen = []
    original = msda_module.ms_deform_attn

    def recording(value, shapes, starts, locations, weights, step, sizes):
        seen.append((shapes, sizes))
        return original(value, shapes, starts, locations, weights, step, sizes)

    monkeypatch.setattr(msda_module, "ms_deform_attn", recording)
    model, _, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone"])
    model.eval()(images([(64, 96), (80, 64)]))
    assert len(seen) == args.enc_layers + args.dec_layers
    for shapes, sizes in seen:
        assert isinstance(sizes, tuple) and all(type(v) is int for size in sizes for v in size)
        assert [list(size) for size in sizes] == shapes.tolist()
