"""Test-time augmentation: the scales an image is evaluated at, its resized copies, and the passes over them.

Upstream's multi-scale test (its pull request #15, after ATSS): besides the identity pass at the evaluation size,
the image is resized to shorter sides 400 ... 1800, and each scale keeps only the detections whose size
sqrt(w * h), measured in the pixels of that resized image, lies in the scale's range: small scales keep large
objects, large scales keep small ones. TestTimeAugmentation runs the passes (and their flips, mirrored back
exactly: x -> w - x) through the model; datasets/tta_merge.py filters and merges their detections. The model and
its PostProcess are arguments: nothing here imports models/.
"""
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F

from util import amp as mixed_precision
from util.arguments import UPSTREAM_EVAL_SIZE, UPSTREAM_TTA_RANGES, UPSTREAM_TTA_SCALES
from util.box_ops import hflip_boxes
from util.misc import nested_tensor_from_tensor_list

from . import transforms as T
from .tta_merge import in_size_range, merge_detections


class TTAScale(NamedTuple):
    """One resized pass: shorter side `scale`, longest side at most `max_size`; it keeps the detections with
    object_min <= sqrt(w * h) < object_max (pixels of the resized image)."""
    scale: int
    max_size: int
    object_min: float
    object_max: float


def default_object_range(scale, eval_size):
    """Upstream's range for `scale`, carried over to an evaluation size other than 800: the range of the upstream
    scale nearest to `scale` * 800 / eval_size, on the same side of the evaluation size, times eval_size / 800."""
    factor = eval_size / UPSTREAM_EVAL_SIZE
    side = [s for s in UPSTREAM_TTA_SCALES if (s < UPSTREAM_EVAL_SIZE) == (scale < eval_size)]
    nearest = min(side, key=lambda s: abs(s * factor - scale))
    low, high = UPSTREAM_TTA_RANGES[nearest]
    return low * factor, high * factor


def tta_scales(args):
    """The resized passes of --tta_scales (default upstream's), their ranges (--tta_ranges, default upstream's
    carried over by default_object_range) and longest sides (--max_size below the evaluation size, --tta_max_size
    from it up). The identity pass at the evaluation size is not among them. The flags are checked beforehand
    (util/arguments.py)."""
    scales = UPSTREAM_TTA_SCALES if args.tta_scales is None else args.tta_scales
    eval_size = T.evaluation_size(args.train_scales, args.val_scale)
    small_max = args.max_size or T.UPSTREAM_MAX_SIZE
    ranges = args.tta_ranges or [default_object_range(s, eval_size) for s in scales]
    return [TTAScale(s, small_max if s < eval_size else args.tta_max_size, low, high)
            for s, (low, high) in zip(scales, ranges, strict=True)]


def describe_scales(scales, eval_size, eval_max_size):
    """One line per pass: its size and the object sizes it keeps."""
    lines = [f"  {eval_size:>5} max {eval_max_size:>4}  identity pass, keeps every detection"]
    for s in scales:
        lines.append(f"  {s.scale:>5} max {s.max_size:>4}  keeps {s.object_min:g} <= sqrt(w*h) < {s.object_max:g} "
                     "(pixels of the resized image)")
    return lines


def view_to_input(view):
    """A resized view, uint8 [3, h, w], as the model's input: what ToTensor and Normalize make of it."""
    image, _ = T.Normalize()(F.to_dtype(view, torch.float32, scale=True))
    return image


class MultiScaleViews:
    """Wraps the evaluation transform: (PIL image, target) -> ((image, views), target), where image and target
    are the evaluation transform's and views lists (uint8 image [3, h, w], TTAScale) for every scale. The views
    stay uint8 (a quarter of the memory between loader workers and the evaluation loop); view_to_input finishes
    them."""

    def __init__(self, transform, scales):
        self.transform = transform
        self.scales = list(scales)

    def __call__(self, image, target):
        tensor, target = self.transform(image, target)
        views = [(F.pil_to_tensor(T.resize(image, {}, s.scale, s.max_size)[0]), s) for s in self.scales]
        return (tensor, views), target

    def __repr__(self):
        return f"{type(self).__name__}({self.transform!r}, scales={[s.scale for s in self.scales]})"


def collate_views(batch):
    """DataLoader collate of MultiScaleViews items -> (NestedTensor, tuple of targets, tuple of views lists)."""
    inputs, targets = zip(*batch)
    images, views = zip(*inputs)
    return nested_tensor_from_tensor_list(list(images)), targets, views


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
                   *T.eval_resize(args.train_scales, args.max_size, args.val_scale))

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
        MultiScaleViews; amp: the precision the model's passes run in (util.amp; their detections and the merging
        are float32). Each further pass runs the batch's images together, as the identity pass.
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
