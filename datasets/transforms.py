"""Joint image + target augmentations for detection, as in DETR / Deformable DETR.

Every transform takes and returns ``(image, target)``. Until ``ToTensor`` the image is a PIL image and
``target["boxes"]`` holds absolute xyxy boxes [N, 4]; ``Normalize`` turns the boxes into cxcywh
normalised by the image width and height.
"""
import random

import torch
import torchvision.transforms.v2.functional as F

from util.box_ops import box_xyxy_to_cxcywh, hflip_boxes

# the resize rule and the normalisation live in util.image_io, shared with the torch-free ONNX runtime path
from util.image_io import IMAGENET_MEAN, IMAGENET_STD, get_size_with_aspect_ratio  # noqa: F401

# Per-object fields that must be filtered together with the boxes.
INSTANCE_FIELDS = ("boxes", "labels", "area", "iscrowd")

UPSTREAM_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
UPSTREAM_MAX_SIZE = 1333


def _keep_instances(target, keep):
    """Filter every per-object field of ``target`` by the boolean mask ``keep`` [N]."""
    for field in INSTANCE_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return target


def crop(image, target, region):
    """Crop ``region = (top, left, height, width)``; boxes are shifted, clamped, and empty ones dropped."""
    top, left, height, width = region
    image = F.crop(image, top, left, height, width)
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
        corners = boxes.reshape(-1, 2, 2)  # [N, (top-left, bottom-right), (x, y)]
        corners = torch.min(corners, torch.as_tensor([width, height], dtype=torch.float32)).clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        _keep_instances(target, (corners[:, 1, :] > corners[:, 0, :]).all(dim=1))
    return image, target


def hflip(image, target):
    """Mirror the image left-right and the boxes with it."""
    width = image.width
    image = F.horizontal_flip(image)
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = hflip_boxes(target["boxes"], width)
    return image, target


def resize(image, target, size, max_size=None):
    """Resize so the shorter side is ``size`` (an int), or to exactly ``size = (h, w)``; boxes follow."""
    if isinstance(size, (list, tuple)):
        new_h, new_w = size
    else:
        new_h, new_w = get_size_with_aspect_ratio(image.size, size, max_size)
    old_w, old_h = image.size
    image = F.resize(image, [new_h, new_w])
    target = target.copy()
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the shorter side to a size drawn from ``sizes``, the longer side capped at ``max_size``."""

    def __init__(self, sizes, max_size=None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region whose width and height are drawn in [min_size, max_size] (and fit the image)."""

    def __init__(self, min_size, max_size):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        img_w, img_h = image.size
        crop_w = random.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        crop_h = random.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        top = random.randint(0, img_h - crop_h)
        left = random.randint(0, img_w - crop_w)
        return crop(image, target, (top, left, crop_h, crop_w))


class ResizeScale:
    """Large-scale jitter's resize: fit the image, aspect ratio kept, into size x size times a random scale drawn
    in [min_scale, max_scale] (detectron2's ResizeScale)."""

    def __init__(self, size, min_scale=0.1, max_scale=2.0):
        self.size = size
        self.min_scale = min_scale
        self.max_scale = max_scale

    def __call__(self, image, target):
        scale = random.uniform(self.min_scale, self.max_scale)
        img_w, img_h = image.size
        factor = scale * self.size / max(img_w, img_h)
        return resize(image, target, (max(1, round(img_h * factor)), max(1, round(img_w * factor))))


class FixedSizeCrop:
    """A random size x size crop (a side already shorter is kept whole); the batch padding, masked, fills up the
    rest (see make_coco_transforms)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, target):
        img_w, img_h = image.size
        crop_w, crop_h = min(img_w, self.size), min(img_h, self.size)
        top = random.randint(0, img_h - crop_h)
        left = random.randint(0, img_w - crop_w)
        return crop(image, target, (top, left, crop_h, crop_w))


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p=0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]."""

    def __call__(self, image, target):
        return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), target


class Normalize:
    """Standardise the image channels and turn boxes into cxcywh normalised by (w, h)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image, target=None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        height, width = image.shape[-2:]
        if "boxes" in target:
            boxes = box_xyxy_to_cxcywh(target["boxes"])
            target["boxes"] = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        lines = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({lines}\n)"


def evaluation_size(scales=None, val_size=None):
    """Shorter side at evaluation: ``val_size``, else the largest training scale (800 upstream)."""
    return val_size or max(scales or UPSTREAM_TRAIN_SCALES)


def eval_resize(scales=None, max_size=None, val_size=None):
    """(shorter side, longer-side cap) of the evaluation resize for these settings (upstream's: 800, 1333)."""
    return evaluation_size(scales, val_size), max_size or UPSTREAM_MAX_SIZE


def make_coco_transforms(image_set, scales=None, max_size=None, val_size=None, crop=True, lsj=None):
    """Upstream's augmentation recipe, with sizes that can be scaled down for small images.

    scales:   shorter-side sizes drawn at training (default upstream's 480..800 step 32).
    max_size: cap on the longer side (default 1333).
    val_size: shorter side at evaluation (default the largest training scale, 800 upstream).
    crop:     whether training may take the resize-crop-resize branch. Its sizes are upstream's
              ([400, 500, 600] then a 384..600 crop for scales up to 800) scaled by max(scales) / 800.
    lsj:      a size S for large-scale jitter at training instead (ViTDet's recipe): flip, resize to fit a random
              0.1-2.0 of S x S, random S x S crop; the loader pads the batch to S x S (utils.collate_fn with
              pad_to), the padding masked as any batch padding. Evaluation is unchanged.
    """
    if lsj is not None and (scales or not crop):
        raise ValueError("--lsj replaces the multi-scale training resize and crop: drop --train_scales and "
                         "--no_crop_augment (--val_scale and --max_size still set the evaluation size)")
    scales = list(scales) if scales else list(UPSTREAM_TRAIN_SCALES)
    val_size, max_size = eval_resize(scales, max_size, val_size)
    normalize = Compose([ToTensor(), Normalize()])

    if image_set == "train" and lsj is not None:
        return Compose([RandomHorizontalFlip(), ResizeScale(lsj, 0.1, 2.0), FixedSizeCrop(lsj), normalize])
    if image_set == "train":
        resize_only = RandomResize(scales, max_size=max_size)
        if crop:
            factor = max(scales) / 800
            crop_then_resize = Compose([
                RandomResize([round(s * factor) for s in (400, 500, 600)]),
                RandomSizeCrop(round(384 * factor), round(600 * factor)),
                RandomResize(scales, max_size=max_size),
            ])
            resize_step = RandomSelect(resize_only, crop_then_resize)
        else:
            resize_step = resize_only
        return Compose([RandomHorizontalFlip(), resize_step, normalize])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
