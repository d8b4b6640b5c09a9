from .custom_op import ms_deform_attn_compiled, ms_deform_attn_compiled_backward
from .extension import get_extension, load_extension
from .ms_deform_attn_func import (
    as_level_sizes,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    spatial_shapes_tensor,
)

__all__ = ["as_level_sizes", "get_extension", "load_extension", "ms_deform_attn", "ms_deform_attn_compiled",
           "ms_deform_attn_compiled_backward", "ms_deform_attn_core_pytorch", "spatial_shapes_tensor"]
