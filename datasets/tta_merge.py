"""Test-time augmentation, the merge: each scale's size range, and the passes' detections merged by soft box voting.

Upstream's multi-scale test (its pull request #15, after ATSS): every pass contributes its top-k detections
(PostProcess, boxes in the original image's pixels; datasets/tta.py runs the passes and mirrors a flipped pass's
boxes back), a resized pass keeps the detections whose size fits its range, and the detections of all passes are
merged per class by soft box voting. Sizes and IoUs are those of the continuous boxes DETR predicts (no "+1 pixel"
as in ATSS's code).
"""
import numpy as np
import torch

from util.box_ops import box_iou

# a voted-away detection stays, rescored by (1 - IoU with the group's best), when its new score reaches this
SOFT_VOTE_MIN_SCORE = 0.05


def in_size_range(boxes, low, high):
    """Boolean [N]: low <= sqrt(w * h) < high for xyxy boxes [N, 4]."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return (area >= low * low) & (area < high * high)


def soft_box_vote(boxes, scores, iou_threshold):
    """Soft box voting of one class's detections: boxes [N, 4] xyxy, scores [N] -> (boxes [M, 4], scores [M]),
    best first.

    Greedily from the best remaining detection, its group is every remaining detection overlapping it by IoU >=
    iou_threshold. A group of one stays as it is; a larger group becomes one box, the score-weighted mean of the
    group's boxes with the best score, and its other members stay too, rescored by (1 - their IoU with the best)
    when that reaches SOFT_VOTE_MIN_SCORE. The group leaves the pool either way.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores = boxes[order], scores[order]
    iou = box_iou(boxes, boxes)[0]  # [N, N]
    overlapping = (iou >= iou_threshold).cpu().numpy()
    leader = np.full(len(boxes), -1)  # the best of each detection's group
    for best in range(len(boxes)):
        if leader[best] < 0:
            members = overlapping[best] & (leader < 0)
            members[best] = True  # even a degenerate box (IoU 0/0) is in its own group
            leader[members] = best
    leader = torch.from_numpy(leader).to(boxes.device)
    index = torch.arange(len(boxes), device=boxes.device)
    is_leader = leader == index
    group_size = torch.bincount(leader, minlength=len(boxes))
    weighted = torch.zeros_like(boxes).index_add_(0, leader, boxes * scores[:, None])
    total = torch.zeros_like(scores).index_add_(0, leader, scores)
    voted = torch.where((group_size > 1)[:, None], weighted / total[:, None], boxes)
    rescored = scores * (1 - iou[leader, index])
    kept = ~is_leader & (rescored >= SOFT_VOTE_MIN_SCORE)
    boxes = torch.cat([voted[is_leader], boxes[kept]])
    scores = torch.cat([scores[is_leader], rescored[kept]])
    order = torch.argsort(scores, descending=True, stable=True)
    return boxes[order], scores[order]


def merge_detections(detections, vote_iou, max_dets):
    """Detections of several passes ({"scores", "labels", "boxes"} each, same image and pixels) -> one such dict:
    soft box voting per class at `vote_iou` (None: concatenated, no voting), the best `max_dets`, best first."""
    scores = torch.cat([d["scores"] for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    boxes = torch.cat([d["boxes"] for d in detections])
    if vote_iou is not None and len(scores):
        parts = []
        for label in labels.unique():
            voted_boxes, voted_scores = soft_box_vote(boxes[labels == label], scores[labels == label], vote_iou)
            parts.append((voted_boxes, voted_scores, torch.full_like(voted_scores, int(label), dtype=labels.dtype)))
        boxes, scores, labels = (torch.cat(p) for p in zip(*parts))
    order = torch.argsort(scores, descending=True, stable=True)[:max_dets]
    return {"scores": scores[order], "labels": labels[order], "boxes": boxes[order]}
