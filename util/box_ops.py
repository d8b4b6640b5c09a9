"""Bounding-box conversions, (generalized) IoU on [N, 4] tensors, and the box-refinement step."""
import torch
from torchvision.ops.boxes import box_area

from util.misc import inverse_sigmoid


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes: returns (iou [N, M], union [N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (https://giou.stanford.edu/) of xyxy boxes, [N, M].

    Degenerate boxes (x1 < x0 or y1 < y0) give inf/nan, so they are rejected early.
    """
    for name, boxes in (("first", boxes1), ("second", boxes2)):
        bad = ~((boxes[:, 2:] >= boxes[:, :2]).all(-1) & torch.isfinite(boxes).all(-1))
        if bad.any():
            raise ValueError(
                f"generalized_box_iou: {int(bad.sum())} of {len(boxes)} boxes in the {name} set are "
                f"degenerate or not finite, e.g. {boxes[bad][0].tolist()}"
            )
    iou, union = box_iou(boxes1, boxes2)
    enclose_tl = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    enclose_br = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (enclose_br - enclose_tl).clamp(min=0)
    enclose_area = wh[..., 0] * wh[..., 1]
    return iou - (enclose_area - union) / enclose_area



def refine_boxes(delta, reference):
    """One step of iterative box refinement: sigmoid(delta + logit(reference)), boxes [..., 4] in [0, 1].

    delta [..., 4] is a box head's output; reference [..., 4] are boxes (cx, cy, w, h), or [..., 2] points, whose
    refinement takes the head's (w, h) as they are.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    if reference.shape[-1] != 2:
        raise ValueError(f"reference must end in 2 or 4 coordinates, got {reference.shape[-1]}")
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
