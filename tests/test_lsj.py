"""Large-scale jitter (--lsj): the resize, the crop, the whole training recipe, and batches padded to S x S."""
import random

import pytest
import torch
from test_transforms import (
    IMAGE_H,
    IMAGE_W,
    assert_boxes_match_pixels,
    make_sample,
    pil_pixels,
    tensor_to_pixels_and_boxes,
)

import datasets.transforms as T
import main as project_main
from datasets.synthetic import make_synthetic_coco
from util.arguments import argument_problems, check_args
from util.misc import collate_fn


@pytest.mark.parametrize("seed", range(6))
def test_resize_scale_fits_a_random_fraction_of_the_square(seed):
    random.seed(seed)
    image, target = make_sample()
    out, out_target = T.ResizeScale(100, 0.1, 2.0)(image, target)
    random.seed(seed)
    scale = random.uniform(0.1, 2.0)
    assert max(out.size) == round(100 * scale)  # the longer side (width here) fills the scaled square
    assert out.size[1] == round(IMAGE_H * 100 * scale / IMAGE_W)
    assert_boxes_match_pixels(pil_pixels(out), out_target["boxes"], out_target["labels"], tol=1.5)
    assert out_target["size"].tolist() == [out.size[1], out.size[0]]


@pytest.mark.parametrize("seed", range(6))
def test_fixed_size_crop(seed):
    random.seed(seed)
    image, target = make_sample()  # 120 x 90
    out, out_target = T.FixedSizeCrop(64)(image, target)
    assert out.size == (64, 64)
    assert_boxes_match_pixels(pil_pixels(out), out_target["boxes"], out_target["labels"], tol=0)
    whole, whole_target = T.FixedSizeCrop(100)(image, target)  # height already shorter: kept whole
    assert whole.size == (100, 90)
    assert_boxes_match_pixels(pil_pixels(whole), whole_target["boxes"], whole_target["labels"], tol=0)


def test_training_recipe_sizes_vary_and_stay_within_the_square():
    transform = T.make_coco_transforms("train", lsj=64)
    sizes = set()
    for seed in range(40):
        random.seed(seed)
        image, target = transform(*make_sample())
        assert image.shape[1] <= 64 and image.shape[2] <= 64
        pixels, boxes = tensor_to_pixels_and_boxes(image, target)
        assert_boxes_match_pixels(pixels, boxes, target["labels"], tol=2.0)
        sizes.add(tuple(image.shape[1:]))
    assert len(sizes) > 10 and (64, 64) in sizes and min(min(s) for s in sizes) < 20


def test_evaluation_is_unchanged_and_flags_conflict():
    image, target = make_sample()
    plain = T.make_coco_transforms("val", max_size=200, val_size=64)(image, target)
    jittered = T.make_coco_transforms("val", max_size=200, val_size=64, lsj=1024)(image, target)
    assert torch.equal(plain[0], jittered[0])
    with pytest.raises(ValueError, match="--train_scales"):
        T.make_coco_transforms("train", scales=[64], lsj=64)
    with pytest.raises(ValueError, match="--no_crop_augment"):
        T.make_coco_transforms("train", crop=False, lsj=64)


def test_flag():
    parser = project_main.get_args_parser()
    assert parser.parse_args([]).lsj is None
    assert parser.parse_args(["--lsj"]).lsj == 1024
    assert parser.parse_args(["--lsj", "512", "--backbone", "vit_base"]).lsj == 512
    assert parser.parse_args(["--lsj", "--backbone", "vit_base"]).lsj == 1024


@pytest.mark.parametrize("size", [0, -64])
def test_a_size_that_is_not_positive_is_refused_naming_the_flag(size):
    """--lsj 0 made 0 x 0 images, --lsj -64 an error naming no flag."""
    args = project_main.get_args_parser().parse_args(["--lsj", str(size)])
    assert argument_problems(args) == [f"--lsj must be > 0 (the square's side, pixels), got {size}"]
    with pytest.raises(ValueError, match=rf"^bad flag values: --lsj must be > 0 .*, got {size}$"):
        check_args(args)


def test_collate_pads_to_the_square_and_masks_the_padding():
    batch = [(torch.randn(3, 30, 50), {}), (torch.randn(3, 64, 20), {})]
    samples, _ = collate_fn(batch, pad_to=64)
    assert samples.tensors.shape == (2, 3, 64, 64)
    assert torch.equal(samples.tensors[0, :, :30, :50], batch[0][0]) and not samples.tensors[0, :, 30:].any()
    assert samples.mask[0, :30, :50].logical_not().all()
    assert samples.mask[0, 30:].all() and samples.mask[0, :, 50:].all()
    assert samples.mask[1, :, :20].logical_not().all() and samples.mask[1, :, 20:].all()
    assert collate_fn(batch)[0].tensors.shape == (2, 3, 64, 50)  # without pad_to: the largest sizes


def test_training_loader_gives_square_batches(tmp_path):
    make_synthetic_coco(tmp_path, num_train=4, num_val=2, image_size=80, seed=1)
    args = project_main.get_args_parser().parse_args(
        ["--coco_path", str(tmp_path), "--lsj", "96", "--batch_size", "2", "--num_workers", "0", "--val_scale", "80",
         "--device", "cpu"])
    args.num_classes = project_main.num_classes_of(args)
    from datasets import build_dataset

    args.distributed = False
    _, train, val = project_main.make_loaders(args, build_dataset("train", args), build_dataset("val", args))
    for samples, targets in train:
        assert samples.tensors.shape[-2:] == (96, 96)
        for mask, target in zip(samples.mask, targets):
            h, w = target["size"].tolist()
            assert h <= 96 and w <= 96 and mask.sum() == 96 * 96 - h * w
    samples, targets = next(iter(val))  # evaluation: shorter side --val_scale, padded to the batch's largest only
    sizes = torch.stack([t["size"] for t in targets])
    assert sizes.min(1).values.tolist() == [80, 80] and list(samples.tensors.shape[-2:]) == sizes.max(0).values.tolist()
