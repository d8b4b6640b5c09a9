from .extension import get_extension, load_extension
from .ms_deform_attn_func import MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_core_pytorch

__all__ = ["MSDeformAttnFunction", "get_extension", "load_extension", "ms_deform_attn", "ms_deform_attn_core_pytorch"]
