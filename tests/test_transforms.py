"""Detection transforms keep boxes on the pixels they describe."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import datasets.transforms as T
from util.box_ops import box_cxcywh_to_xyxy

# label -> pure colour of its rectangle; rectangles do not overlap
COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
RECTS = {1: (10, 8, 50, 40), 2: (60, 30, 110, 85), 3: (20, 55, 45, 80)}  # xyxy, exclusive right/bottom
IMAGE_W, IMAGE_H = 120, 90


def make_sample():
    image = Image.new("RGB", (IMAGE_W, IMAGE_H), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for label, (x0, y0, x1, y1) in RECTS.items():
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLORS[label])
    boxes = torch.tensor([RECTS[k] for k in sorted(RECTS)], dtype=torch.float32)
    target = {
        "boxes": boxes,
        "labels": torch.tensor(sorted(RECTS), dtype=torch.int64),
        "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
        "iscrowd": torch.zeros(len(RECTS), dtype=torch.int64),
        "size": torch.tensor([IMAGE_H, IMAGE_W]),
    }
    return image, target


def colour_pixel_box(pixels, label):
    """xyxy box (exclusive end) of the pixels where ``label``'s channel dominates, or None. pixels: [H, W, 3]."""
    channel = COLORS[label].index(255)
    others = [c for c in range(3) if c != channel]
    hit = (pixels[..., channel] > 127) & (pixels[..., others].max(-1) < 128)
    ys, xs = np.nonzero(hit)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def assert_boxes_match_pixels(pixels, boxes, labels, tol):
    """Every box sits on its rectangle's pixels (within ``tol`` px), and every visible rectangle has its box."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = [int(x) for x in labels]
    assert len(set(labels)) == len(labels)
    for label in COLORS:
        pixel_box = colour_pixel_box(pixels, label)
        if label in labels:
            assert pixel_box is not None, f"box kept for label {label} whose pixels are gone"
            np.testing.assert_allclose(boxes[labels.index(label)], pixel_box, atol=tol,
                                       err_msg=f"label {label}")
        elif pixel_box is not None:
            # a dropped box may only leave a sliver of pixels (zero area after rounding)
            width, height = pixel_box[2:] - pixel_box[:2]
            assert min(width, height) <= tol, f"label {label} visible but its box was dropped"


def pil_pixels(image):
    return np.asarray(image).astype(np.int64)


def tensor_to_pixels_and_boxes(image, target):
    """Undo Normalize: image tensor [3, H, W] -> [H, W, 3] 0..255 and boxes -> absolute xyxy."""
    mean = torch.tensor(T.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(T.IMAGENET_STD)[:, None, None]
    pixels = ((image * std + mean) * 255).round().permute(1, 2, 0).numpy()
    height, width = image.shape[-2:]
    boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
    return pixels, boxes.numpy()


def test_flip_is_exact():
    image, target = make_sample()
    image, target = T.hflip(image, target)
    assert_boxes_match_pixels(pil_pixels(image), target["boxes"], target["labels"], tol=0)


@pytest.mark.parametrize("region", [(0, 0, IMAGE_H, IMAGE_W), (20, 30, 50, 60), (5, 15, 40, 40), (50, 0, 40, 70)])
def test_crop_clamps_and_drops(region):
    image, target = make_sample()
    image, target = T.crop(image, target, region)
    assert image.size == (region[3], region[2])
    assert target["size"].tolist() == [region[2], region[3]]
    assert len(target["boxes"]) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
    assert_boxes_match_pixels(pil_pixels(image), target["boxes"], target["labels"], tol=0)
    widths_heights = target["boxes"][:, 2:] - target["boxes"][:, :2]
    torch.testing.assert_close(target["area"], widths_heights.prod(1))


def test_crop_without_objects_gives_empty_target():
    image, target = make_sample()
    image, target = T.crop(image, target, (0, 112, 90, 8))  # a strip right of every rectangle
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,)
    image, target = T.Compose([T.ToTensor(), T.Normalize()])(image, target)
    assert target["boxes"].shape == (0, 4)


@pytest.mark.parametrize("size,max_size", [(45, None), (180, None), (200, 240), (64, 100)])
def test_resize_keeps_boxes_on_pixels(size, max_size):
    image, target = make_sample()
    image, target = T.resize(image, target, size, max_size)
    out_h, out_w = target["size"].tolist()
    assert image.size == (out_w, out_h)
    assert max_size is None or max(out_h, out_w) <= max_size
    assert_boxes_match_pixels(pil_pixels(image), target["boxes"], target["labels"], tol=1.5)


def test_get_size_with_aspect_ratio_follows_detr():
    assert T.get_size_with_aspect_ratio((640, 480), 800, 1333) == (800, 1066)
    assert T.get_size_with_aspect_ratio((480, 640), 800, 1333) == (1066, 800)
    assert T.get_size_with_aspect_ratio((1000, 500), 800, 1333) == (666, 1332)  # capped by max_size
    assert T.get_size_with_aspect_ratio((800, 600), 600, 1333) == (600, 800)  # already at size


@pytest.mark.parametrize("image_set", ["train", "val"])
@pytest.mark.parametrize("width, height", [(4000, 1), (1, 4000)])
def test_an_image_thinner_than_one_to_twice_max_size_is_one_pixel_across(image_set, width, height):
    """Upstream's size for a 4000x1 image at 800 / 1333 is 0 pixels across, and the resize fails; it is 1 pixel
    across and max_size along, its box still on it."""
    long_first = (1, 1333) if width > height else (1333, 1)
    assert T.get_size_with_aspect_ratio((width, height), 800, 1333) == long_first
    image = Image.new("RGB", (width, height), "white")
    target = {"boxes": torch.tensor([[0.0, 0.0, width, height]]), "labels": torch.tensor([1]),  # any crop keeps it
              "area": torch.tensor([width * height]), "iscrowd": torch.tensor([0]),
              "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}
    random.seed(0)
    tensor, out = T.make_coco_transforms(image_set)(image, target)
    assert 1 <= min(tensor.shape[1:]) and max(tensor.shape[1:]) <= 1333
    assert out["boxes"].shape == (1, 4) and bool(((out["boxes"] >= 0) & (out["boxes"] <= 1)).all())


def test_random_resize_bounds():
    random.seed(0)
    image, target = make_sample()
    for _ in range(10):
        out_image, out_target = T.RandomResize([40, 60, 80], max_size=100)(image, target)
        assert min(out_image.size) in (40, 60, 80) or max(out_image.size) >= 99
        assert max(out_image.size) <= 100


def test_normalize_gives_unit_cxcywh():
    image, target = make_sample()
    image, target = T.Compose([T.ToTensor(), T.Normalize()])(image, target)
    assert image.dtype == torch.float32 and image.shape == (3, IMAGE_H, IMAGE_W)
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32
    assert ((boxes >= 0) & (boxes <= 1)).all()
    x0, y0, x1, y1 = RECTS[1]
    expected = torch.tensor([(x0 + x1) / 2 / IMAGE_W, (y0 + y1) / 2 / IMAGE_H,
                             (x1 - x0) / IMAGE_W, (y1 - y0) / IMAGE_H])
    torch.testing.assert_close(boxes[0], expected)


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_full_pipeline_keeps_boxes_on_pixels(image_set):
    transforms = T.make_coco_transforms(image_set, scales=[64, 80, 96, 112], max_size=160)
    random.seed(1)
    for _ in range(12):
        image, target = transforms(*make_sample())
        assert image.shape[1:] == tuple(target["size"].tolist())
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        pixels, boxes = tensor_to_pixels_and_boxes(image, target)
        assert_boxes_match_pixels(pixels, boxes, target["labels"], tol=2.0)
        if image_set == "val":
            assert min(image.shape[1:]) == 112


def test_upstream_defaults():
    train = T.make_coco_transforms("train")
    resize_only = train.transforms[1].first
    assert resize_only.sizes == list(range(480, 801, 32)) and resize_only.max_size == 1333
    crop_branch = train.transforms[1].second.transforms
    assert crop_branch[0].sizes == [400, 500, 600]
    assert (crop_branch[1].min_size, crop_branch[1].max_size) == (384, 600)
    val = T.make_coco_transforms("val")
    assert val.transforms[0].sizes == [800] and val.transforms[0].max_size == 1333
    with pytest.raises(ValueError, match="image_set"):
        T.make_coco_transforms("test")
