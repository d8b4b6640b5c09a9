"""The faster computations that replace upstream's operation order, and a switch back to upstream's order.

Fast (the default): query self-attention as one dense attention per query group, the compiled deformable-attention
op on the CPU, the decoder's box-head outputs reused by the detection head, the focal loss in fewer passes, the
feed-forward blocks' ReLU and its gradient in place. Each computes the same function as upstream's operations;
`upstream_operation_order()` restores those, for the equivalence tests (float64).
"""
from contextlib import contextmanager

from models.ops.functions.ms_deform_attn_func import force_pytorch_path

_state = {"fast": True}


def enabled():
    """False inside upstream_operation_order()."""
    return _state["fast"]


@contextmanager
def upstream_operation_order():
    """Within the block the model runs upstream's operations (masked attention over all queries, grid_sample
    deformable attention, box-head outputs recomputed by the detection head, upstream's focal-loss expressions,
    autograd's Linear / ReLU / Linear in the feed-forward blocks)."""
    saved = _state["fast"]
    _state["fast"] = False
    try:
        with force_pytorch_path():
            yield
    finally:
        _state["fast"] = saved
