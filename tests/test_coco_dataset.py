"""COCO-format dataset reader, dataset builder, samplers and prefetcher on a tiny synthetic set."""
import json
import os
import re
import shutil
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from datasets import build_dataset, check_same_categories, get_coco_api_from_dataset
from datasets.coco import CocoDetection, num_classes_from_annotations
from datasets.data_prefetcher import data_prefetcher
from datasets.samplers import DistributedSampler, NodeDistributedSampler
from datasets.synthetic import make_synthetic_coco
from util.misc import NestedTensor, collate_fn

NUM_TRAIN, NUM_VAL = 5, 3


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, NUM_TRAIN, NUM_VAL, image_size=64, seed=3)
    return root


@pytest.fixture
def root_copy(synthetic_root, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(synthetic_root, tmp_path / "coco")


def make_args(root, **overrides):
    args = dict(dataset_file="coco", coco_path=str(root), cache_mode=False, eval_in_training_set=False,
                train_scales=[48, 64], val_scale=64, max_size=100)
    args.update(overrides)
    return SimpleNamespace(**args)


def load_json(root, split):
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def write_json(root, split, data):
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def test_items_have_expected_fields(synthetic_root):
    for image_set in ("train", "val"):
        dataset = build_dataset(image_set, make_args(synthetic_root))
        assert len(dataset) == (NUM_TRAIN if image_set == "train" else NUM_VAL)
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
            assert set(target) == {"boxes", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
            num = len(target["labels"])
            assert target["boxes"].shape == (num, 4) and target["boxes"].dtype == torch.float32
            assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
            assert target["labels"].dtype == torch.int64
            assert ((target["labels"] >= 1) & (target["labels"] <= 6)).all()
            assert target["area"].shape == (num,) and target["iscrowd"].shape == (num,)
            assert target["image_id"].tolist() == [dataset.ids[index]]
            info = dataset.coco.imgs[dataset.ids[index]]
            assert target["orig_size"].tolist() == [info["height"], info["width"]]
            assert target["size"].tolist() == list(image.shape[1:])


def test_val_boxes_match_annotations(synthetic_root):
    dataset = build_dataset("val", make_args(synthetic_root))
    image, target = dataset[0]
    anns = dataset.coco.imgToAnns[dataset.ids[0]]
    height, width = target["orig_size"].tolist()
    expected = torch.tensor([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                             for x, y, w, h in (a["bbox"] for a in anns)])
    torch.testing.assert_close(target["boxes"], expected, atol=1e-2, rtol=0)
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    assert min(image.shape[1:]) == 64


def test_eval_in_training_set_and_coco_api(synthetic_root):
    dataset = build_dataset("val", make_args(synthetic_root, eval_in_training_set=True))
    assert len(dataset) == NUM_TRAIN
    coco = get_coco_api_from_dataset(Subset(Subset(dataset, [0, 1, 2]), [0]))
    assert coco is dataset.coco
    assert num_classes_from_annotations(synthetic_root / "annotations" / "instances_train2017.json") == 7


def test_unsupported_dataset_files(synthetic_root):
    with pytest.raises(ValueError, match="not supported"):
        build_dataset("train", make_args(synthetic_root, dataset_file="coco_panoptic"))
    with pytest.raises(ValueError, match="coco"):
        build_dataset("train", make_args(synthetic_root, dataset_file="voc"))


def test_missing_coco_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("train", make_args(missing))


def test_missing_annotation_file(root_copy):
    (root_copy / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build_dataset("val", make_args(root_copy))
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        num_classes_from_annotations(root_copy / "annotations" / "instances_val2017.json")


def test_missing_image_file(root_copy):
    dataset = build_dataset("val", make_args(root_copy))
    file_name = dataset.coco.imgs[dataset.ids[1]]["file_name"]
    (root_copy / "val2017" / file_name).unlink()
    dataset[0]
    with pytest.raises(FileNotFoundError, match=file_name):
        dataset[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_file(root_copy, damage):
    dataset = build_dataset("val", make_args(root_copy))
    path = root_copy / "val2017" / dataset.coco.imgs[dataset.ids[0]]["file_name"]
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises((RuntimeError, OSError), match=f"cannot decode image .*{path.name}"):
        dataset[0]


@pytest.mark.filterwarnings("ignore:.*boxes:datasets.coco_file.AnnotationWarning")  # the boxes outside, on purpose
@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
def test_an_image_that_fails_to_transform_is_named_in_the_loaders_error(synthetic_root):
    """Any error of the transforms (an odd image the pipeline cannot take) names the image's id and file, also
    when raised in a DataLoader worker."""
    dataset = build_dataset("train", make_args(synthetic_root))

    def failing(image, target):
        raise ValueError("height and width must be > 0")

    dataset.transforms = failing
    image_id = dataset.ids[2]
    info = dataset.coco.imgs[image_id]
    note = (f"while transforming image {image_id} ({synthetic_root / 'train2017' / info['file_name']}, "
            f"{info['width']}x{info['height']})")
    with pytest.raises(ValueError) as raised:
        dataset[2]
    assert raised.value.__notes__ == [note]
    loader = DataLoader(Subset(dataset, [2]), batch_size=1, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(ValueError, match=re.escape(note)):
        next(iter(loader))


def test_image_without_annotations_crowd_and_clamping(root_copy):
    data = load_json(root_copy, "val")
    first, second = data["images"][0], data["images"][1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first["id"]]
    width = second["width"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != second["id"]] + [
        {"id": 1001, "image_id": second["id"], "category_id": 2, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 1002, "image_id": second["id"], "category_id": 3, "bbox": [width - 10, -5, 30, 20], "area": 300,
         "iscrowd": 0},
        {"id": 1003, "image_id": second["id"], "category_id": 4, "bbox": [width + 5, 5, 10, 10], "area": 100,
         "iscrowd": 0},  # entirely outside: degenerate after clamping
    ]
    write_json(root_copy, "val", data)
    dataset = build_dataset("val", make_args(root_copy))
    image, target = dataset[dataset.ids.index(first["id"])]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert image.shape[0] == 3

    raw = CocoDetection(root_copy / "val2017", root_copy / "annotations" / "instances_val2017.json")
    image, target = raw[raw.ids.index(second["id"])]
    assert target["labels"].tolist() == [3]
    assert target["boxes"].tolist() == [[width - 10, 0, width, 15]]


def test_cache_mode(root_copy):
    dataset = build_dataset("train", make_args(root_copy, cache_mode=True))
    assert len(dataset.cache) == NUM_TRAIN
    first = dataset.coco.imgs[dataset.ids[0]]["file_name"]
    (root_copy / "train2017" / first).unlink()
    image, target = dataset[0]  # served from memory
    assert image.shape[0] == 3

    ann_file = root_copy / "annotations" / "instances_val2017.json"
    odd_rank = CocoDetection(root_copy / "val2017", ann_file, cache_mode=True, local_rank=1, local_size=2)
    assert sorted(odd_rank.cache) == [odd_rank.ids[i] for i in range(NUM_VAL) if i % 2 == 1]


def test_distributed_sampler_splits_and_pads():
    dataset = list(range(11))
    samplers = [DistributedSampler(dataset, num_replicas=3, rank=r) for r in range(3)]
    shares = [list(s) for s in samplers]
    assert [len(s) for s in shares] == [4, 4, 4]
    assert set(sum(shares, [])) == set(dataset)
    epoch0 = shares[0]
    for s in samplers:
        s.set_epoch(1)
    assert list(samplers[0]) != epoch0
    assert set(sum((list(s) for s in samplers), [])) == set(dataset)
    ordered = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    assert list(ordered) == [6, 7, 8, 9, 10, 0]


def test_node_sampler_uses_cached_indices_only():
    dataset = list(range(10))
    # 2 nodes x 2 local ranks
    seen = []
    for rank in range(4):
        sampler = NodeDistributedSampler(dataset, num_replicas=4, rank=rank, local_rank=rank % 2, local_size=2)
        indices = list(sampler)
        assert len(indices) == len(sampler) == 3
        assert all(i % 2 == rank % 2 for i in indices)
        seen += indices
    assert set(seen) == set(dataset)


def test_loader_and_cpu_prefetcher(synthetic_root):
    dataset = build_dataset("train", make_args(synthetic_root))
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn, num_workers=0)
    prefetcher = data_prefetcher(loader, torch.device("cpu"), prefetch=True)
    batches = 0
    samples, targets = prefetcher.next()
    while samples is not None:
        assert isinstance(samples, NestedTensor)
        assert samples.tensors.shape[0] == len(targets) and samples.mask.shape[0] == len(targets)
        assert all(isinstance(t, dict) and t["boxes"].device.type == "cpu" for t in targets)
        batches += 1
        samples, targets = prefetcher.next()
    assert batches == 3


def test_image_mode_is_rgb(root_copy):
    """Greyscale or palette files are read as 3 channels."""
    dataset = build_dataset("val", make_args(root_copy))
    path = root_copy / "val2017" / dataset.coco.imgs[dataset.ids[0]]["file_name"]
    Image.open(path).convert("L").save(path, format="JPEG")
    image, _ = dataset[0]
    assert image.shape[0] == 3


# ------------------------------------------------------------------------------------------ layout and file names


@pytest.mark.parametrize("where", ["train2017", "annotations", "parent"])
def test_a_coco_path_with_the_wrong_layout_names_the_layout_and_the_right_folder(root_copy, where):
    coco_path = root_copy.parent if where == "parent" else root_copy / where
    with pytest.raises(FileNotFoundError, match=rf"--coco_path {coco_path} does not have COCO's layout \(train2017/, "
                                                r"val2017/, annotations/instances_train2017\.json, .*not found; it "
                                                rf"holds .*; did you mean --coco_path {root_copy}\?"):
        build_dataset("train", make_args(coco_path))
    # main.py reads the categories first: the same message
    with pytest.raises(FileNotFoundError, match=rf"did you mean --coco_path {root_copy}\?"):
        num_classes_from_annotations(coco_path / "annotations" / "instances_train2017.json")


def test_a_layout_missing_one_split_names_what_is_missing(root_copy):
    shutil.rmtree(root_copy / "val2017")
    build_dataset("train", make_args(root_copy))  # the training split is complete
    with pytest.raises(FileNotFoundError, match=r"val2017/ not found; it holds annotations/, manifest\.json, "
                                                r"train2017/$"):
        build_dataset("val", make_args(root_copy))


def test_file_names_that_include_the_image_folder_get_a_hint(root_copy):
    data = load_json(root_copy, "val")
    for image in data["images"]:
        image["file_name"] = "val2017/" + image["file_name"]
    write_json(root_copy, "val", data)
    with pytest.raises(FileNotFoundError, match=r"3 of the 3 images listed .* are not in .*val2017, e\.g\. "
                                                r"val2017/.*\(found under .* instead: file_name is relative to the "
                                                r"image folder val2017/\)"):
        build_dataset("val", make_args(root_copy))


def test_a_folder_or_a_broken_link_in_place_of_an_image_is_refused_at_start(root_copy, tmp_path):
    folder = root_copy / "val2017"
    names = [image["file_name"] for image in sorted(load_json(root_copy, "val")["images"], key=lambda i: i["id"])]
    (folder / names[0]).unlink()
    (folder / names[0]).mkdir()
    (folder / names[1]).unlink()
    os.symlink(tmp_path / "nowhere.jpg", folder / names[1])
    shutil.move(folder / names[2], tmp_path / names[2])  # a link to an image elsewhere is an image
    os.symlink(tmp_path / names[2], folder / names[2])
    with pytest.raises(FileNotFoundError, match=rf"^2 of the 3 images listed in .*instances_val2017\.json are not in "
                                                rf".*val2017, e\.g\. {re.escape(names[0])} \(a folder\), "
                                                rf"{re.escape(names[1])} \(a broken link\)$"):
        build_dataset("val", make_args(root_copy))
    data = load_json(root_copy, "val")
    data["images"] = [i for i in data["images"] if i["file_name"] == names[2]]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    write_json(root_copy, "val", data)
    assert build_dataset("val", make_args(root_copy))[0][0].shape[0] == 3


def test_category_ids_named_differently_by_the_two_files_are_refused(root_copy):
    """Training learns the training file's categories; evaluation would score them against other ones."""
    data = load_json(root_copy, "val")
    names = {c["id"]: c["name"] for c in data["categories"]}
    for category in data["categories"]:
        category["name"] = {2: names[3], 3: names[2]}.get(category["id"], category["name"])
    write_json(root_copy, "val", data)
    train, val = build_dataset("train", make_args(root_copy)), build_dataset("val", make_args(root_copy))
    with pytest.raises(ValueError, match=rf"^.*instances_train2017\.json and .*instances_val2017\.json give 2 "
                                         rf'category ids different names \(id 2: "{names[2]}" in '
                                         rf'instances_train2017\.json, "{names[3]}" in instances_val2017\.json; id 3: '
                                         rf'"{names[3]}" in instances_train2017\.json, "{names[2]}" in '):
        check_same_categories(Subset(train, [0]), val)
    check_same_categories(None, val)  # evaluation only: nothing to compare
    # an id in one file only is fine: a validation file without category 6, with a category 7
    data["categories"] = [dict(c, name=names[c["id"]]) for c in data["categories"] if c["id"] != 6]
    data["categories"].append({"id": 7, "name": "star"})
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 6]
    write_json(root_copy, "val", data)
    check_same_categories(train, build_dataset("val", make_args(root_copy)))


def test_category_names_under_other_ids_are_refused(root_copy):
    """The same categories numbered otherwise (ids 1..6 in training, 11..16 in validation; with a --num_classes
    that holds both): every detection would carry the training id, and AP was 0 without a word."""
    train = build_dataset("train", make_args(root_copy, num_classes=17))
    data = load_json(root_copy, "val")
    names = {c["id"]: c["name"] for c in data["categories"]}
    for category in data["categories"]:
        category["id"] += 10
    for annotation in data["annotations"]:
        annotation["category_id"] += 10
    write_json(root_copy, "val", data)
    val = build_dataset("val", make_args(root_copy, num_classes=17))
    with pytest.raises(ValueError, match=rf"give {len(names)} category names different ids \("
                                         rf'"{names[1]}": id 1 in instances_train2017\.json, 11 in '
                                         rf"instances_val2017\.json; "):
        check_same_categories(train, val)


# ------------------------------------------------------------------------------------------ EXIF orientation and modes


def stored_and_displayed(width=40, height=24):
    """An image with distinct corners (as stored), and what orientation 6 (turn 90 degrees clockwise) displays."""
    import numpy as np

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)  # red top-left
    pixels[: height // 2, width // 2:] = (0, 255, 0)  # green top-right
    pixels[height // 2:, : width // 2] = (0, 0, 255)  # blue bottom-left
    stored = Image.fromarray(pixels)
    return stored, stored.transpose(Image.Transpose.ROTATE_270)


def save_with_orientation(image, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    image.save(path, format="JPEG", quality=98, subsampling=0, exif=exif.tobytes())


def use_one_oriented_image(root, split, width, height, box):
    """The split lists one image (its first file, to be overwritten) of the given size with one box; its path."""
    data = load_json(root, split)
    image = dict(data["images"][0], width=width, height=height)
    data["images"] = [image]
    data["annotations"] = [{"id": 1, "image_id": image["id"], "category_id": 1, "bbox": box, "area": box[2] * box[3],
                            "iscrowd": 0}]
    write_json(root, split, data)
    return root / f"{split}2017" / image["file_name"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_exif_orientation_is_applied_and_boxes_are_on_the_displayed_image(root_copy, split):
    import numpy as np

    stored, displayed = stored_and_displayed()
    # the red quarter, which is the top-right one as displayed: x 12..24, y 0..20 of a 24 x 40 image
    path = use_one_oriented_image(root_copy, split, 24, 40, [12, 0, 12, 20])
    save_with_orientation(stored, path, 6)
    dataset = CocoDetection(root_copy / f"{split}2017", root_copy / "annotations" / f"instances_{split}2017.json")
    image, target = dataset[0]
    assert image.size == (24, 40) and target["orig_size"].tolist() == [40, 24]
    assert np.abs(np.asarray(image, dtype=float) - np.asarray(displayed, dtype=float)).mean() < 3
    x0, y0, x1, y1 = target["boxes"][0].int().tolist()
    assert (x0, y0, x1, y1) == (12, 0, 24, 20)
    region = np.asarray(image)[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3).mean(0)
    assert region[0] > 200 and region[1] < 40 and region[2] < 40  # the box holds the red quarter
    # and through the transforms training / evaluation use (no random crop, which could make it landscape)
    item, _ = build_dataset(split, make_args(root_copy, no_crop_augment=True))[0]
    assert item.shape[1] > item.shape[2]  # portrait, as displayed


def test_every_exif_orientation_decodes_to_the_displayed_image():
    import io

    import numpy as np

    from util.image_io import decode_image

    stored, _ = stored_and_displayed()
    transposes = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
    for orientation, transpose in transposes.items():
        buffer = io.BytesIO()
        save_with_orientation(stored, buffer, orientation)
        decoded = decode_image(buffer.getvalue(), f"o{orientation}.jpg")
        expected = stored if transpose is None else stored.transpose(transpose)
        assert decoded.size == expected.size, orientation
        assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(expected, dtype=float)).mean() < 3, orientation


def test_a_size_other_than_the_annotation_files_is_an_error_naming_the_file(root_copy):
    stored, _ = stored_and_displayed()
    path = use_one_oriented_image(root_copy, "val", 40, 24, [0, 0, 10, 10])  # the stored size, not the displayed
    save_with_orientation(stored, path, 6)
    dataset = build_dataset("val", make_args(root_copy))
    with pytest.raises(ValueError, match=rf"image .*{path.name} is 24 x 40 pixels as displayed \(EXIF orientation "
                                         r"applied\), but .*instances_val2017\.json gives image \d+ width 40, height "
                                         r"24 \(swapped: were the boxes drawn on the stored pixels"):
        dataset[0]
    Image.new("RGB", (30, 30)).save(path, format="JPEG")  # another size altogether
    with pytest.raises(ValueError, match=r"is 30 x 30 pixels as displayed .* width 40, height 24$"):
        dataset[0]


@pytest.mark.parametrize("mode, suffix", [("CMYK", ".jpg"), ("RGBA", ".png"), ("LA", ".png"), ("P", ".png"),
                                          ("I;16", ".png")])
def test_images_of_other_modes_are_read_as_rgb_through_the_dataset(root_copy, mode, suffix):
    data = load_json(root_copy, "val")
    first = data["images"][0]
    path = root_copy / "val2017" / first["file_name"]
    image = Image.open(path).convert("L" if mode == "I;16" else "RGB")
    if mode == "I;16":
        import numpy as np

        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    first["file_name"] = path.stem + suffix
    image.save(root_copy / "val2017" / first["file_name"])
    write_json(root_copy, "val", data)
    item, target = build_dataset("val", make_args(root_copy))[0]
    assert item.shape[0] == 3 and target["orig_size"].tolist() == [first["height"], first["width"]]
    assert 0.05 < float(item.std()) < 10


def test_training_images_with_more_objects_than_queries_are_reported(synthetic_root):
    """One-to-one matching pairs at most one object with each query: the rest trained as background, unsaid."""
    objects = {}
    for ann in load_json(synthetic_root, "train")["annotations"]:
        objects[ann["image_id"]] = objects.get(ann["image_id"], 0) + 1
    most = max(objects.values())
    dense = sum(count == most for count in objects.values())
    with pytest.warns(UserWarning, match=rf"instances_train2017\.json: {dense} training images have more objects than "
                                         rf"the {most - 1} one-to-one queries \(--num_queries_one2one\), up to "
                                         rf"{most} \(image \d+\)"):
        build_dataset("train", make_args(synthetic_root, num_queries_one2one=most - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("train", make_args(synthetic_root, num_queries_one2one=most))
        build_dataset("val", make_args(synthetic_root, num_queries_one2one=1))  # evaluation: CocoEvaluator's warning
