"""Test-time augmentation, image side: the scales an image is evaluated at, and its resized copies.

Upstream's multi-scale test (its pull request #15, after ATSS): besides the identity pass at the evaluation size,
the image is resized to shorter sides 400 ... 1800, and each scale keeps only the detections whose size
sqrt(w * h), measured in the pixels of that resized image, lies in the scale's range: small scales keep large
objects, large scales keep small ones. models/tta.py runs the passes (and their flips) and merges them.
"""
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F

from util.arguments import UPSTREAM_EVAL_SIZE, UPSTREAM_TTA_RANGES, UPSTREAM_TTA_SCALES
from util.misc import nested_tensor_from_tensor_list

from . import transforms as T


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
