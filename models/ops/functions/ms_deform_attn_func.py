"""Multi-scale deformable attention core: the pure-PyTorch path, the compiled ops' autograd Function (CUDA and CPU),
the dispatcher."""
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .extension import get_cpu_extension, get_extension

FORCE_PYTORCH_ENV = "MSDA_FORCE_PYTORCH"
COMPILED_CPU_DTYPES = (torch.float32, torch.float64)
_forced = {"pytorch_path": False}


def spatial_shapes_tensor(sizes, device=None):
    """The [L, 2] long tensor of the levels' (H_l, W_l) `sizes`; it remembers `sizes`, which level_sizes() then
    returns without reading the tensor (under torch.export the sizes stay symbolic instead of data-dependent)."""
    sizes = [(h, w) for h, w in sizes]
    if all(isinstance(v, int) for size in sizes for v in size):
        spatial_shapes = torch.as_tensor(sizes, dtype=torch.long, device=device)
    else:  # symbolic sizes (torch.export): computed in the graph, as torch.as_tensor would fix them to constants
        spatial_shapes = torch.stack([torch.stack([torch.scalar_tensor(v, dtype=torch.long, device=device)
                                                   for v in size]) for size in sizes])
    spatial_shapes.level_sizes = sizes
    return spatial_shapes


def level_sizes(spatial_shapes):
    """[(H_l, W_l)] of a [L, 2] spatial-shapes tensor: the sizes spatial_shapes_tensor() made it from, else its
    values."""
    sizes = getattr(spatial_shapes, "level_sizes", None)
    return sizes if sizes is not None else [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinearly sample every level at the given locations and sum the samples with the attention weights.

    value:               [N, S, M, D]  (S = sum of H_l * W_l over levels, M heads of D channels)
    value_spatial_shapes [L, 2]        (H_l, W_l) of each level
    sampling_locations:  [N, Lq, M, L, P, 2]  (x, y) in [0, 1] of the level's map; outside samples are zero
    attention_weights:   [N, Lq, M, L, P]
    returns              [N, Lq, M * D]
    Sampling follows grid_sample(align_corners=False): pixel centres sit at (i + 0.5) / size.
    """
    n, _, heads, channels = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = level_sizes(value_spatial_shapes)
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


def compiled_extension(value):
    """The compiled op module for value's device (CUDA, or CPU for float32/float64), loaded lazily."""
    return get_extension() if value.is_cuda else get_cpu_extension()


class MSDeformAttnFunction(torch.autograd.Function):
    """The compiled op (CUDA or CPU, after the inputs' device) with its backward; arguments as ms_deform_attn.

    On CUDA under autocast the inputs are cast to float32; outside it float16/bfloat16 inputs run the half
    kernels (float32 accumulation). The CPU op runs float32 and float64.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                im2col_step):
        ext = compiled_extension(value)
        if ext is None:
            raise RuntimeError("MultiScaleDeformableAttention is not available; call ms_deform_attn instead")
        ctx.extension = ext
        # the kernels take one dtype for all three; mixed inputs run in the widest (autograd casts the grads back)
        dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
        value, sampling_locations, attention_weights = (
            t.to(dtype) for t in (value, sampling_locations, attention_weights))
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                              attention_weights)
        return ext.ms_deform_attn_forward(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                          attention_weights, im2col_step)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.ms_deform_attn_backward(
            value, shapes, start_index, sampling_locations, attention_weights, grad_output.contiguous(),
            ctx.im2col_step)
        return grad_value, None, None, grad_locations, grad_weights, None


@contextmanager
def force_pytorch_path():
    """Within the block, ms_deform_attn takes the PyTorch path on every device (upstream's computation on the
    CPU, the reference of the equivalence tests)."""
    saved = _forced["pytorch_path"]
    _forced["pytorch_path"] = True
    try:
        yield
    finally:
        _forced["pytorch_path"] = saved


def use_compiled(value):
    """True when a compiled op takes `value`: a CUDA tensor, or a float32/float64 CPU tensor, unless
    MSDA_FORCE_PYTORCH=1, force_pytorch_path() or an ONNX export / TorchScript trace asks for the PyTorch path,
    and provided the op loads (lazily, on first use)."""
    if os.environ.get(FORCE_PYTORCH_ENV, "0") == "1" or _forced["pytorch_path"]:
        return False
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not value.is_cuda and not (value.device.type == "cpu" and value.dtype in COMPILED_CPU_DTYPES):
        return False
    return compiled_extension(value) is not None


def ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                   im2col_step=64):
    """Multi-scale deformable attention [N, Lq, M*D]: a compiled op where use_compiled(value), else the PyTorch path.

    Shapes as ms_deform_attn_core_pytorch; value_level_start_index [L] is the first row of each level in value.
    """
    if use_compiled(value):
        return MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                          attention_weights, im2col_step)
    return ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights)
