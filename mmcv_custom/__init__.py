"""Small replacements for the mmcv helpers upstream used (mmcv itself is not a dependency)."""
from .checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
