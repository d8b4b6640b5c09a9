"""Synthetic shapes generator: determinism, valid COCO content, tight boxes, CLI manifest."""
import json
from collections import Counter

import numpy as np
import pytest

from datasets.synthetic import SHAPE_NAMES, SyntheticConfig, make_synthetic_coco, render_image
from tools.make_synthetic_coco import main as cli_main

NUM_TRAIN, NUM_VAL = 24, 4


def generate(root, seed=0):
    make_synthetic_coco(root, NUM_TRAIN, NUM_VAL, image_size=80, seed=seed)
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"))


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def test_same_seed_gives_identical_bytes(generated, tmp_path):
    again = files_of(generate(tmp_path / "again"))
    assert again == files_of(generated)
    other = files_of(generate(tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    assert other["annotations/instances_train2017.json"] != again["annotations/instances_train2017.json"]


@pytest.mark.parametrize("split,count", [("train", NUM_TRAIN), ("val", NUM_VAL)])
def test_counts_ids_and_boxes(generated, split, count):
    data = load(generated, split)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPE_NAMES) + 1))
    assert [c["name"] for c in data["categories"]] == list(SHAPE_NAMES)
    assert [im["id"] for im in data["images"]] == list(range(1, count + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    images = {im["id"]: im for im in data["images"]}
    for im in data["images"]:
        assert (generated / f"{split}2017" / im["file_name"]).is_file()
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert set(per_image) == set(images)
    assert all(1 <= n <= 8 for n in per_image.values())
    for a in data["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(SHAPE_NAMES)
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert 0 < a["area"] <= w * h


def test_all_categories_present(generated):
    categories = {a["category_id"] for a in load(generated, "train")["annotations"]}
    assert categories == set(range(1, len(SHAPE_NAMES) + 1))


def test_boxes_are_tight_and_objects_visible():
    cfg = SyntheticConfig(image_size=96)
    object_counts = []
    for index in range(10):
        image, objects, instance_map = render_image(np.random.default_rng([7, index]), cfg)
        assert image.dtype == np.uint8 and image.shape[:2] == instance_map.shape and image.shape[2] == 3
        object_counts.append(len(objects))
        for k, (category, (x, y, w, h), area) in enumerate(objects):
            ys, xs = np.nonzero(instance_map == k)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert area == len(xs)
            assert 0 <= category < len(SHAPE_NAMES)
    assert 1 <= min(object_counts) and max(object_counts) <= 8 and len(set(object_counts)) > 2


def test_config_is_validated():
    with pytest.raises(ValueError):
        SyntheticConfig(min_objects=0)
    with pytest.raises(ValueError):
        SyntheticConfig(image_format="gif")


def test_cli_skips_identical_output(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "cli"), "--num_train", "2", "--num_val", "1", "--image_size", "48",
            "--image_format", "png"]
    cli_main(argv)
    assert "train: 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli" / "train2017").iterdir()) == [
        "000000000001.png", "000000000002.png"]
    cli_main(argv)
    assert "nothing to do" in capsys.readouterr().out
    cli_main(argv + ["--force"])
    assert "train: 2 images" in capsys.readouterr().out
    cli_main(argv[:3] + ["1"] + argv[4:])  # fewer images: regenerated, stale files removed
    assert "train: 1 images" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "cli" / "train2017").iterdir()] == ["000000000001.png"]
