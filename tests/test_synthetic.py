"""Synthetic shapes generator: determinism, valid COCO content, tight boxes, exact segmentations, CLI manifest."""
import hashlib
import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import datasets.synthetic as synthetic
from datasets.mask_outline import coco_segmentation, pixel_outlines, signed_area
from datasets.synthetic import SHAPE_NAMES, SyntheticConfig, _image_rng, make_synthetic_coco, render_image
from tools.make_synthetic_coco import main as cli_main

NUM_TRAIN, NUM_VAL = 24, 4
TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_coco.py"


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



@pytest.mark.parametrize("knob, value", [
    ("placement_attempts", 0),  # a dataset of no objects, reported as made
    ("min_visible", 1.5),  # one object per image
    ("aspect_jitter", -0.9), ("jpeg_quality", 500), ("min_color_distance", 500), ("pixel_noise", -1),
])
def test_knobs_out_of_range_are_refused_naming_them(knob, value):
    with pytest.raises(ValueError, match=rf"synthetic generator settings out of range: {knob} {value} \(allowed: "):
        SyntheticConfig(**{knob: value})
    SyntheticConfig()  # the demo's defaults pass


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


def coco_like_folder(root):
    """A folder laid out as COCO's, with COCO's file names, that this generator did not write."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "val2017" / "000000000139.jpg").write_bytes(b"a real photo")
    (root / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    return root


def test_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    root = coco_like_folder(tmp_path / "coco")
    before = files_of(root)
    monkeypatch.setattr(sys, "argv", ["tools/make_synthetic_coco.py", "--out", str(root), "--num_train", "1",
                                      "--num_val", "1", "--image_size", "48"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert info.value.code == (
        f"make_synthetic_coco: {root} holds annotations/instances_val2017.json and 1 image in val2017/ but no "
        "manifest.json of this generator (maybe a real dataset): nothing written; choose another output folder "
        "(--out), or delete them yourself to generate there")
    (root / "manifest.json").write_text('{"parameters": {"description": "another tool\'s"}}')
    with pytest.raises(FileExistsError, match=r"manifest\.json was not written by this generator"):
        make_synthetic_coco(root, 1, 1, image_size=48)
    (root / "manifest.json").unlink()
    assert files_of(root) == before  # nothing deleted, overwritten or added
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "val2017"]


def test_an_interrupted_generation_is_redone(tmp_path, monkeypatch):
    """The manifest claims the folder before the first file is written: a run killed halfway leaves a folder that
    the next run recognises as its own and regenerates."""
    write_split = synthetic.write_split

    def interrupted(out_dir, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return write_split(out_dir, split, *args)

    monkeypatch.setattr(synthetic, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(tmp_path, 1, 1, image_size=48)
    assert synthetic.read_manifest(tmp_path) is None and (tmp_path / "annotations").is_dir()
    monkeypatch.setattr(synthetic, "write_split", write_split)
    assert make_synthetic_coco(tmp_path, 1, 1, image_size=48)["splits"]["val"]["images"] == 1
    assert synthetic.read_manifest(tmp_path)["num_val"] == 1


# SHA-256 of the images, and of the image entries, annotations (less segmentation) and categories, of a small set
# written by generator version 1: segmentation came with version 2, leaving images and boxes as they were
VERSION_1_FINGERPRINT = "9a87b80026515c3708ab8a9252c86a182a3d4352983c9b8ea6b9f5d9de90f6fd"


def test_images_and_boxes_as_version_1_wrote_them(tmp_path):
    make_synthetic_coco(tmp_path, 3, 2, image_size=64, seed=5)
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*.jpg")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for split in ("train", "val"):
        data = load(tmp_path, split)
        assert all("segmentation" in a for a in data["annotations"])
        for a in data["annotations"]:
            del a["segmentation"]
        digest.update(json.dumps([data["images"], data["annotations"], data["categories"]]).encode())
    assert digest.hexdigest() == VERSION_1_FINGERPRINT


def decode_segmentation(segmentation, height, width):
    """The boolean mask [H, W] a COCO segmentation rasterizes to, as COCO's evaluation reads it."""
    mask_api = pytest.importorskip("pycocotools.mask")
    rles = mask_api.frPyObjects(segmentation, height, width)
    return mask_api.decode(mask_api.merge(rles) if isinstance(rles, list) else rles).astype(bool)


# pycocotools' decode under numpy 2 warns about its own use of np.array(copy=False)
IGNORE_PYCOCOTOOLS_COPY = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@IGNORE_PYCOCOTOOLS_COPY
@pytest.mark.parametrize("split", ["train", "val"])
def test_segmentation_is_exactly_the_visible_pixels(generated, split):
    data = load(generated, split)
    per_image = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    forms = Counter()
    for index, image in enumerate(data["images"]):
        _, objects, owner = render_image(_image_rng(0, split, index), SyntheticConfig(image_size=80))
        annotations = per_image[image["id"]]
        assert len(annotations) == len(objects)
        for k, a in enumerate(annotations):  # back to front, as render_image lists them
            visible = owner == k
            mask = decode_segmentation(a["segmentation"], image["height"], image["width"])
            assert np.array_equal(mask, visible), f"annotation {a['id']}"
            assert a["area"] == int(visible.sum()) and a["iscrowd"] == 0
            forms["rle" if isinstance(a["segmentation"], dict) else "polygons"] += 1
    assert forms["polygons"] > forms["rle"] > 0 or split == "val"


@IGNORE_PYCOCOTOOLS_COPY
def test_outlines_of_touching_corners_holes_and_random_masks():
    corners = np.array([[1, 0], [0, 1]], dtype=bool)  # two pixels touching at a corner: two outlines
    assert pixel_outlines(corners) == [[(0, 0), (1, 0), (1, 1), (0, 1)], [(1, 1), (2, 1), (2, 2), (1, 2)]]
    frame = np.ones((3, 4), dtype=bool)
    frame[1, 1:3] = False  # a hole: the outer outline clockwise, the hole's anticlockwise
    assert [signed_area(points) for points in pixel_outlines(frame)] == [12, -2]
    assert coco_segmentation(frame) == {"size": [3, 4], "counts": [0, 4, 1, 2, 1, 4]}
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 10, size=2))
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.9)
        if mask.any():
            assert np.array_equal(decode_segmentation(coco_segmentation(mask), height, width), mask)
    with pytest.raises(ValueError, match="empty"):
        coco_segmentation(np.zeros((2, 2), dtype=bool))


def test_cli_regenerates_a_version_1_set(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "cli"), "--num_train", "1", "--num_val", "1", "--image_size", "48"]
    cli_main(argv)
    manifest = tmp_path / "cli" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["parameters"]["generator_version"] = 1  # as a set written before segmentation was added,
    del recorded["generator"]  # and before the manifest named its generator
    manifest.write_text(json.dumps(recorded))
    capsys.readouterr()
    cli_main(argv)
    assert "train: 1 images" in capsys.readouterr().out
    assert json.loads(manifest.read_text())["parameters"]["generator_version"] == 2
