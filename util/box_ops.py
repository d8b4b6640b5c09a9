"""Bounding-box conversions and mirroring, (generalized) IoU on [N, 4] tensors, and the box-refinement step."""
import torch

from util.amp import to_float32
from util.misc import inverse_sigmoid


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def hflip_boxes(boxes, width):
    """Mirror xyxy boxes [N, 4] of an image `width` pixels wide left-right (x -> width - x)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((width - x1, y0, width - x0, y1), dim=-1)


def _overlaps(boxes1, boxes2):
    """(intersection, union, enclosing-box area) of xyxy boxes [..., 4] that broadcast against each other."""
    x0a, y0a, x1a, y1a = boxes1.unbind(-1)
    x0b, y0b, x1b, y1b = boxes2.unbind(-1)
    inter = (torch.min(x1a, x1b) - torch.max(x0a, x0b)).clamp(min=0) * \
        (torch.min(y1a, y1b) - torch.max(y0a, y0b)).clamp(min=0)
    union = (x1a - x0a) * (y1a - y0a) + (x1b - x0b) * (y1b - y0b) - inter
    hull = (torch.max(x1a, x1b) - torch.min(x0a, x0b)).clamp(min=0) * \
        (torch.max(y1a, y1b) - torch.min(y0a, y0b)).clamp(min=0)
    return inter, union, hull


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes: returns (iou [N, M], union [N, M])."""
    inter, union, _ = _overlaps(boxes1[:, None], boxes2[None, :])
    return inter / union, union


def _check_boxes(boxes, name):
    """Degenerate boxes (x1 < x0 or y1 < y0) give inf/nan in GIoU, so they are rejected early."""
    bad = ~((boxes[:, 2:] >= boxes[:, :2]).all(-1) & torch.isfinite(boxes).all(-1))
    if bad.any():
        raise ValueError(f"generalized_box_iou: {int(bad.sum())} of {len(boxes)} boxes in the {name} set are "
                         f"degenerate or not finite, e.g. {boxes[bad][0].tolist()}")


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (https://giou.stanford.edu/) of xyxy boxes [N, 4] and [M, 4]: [N, M]."""
    _check_boxes(boxes1, "first")
    _check_boxes(boxes2, "second")
    inter, union, hull = _overlaps(boxes1[:, None], boxes2[None, :])
    return inter / union - (hull - union) / hull


def paired_generalized_box_iou(boxes1, boxes2):
    """Generalized IoU of each box of boxes1 [N, 4] with the box of boxes2 [N, 4] in the same row: [N] (the
    diagonal of generalized_box_iou, without the N x N others)."""
    _check_boxes(boxes1, "first")
    _check_boxes(boxes2, "second")
    inter, union, hull = _overlaps(boxes1, boxes2)
    return inter / union - (hull - union) / hull


def refine_boxes(delta, reference):
    """One step of iterative box refinement: sigmoid(delta + logit(reference)), boxes [..., 4] in [0, 1].

    delta [..., 4] is a box head's output; reference [..., 4] are boxes (cx, cy, w, h), or [..., 2] points, whose
    refinement takes the head's (w, h) as they are. Computed in float32 when either comes in bfloat16/float16
    (a head under autocast): the logit of a box near 0 or 1 needs float32's precision.
    """
    delta, reference = to_float32(delta), to_float32(reference)
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    if reference.shape[-1] != 2:
        raise ValueError(f"reference must end in 2 or 4 coordinates, got {reference.shape[-1]}")
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
