"""Test-time augmentation, detection side: run the resized (and flipped) passes, filter and merge them.

Upstream's multi-scale test (its pull request #15, after ATSS): every pass contributes its top-k detections
(PostProcess, boxes in the original image's pixels); a flipped pass's boxes are mirrored back, a resized pass
keeps the detections whose size fits its range (datasets/tta.py), and the detections of all passes are merged per
class by soft box voting. The image side (scales, resizing) is datasets/tta.py. Sizes and IoUs are those of the
continuous boxes DETR predicts (no "+1 pixel" as in ATSS's code); flipped boxes are mirrored exactly (x -> w - x).
"""
import numpy as np
import torch
from torchvision.ops import box_iou

from datasets.transforms import eval_resize
from datasets.tta import describe_scales, tta_scales, view_to_input
from util import amp as mixed_precision
from util.misc import nested_tensor_from_tensor_list

# a voted-away detection stays, rescored by (1 - IoU with the group's best), when its new score reaches this
SOFT_VOTE_MIN_SCORE = 0.05


def hflip_boxes(boxes, width):
    """Mirror xyxy boxes [N, 4] of an image `width` pixels wide left-right (x -> width - x)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((width - x1, y0, width - x0, y1), dim=-1)


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
    iou = box_iou(boxes, boxes)  # [N, N]
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


class TestTimeAugmentation:
    """Multi-scale (and flip) detection of a batch whose identity pass has run (see evaluate()).

    postprocess: PostProcess (its top-k per pass); flip: also run every pass mirrored; vote_iou: IoU of soft box
    voting (None: no voting); max_dets: detections kept per image; scales: the TTAScale list, for the printout.
    """

    __test__ = False  # not a pytest class

    def __init__(self, postprocess, flip=False, vote_iou=0.66, max_dets=1000, scales=(), eval_size=None,
                 eval_max_size=None):
        self.postprocess = postprocess
        self.flip = flip
        self.vote_iou = vote_iou
        self.max_dets = max_dets
        self.scales = list(scales)
        self.eval_size = eval_size
        self.eval_max_size = eval_max_size

    @classmethod
    def from_args(cls, args, postprocess):
        """From main.py's --tta flags (checked beforehand by util.arguments.tta_problems)."""
        return cls(postprocess, args.tta_flip, args.tta_vote_iou, args.tta_max_dets, tta_scales(args),
                   *eval_resize(args.train_scales, args.max_size, args.val_scale))

    def __repr__(self):
        passes = (1 + len(self.scales)) * (2 if self.flip else 1)
        voting = f"soft box voting at IoU {self.vote_iou}" if self.vote_iou is not None else "no voting"
        head = (f"test-time augmentation: {passes} passes per image ({1 + len(self.scales)} scales"
                f"{', each also flipped' if self.flip else ''}), top {self.postprocess.topk} of each, "
                f"{voting}, at most {self.max_dets} per image")
        return "\n".join([head, *describe_scales(self.scales, self.eval_size, self.eval_max_size)])

    def _detect(self, model, images, orig_sizes, flipped, amp):
        """Top-k detections of a batch of input images [3, h, w] (padded together, as the evaluation's batch) in
        original pixels, mirrored back when `flipped`; the model runs in precision `amp`, the rest in float32."""
        samples = nested_tensor_from_tensor_list([image.flip(-1) if flipped else image for image in images])
        outputs = mixed_precision.forward(model, samples, samples.tensors.device, amp)
        results = self.postprocess(outputs, orig_sizes)
        if flipped:
            for result, orig_size in zip(results, orig_sizes):
                result["boxes"] = hflip_boxes(result["boxes"], orig_size[1])
        return results

    def __call__(self, model, samples, targets, results, views, amp="fp32"):
        """samples: the batch (NestedTensor) whose identity-pass `results` (PostProcess of the model's outputs) are
        given; targets: their "size" and "orig_size"; views: per image, the (uint8 image, TTAScale) list of
        datasets.tta.MultiScaleViews; amp: the precision the model's passes run in (util.amp; their detections
        and the merging are float32). Each further pass runs the batch's images together, as the identity pass.
        Returns the merged detections per image, on the CPU."""
        device = samples.tensors.device
        orig_sizes = torch.stack([t["orig_size"] for t in targets])  # [B, 2] (h, w)
        per_image = [[result] for result in results]
        if self.flip:
            identity = [image[:, :t["size"][0], :t["size"][1]] for image, t in zip(samples.tensors, targets)]
            for detections, result in zip(per_image, self._detect(model, identity, orig_sizes, True, amp)):
                detections.append(result)
        for scale_views in zip(*views):  # one scale, every image of the batch
            scale = scale_views[0][1]
            images = [view_to_input(view).to(device) for view, _ in scale_views]
            # original pixels -> pixels of each image's view, for the scale's size range
            to_view = torch.stack([torch.tensor([image.shape[2], image.shape[1]] * 2, device=device)
                                   for image in images]) / orig_sizes.flip(1).repeat(1, 2)  # [B, 4]
            for flipped in (False, True) if self.flip else (False,):
                for detections, result, ratios in zip(per_image, self._detect(model, images, orig_sizes, flipped, amp),
                                                      to_view):
                    keep = in_size_range(result["boxes"] * ratios, scale.object_min, scale.object_max)
                    detections.append({k: v[keep] for k, v in result.items()})
        return [merge_detections([{k: v.cpu() for k, v in d.items()} for d in detections], self.vote_iou,
                                 self.max_dets) for detections in per_image]
