"""Multi-scale deformable attention: the PyTorch path, the level-size helpers and the dispatcher between the
PyTorch path and the compiled op (custom_op.py). The one place that chooses the path is use_compiled()."""
import contextlib
import functools

import torch
import torch.nn.functional as F

from . import extension
from .custom_op import ms_deform_attn_compiled, weights_dtype

_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def spatial_shapes_tensor(level_sizes, device=None):
    """The [L, 2] int64 tensor of the levels' (H_l, W_l) `level_sizes` (Python ints, or symbolic sizes under
    torch.export, which are then computed in the graph instead of being fixed to the traced values)."""
    if all(isinstance(v, int) for size in level_sizes for v in size):
        return torch.as_tensor([tuple(size) for size in level_sizes], dtype=torch.long, device=device)
    return torch.stack([torch.stack([torch.scalar_tensor(v, dtype=torch.long, device=device) for v in size])
                        for size in level_sizes])


def as_level_sizes(spatial_shapes):
    """((H_l, W_l), ...) as Python data: a sequence of pairs is taken as it is; a [L, 2] tensor is read, which on a
    GPU waits for the device (callers that have the sizes pass them instead, as the model does)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    sizes = tuple(tuple(size) for size in spatial_shapes)
    if any(len(size) != 2 for size in sizes):
        raise ValueError(f"level sizes must be (H, W) pairs, got {sizes}")
    return sizes


def _check_level_sizes(sizes, num_values, num_levels):
    """The levels' sizes account for every row of value, one size per level of the sampling locations (the
    compiled kernels would read past value's end, or ignore its last rows). Python ints only: symbolic sizes
    (torch.compile) are the model's own and go unchecked."""
    if not all(isinstance(v, int) for size in sizes for v in size):
        return
    if len(sizes) != num_levels or sum(h * w for h, w in sizes) != num_values:
        raise ValueError(f"ms_deform_attn: the level sizes {list(sizes)} ({len(sizes)} levels, "
                         f"{sum(h * w for h, w in sizes)} positions) do not fit a value of {num_values} positions "
                         f"sampled at {num_levels} levels")


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinearly sample every level at the given locations and sum the samples with the attention weights.

    value:               [N, S, M, D]  (S = sum of H_l * W_l over levels, M heads of D channels)
    value_spatial_shapes the levels' (H_l, W_l): pairs of ints, or a [L, 2] tensor (read with as_level_sizes)
    sampling_locations:  [N, Lq, M, L, P, 2]  (x, y) in [0, 1] of the level's map; outside samples are zero
    attention_weights:   [N, Lq, M, L, P]
    returns              [N, Lq, M * D]
    Sampling follows grid_sample(align_corners=False): pixel centres sit at (i + 0.5) / size.
    """
    n, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = as_level_sizes(value_spatial_shapes)
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample expects [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N, M, D, H*W] -> [N*M, D, H, W]
        value_l = value_per_level[level].permute(0, 2, 3, 1).reshape(n * heads, channels, h, w)
        # [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [N*M, D, Lq, P]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L, P] -> [N*M, D, Lq, L*P]
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, num_queries, levels * points)
    output = (sampled * weights).sum(-1)  # [N*M, D, Lq]
    return output.view(n, heads * channels, num_queries).transpose(1, 2).contiguous()


def _tracing_a_portable_graph():
    """True under torch.export (torch >= 2.6 says so), the TorchScript-based ONNX export and TorchScript tracing or
    scripting: their graphs must hold standard operators only, so they get the PyTorch path. torch.compile is not
    among them: it traces the registered op."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return ((is_exporting is not None and is_exporting()) or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing() or torch.jit.is_scripting())


def use_compiled(value):
    """True when the compiled op takes `value`: a CPU or CUDA tensor whose device's op loads (lazily, on first use;
    one warning and the PyTorch path where it cannot be built), outside the exports of _tracing_a_portable_graph().
    The one place that chooses the path; tests force the PyTorch path by monkeypatching it."""
    if _tracing_a_portable_graph() or value.device.type not in ("cpu", "cuda"):
        return False
    return extension.compiled_extension(value.device) is not None


def compute_dtype(device, *tensors):
    """The dtype the op computes in for these inputs: their promoted dtype, at least float32, except that CUDA
    runs float16 / bfloat16 inputs of one dtype in their own kernels (which accumulate in float32)."""
    dtypes = [t.dtype for t in tensors]
    if all(d == dtypes[0] for d in dtypes) and (device.type == "cuda" or dtypes[0] in _CPU_KERNEL_DTYPES):
        return dtypes[0]
    return torch.promote_types(functools.reduce(torch.promote_types, dtypes), torch.float32)


def ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                   im2col_step=64, level_sizes=None):
    """Multi-scale deformable attention [N, Lq, M * D] in value's dtype: the compiled op where use_compiled(value),
    else the PyTorch path; both compute in compute_dtype() (under autocast too; sampling locations stay as precise as
    they come). The CPU kernel reads a bfloat16 / float16 value as it is and sums in float32, which equals the float32
    computation on the value converted (exactly) to float32; the PyTorch path converts it.

    Shapes as ms_deform_attn_core_pytorch; value_spatial_shapes [L, 2] int64 and value_level_start_index [L] (the
    first row of each level in value) on value's device; level_sizes: the same (H_l, W_l) as Python ints (None:
    read from value_spatial_shapes, a device read).
    """
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if not tensor.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be a floating-point tensor, got {tensor.dtype}")
    if level_sizes is None and value_spatial_shapes.device.type == "cpu":
        level_sizes = value_spatial_shapes  # read for free on the host
    sizes = None if level_sizes is None else as_level_sizes(level_sizes)
    if sizes is not None:
        _check_level_sizes(sizes, value.shape[1], sampling_locations.shape[3])
    if use_compiled(value):
        dtype = compute_dtype(value.device, value, sampling_locations, attention_weights)
        kernel_value = value if weights_dtype(value) == dtype else value.to(dtype)
        output = ms_deform_attn_compiled(kernel_value, value_spatial_shapes, value_level_start_index,
                                         sampling_locations.to(dtype), attention_weights.to(dtype), im2col_step)
        return output.to(value.dtype)
    dtype = compute_dtype(torch.device("cpu"), value, sampling_locations, attention_weights)
    sizes = as_level_sizes(value_spatial_shapes) if sizes is None else sizes
    # autocast would choose grid_sample's dtype itself
    autocast_on = value.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(value.device.type)
    with torch.autocast(value.device.type, enabled=False) if autocast_on else contextlib.nullcontext():
        output = ms_deform_attn_core_pytorch(value.to(dtype), sizes, sampling_locations.to(dtype),
                                             attention_weights.to(dtype))
    return output.to(value.dtype)
