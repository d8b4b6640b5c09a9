from .ms_deform_attn_func import ms_deform_attn, ms_deform_attn_core_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_core_pytorch"]
