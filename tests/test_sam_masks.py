"""tools/sam_masks.py: SAM (ViT-B, random weights) end to end on our detector's boxes; a box-filling stand-in for SAM
that proves the box frames, RLE and evaluation (segm AP = bbox AP); bad inputs; util.sam and util.progress."""
import importlib.util
import io
import json
import runpy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_helpers import ROOT, SMALL, TWO_STAGE_HYBRID, build
from PIL import Image

from datasets.coco_eval import evaluate_results, masks_to_rle
from datasets.synthetic import make_synthetic_coco
from util.amp import native_on_cpu
from util.checkpoint import save_checkpoint
from util.progress import Progress
from util.sam import SAM_CHECKPOINTS, box_masks, build_sam_predictor, check_sam_arguments

TOOL = runpy.run_path(str(ROOT / "tools" / "sam_masks.py"))
INFER = runpy.run_path(str(ROOT / "tools" / "infer.py"))
HAS_SAM = importlib.util.find_spec("segment_anything") is not None
needs_sam = pytest.mark.skipif(not HAS_SAM, reason="segment-anything is not installed")
DETECTOR = SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels",
                                       "2", "--val_scale", "72", "--max_size", "128", "--num_classes", "7"]
# pycocotools' decode under numpy 2 warns about its own use of np.array(copy=False)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def frame_scale(height, width, long_side):
    """(x, y) scale factors from an image's pixels to SAM's input frame: the image resized so that its longer side
    is `long_side`, sides rounded to whole pixels (as segment_anything's ResizeLongestSide)."""
    scale = long_side / max(height, width)
    return int(width * scale + 0.5) / width, int(height * scale + 0.5) / height


class BoxFiller:
    """A stand-in for segment_anything.SamPredictor whose mask of a box is the box itself (the pixels whose centres
    it holds), with predicted IoU `iou`. Like SAM, its transform takes boxes to the frame of the image resized to a
    longer side of `long_side`, predict_torch takes them in that frame and answers in the image's pixels; with
    multimask_output, 3 masks: empty, the box, everything, of IoU 0.1, `iou`, 0.3."""

    def __init__(self, iou=1.0, long_side=1024):
        self.long_side = long_side
        self.transform = SimpleNamespace(apply_boxes_torch=self.to_frame)
        self.device = torch.device("cpu")
        self.iou = iou
        self.embedded = []  # the shape of each image set

    def to_frame(self, boxes, size):
        sx, sy = frame_scale(*size, self.long_side)
        return boxes * torch.tensor([sx, sy, sx, sy])

    def set_image(self, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.embedded.append(image.shape)

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True):
        assert point_coords is None and point_labels is None and mask_input is None
        height, width = self.embedded[-1][:2]
        sx, sy = frame_scale(height, width, self.long_side)
        x0, y0, x1, y1 = (boxes / torch.tensor([sx, sy, sx, sy])).unbind(1)  # back to the image's pixels
        xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5
        inside = ((xs >= x0[:, None]) & (xs < x1[:, None]))[:, None, :] & \
                 ((ys >= y0[:, None]) & (ys < y1[:, None]))[:, :, None]  # [B, H, W]
        if not multimask_output:
            return inside[:, None], torch.full((len(boxes), 1), self.iou), None
        masks = torch.stack([torch.zeros_like(inside), inside, torch.ones_like(inside)], dim=1)
        return masks, torch.tensor([[0.1, self.iou, 0.3]]).expand(len(boxes), 3), None


def write_rectangles(root, sizes=((80, 120), (104, 72), (90, 90)), seed=0):
    """A COCO val split of noise images (height, width) with 3-5 integer rectangles each, their ground-truth masks
    the rectangles themselves (polygons); returns the annotation dict."""
    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (height, width) in enumerate(sizes, start=1):
        name = f"{image_id:012d}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for _ in range(int(rng.integers(3, 6))):
            w, h = (int(v) for v in rng.integers(8, 60, size=2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            category = int(rng.integers(1, 3))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return data


def imperfect_detections(data, seed=0):
    """COCO results for `data`: most objects found with boxes a few whole pixels off (some with the wrong class),
    some missed, and false detections; scores random."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in data["annotations"]:
        if rng.random() < 0.2:
            continue  # missed
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = (int(v) for v in rng.integers(-2, 3, size=4))
        category = ann["category_id"] if rng.random() > 0.15 else 3 - ann["category_id"]
        results.append({"image_id": ann["image_id"], "category_id": category,
                        "bbox": [max(x + dx, 0), max(y + dy, 0), max(w + dw, 1), max(h + dh, 1)],
                        "score": round(float(rng.uniform(0.05, 1)), 4)})
    for image in data["images"]:
        for _ in range(2):
            w, h = (int(v) for v in rng.integers(6, 30, size=2))
            x, y = int(rng.integers(0, image["width"] - w)), int(rng.integers(0, image["height"] - h))
            results.append({"image_id": image["id"], "category_id": int(rng.integers(1, 3)), "bbox": [x, y, w, h],
                            "score": round(float(rng.uniform(0.05, 1)), 4)})
    return results


@pytest.fixture()
def rectangles(tmp_path):
    data = write_rectangles(tmp_path / "rect")
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps(imperfect_detections(data)))
    return tmp_path / "rect", detections, data


def run(argv, predictor=None):
    return TOOL["main"]([str(a) for a in argv], predictor=predictor)


def read(out, name):
    return json.loads((out / name).read_text())


def decode(rle):
    mask_api = pytest.importorskip("pycocotools.mask")
    return mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_box_filling_segmenter_gives_segm_ap_equal_to_bbox_ap(rectangles, tmp_path, capsys):
    """Masks that are the prompted boxes, scored by the boxes' ground truth: the segm summary equals the bbox
    summary, which holds only if the boxes reach SAM's frame and come back, are encoded and evaluated right."""
    root, detections, data = rectangles
    filler = BoxFiller()
    assert run(["--detections", detections, "--coco_path", root, "--out", tmp_path / "out"], filler) == 0
    stats = read(tmp_path / "out", "eval.json")
    assert 0.2 < stats["bbox"][0] < 0.9, "an imperfect detector: AP away from 0 and 1"
    np.testing.assert_allclose(stats["segm"], stats["bbox"], atol=0.01)
    assert [shape[:2] for shape in filler.embedded] == [(80, 120), (104, 72), (90, 90)]  # each image once
    segm, boxes = read(tmp_path / "out", "segm.json"), read(tmp_path / "out", "bbox.json")
    assert len(segm) == len(boxes) == len(json.loads(detections.read_text()))
    for mask, box in zip(segm, boxes):  # the same order: mask i is the mask of box i
        x, y, w, h = (round(v) for v in box["bbox"])
        expected = np.zeros(mask["segmentation"]["size"], dtype=bool)
        expected[y:y + h, x:x + w] = True
        assert np.array_equal(decode(mask["segmentation"]), expected)
        assert (mask["image_id"], mask["category_id"], mask["score"]) == (box["image_id"], box["category_id"],
                                                                          pytest.approx(box["score"]))
    printed = capsys.readouterr().out
    assert "IoU metric: segm" in printed and "IoU metric: bbox" in printed and "masks/s" in printed


def test_scores_times_predicted_iou_multimask_and_threshold(rectangles, tmp_path):
    root, detections, _ = rectangles
    given = {(d["image_id"], tuple(d["bbox"])): d["score"] for d in json.loads(detections.read_text())}
    for flags, factor in (([], 0.5), (["--no_sam_iou"], 1.0), (["--multimask"], 0.5)):
        out = tmp_path / "-".join(flags or ["default"])
        run(["--detections", detections, "--coco_path", root, "--out", out, "--threshold", "0.3", *flags],
            BoxFiller(iou=0.5))
        segm, boxes = read(out, "segm.json"), read(out, "bbox.json")
        assert len(boxes) == sum(s >= 0.3 for s in given.values())
        for mask, box in zip(segm, boxes):
            assert box["score"] == pytest.approx(given[box["image_id"], tuple(box["bbox"])])
            assert mask["score"] == pytest.approx(box["score"] * factor)
            # --multimask picks the box mask (IoU 0.5) over the empty (0.1) and the full one (0.3)
            assert decode(mask["segmentation"]).sum() == pytest.approx(box["bbox"][2] * box["bbox"][3], abs=0.5)


def tiny_detector(tmp_path, coco):
    flags = DETECTOR + ["--coco_path", str(coco), "--topk", "5"]
    model, _, _, args = build(flags, seed=1)
    save_checkpoint({"model": model.state_dict(), "args": args}, tmp_path / "detector.pth")
    return tmp_path / "detector.pth"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam") / "coco"
    make_synthetic_coco(root, 0, 2, image_size=96, seed=2)
    return root


def test_checkpoint_boxes_are_tools_infer_detections(synthetic, tmp_path):
    """With --resume, the prompting boxes are those tools/infer.py detects, on images of a folder."""
    checkpoint = tiny_detector(tmp_path, synthetic)
    filler = BoxFiller()
    code = run(["--resume", checkpoint, "--images", synthetic / "val2017", "--out", tmp_path / "out", "--device",
                "cpu"], filler)
    assert code == 0 and len(filler.embedded) == 2
    INFER["main"](["--resume", str(checkpoint), "--images", str(synthetic / "val2017"), "--out", str(tmp_path / "i"),
                   "--threshold", "0", "--no_draw", "--device", "cpu"])
    inferred = json.loads((tmp_path / "i" / "detections.json").read_text())
    ids = {entry["file"]: entry["id"] for entry in read(tmp_path / "out", "images.json")}
    boxes = read(tmp_path / "out", "bbox.json")
    assert len(boxes) == 10  # --topk 5 of each image
    for image in inferred:
        mine = [b for b in boxes if b["image_id"] == ids[image["file"]]]
        assert [b["category_id"] for b in mine] == [d["label"] for d in image["detections"]]
        np.testing.assert_allclose([[x, y, x + w, y + h] for x, y, w, h in (b["bbox"] for b in mine)],
                                   [d["box"] for d in image["detections"]], atol=0.051)


@needs_sam
def test_sam_vit_b_end_to_end_on_a_tiny_detector(synthetic, tmp_path):
    """Acceptance: SAM ViT-B with random weights (no checkpoint) on the boxes of a random tiny detector, 2 images;
    the segm json loads and evaluates with pycocotools' own COCO.loadRes and COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    checkpoint = tiny_detector(tmp_path, synthetic)
    amp = "bf16" if native_on_cpu("bf16") else "fp32"  # bf16 halves the embedding time where the CPU has it
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)  # SAM's random weights
    try:
        code = run(["--resume", checkpoint, "--coco_path", synthetic, "--out", tmp_path / "out", "--sam_model",
                    "vit_b", "--sam_checkpoint", "none", "--amp", amp, "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    segm = read(tmp_path / "out", "segm.json")
    assert len(segm) == 10 and {s["image_id"] for s in segm} == {1, 2}
    gt = COCO(str(synthetic / "annotations" / "instances_val2017.json"))
    sizes = {i: [gt.imgs[i]["height"], gt.imgs[i]["width"]] for i in gt.imgs}
    assert all(s["segmentation"]["size"] == sizes[s["image_id"]] for s in segm)
    evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / "out" / "segm.json")), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert len(evaluation.stats) == 12 and all(-1 <= v <= 1 for v in evaluation.stats)
    stats = read(tmp_path / "out", "eval.json")
    assert stats["segm"][0] == pytest.approx(evaluation.stats[0], abs=1e-9)
    assert set(stats) == {"bbox", "segm"}


@needs_sam
def test_the_stand_ins_frame_is_sams():
    """BoxFiller's frame is the one SamPredictor's transform gives, on images wider and taller than long."""
    from segment_anything.utils.transforms import ResizeLongestSide

    boxes = torch.tensor([[3.0, 4.5, 50.2, 77.0], [0.0, 0.0, 121.0, 63.0]])
    for size in ((64, 121), (333, 97), (1024, 1024), (7, 2000)):
        expected = ResizeLongestSide(1024).apply_boxes_torch(boxes, size)
        torch.testing.assert_close(BoxFiller().to_frame(boxes, size), expected)


@pytest.mark.skipif(importlib.util.find_spec("sam2") is None, reason="sam2 is not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # inside sam2 itself
def test_sam2_behind_the_same_interface():
    """SAM 2.1 Hiera-T with random weights through box_masks: masks in the image's pixels, one per box."""
    torch.manual_seed(0)
    predictor = build_sam_predictor("sam2.1_hiera_t", "none", "cpu")
    image = np.random.default_rng(0).integers(0, 255, (72, 100, 3), dtype=np.uint8)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0], [0.0, 0.0, 100.0, 72.0], [50.0, 10.0, 90.0, 70.0]])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = list(box_masks(predictor, image, boxes, batch_size=2, multimask=True))
    finally:
        torch.set_num_threads(threads)
    assert [tuple(m.shape) for m, _ in batches] == [(2, 72, 100), (1, 72, 100)]  # the best of 3 for each box
    assert all(m.dtype == torch.bool and iou.dtype == torch.float32 for m, iou in batches)
    frame = predictor.transform.apply_boxes_torch(boxes, (72, 100))
    torch.testing.assert_close(frame[1], torch.tensor([0.0, 0.0, 1024.0, 1024.0]))  # SAM 2's square frame


def test_empty_detection_list(rectangles, tmp_path):
    root, _, _ = rectangles
    (tmp_path / "none.json").write_text("[]")
    filler = BoxFiller()
    assert run(["--detections", tmp_path / "none.json", "--coco_path", root, "--out", tmp_path / "out"], filler) == 0
    assert read(tmp_path / "out", "segm.json") == [] and read(tmp_path / "out", "bbox.json") == []
    assert filler.embedded == []  # no box, no embedding
    assert read(tmp_path / "out", "eval.json")["segm"][0] == 0  # objects, none found


def test_an_image_without_detections_is_not_embedded(rectangles, tmp_path):
    root, detections, data = rectangles
    kept = [d for d in json.loads(detections.read_text()) if d["image_id"] != 2]
    (tmp_path / "some.json").write_text(json.dumps(kept))
    filler = BoxFiller()
    run(["--detections", tmp_path / "some.json", "--coco_path", root, "--out", tmp_path / "out"], filler)
    assert [shape[:2] for shape in filler.embedded] == [(80, 120), (90, 90)]
    assert {s["image_id"] for s in read(tmp_path / "out", "segm.json")} == {1, 3}


def test_detections_of_other_images(rectangles, tmp_path):
    root, detections, _ = rectangles
    foreign = json.loads(detections.read_text()) + [{"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4],
                                                     "score": 0.5}]
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match=r"detections for 1 image ids that are not in .*instances_val2017.json: 999"):
        run(["--detections", tmp_path / "foreign.json", "--coco_path", root, "--out", tmp_path / "o"], BoxFiller())
    files = [{"file": str(tmp_path / "elsewhere.jpg"), "width": 10, "height": 10, "detections": []}]
    (tmp_path / "files.json").write_text(json.dumps(files))
    with pytest.raises(ValueError, match=r"1 files that are not among the images given: .*elsewhere.jpg"):
        run(["--detections", tmp_path / "files.json", "--images", root / "val2017", "--out", tmp_path / "o"],
            BoxFiller())
    with pytest.raises(ValueError, match="names its images by COCO image id: pass the images with --coco_path"):
        run(["--detections", detections, "--images", root / "val2017", "--out", tmp_path / "o"], BoxFiller())


def test_category_ids_the_annotations_do_not_list_are_reported(rectangles, tmp_path, capsys):
    """Ids numbered 0..K-1 instead of the file's: COCO's evaluation scores them 0 without a word; one warning."""
    root, detections, data = rectangles
    shifted = [dict(d, category_id=d["category_id"] - 1) for d in json.loads(detections.read_text())]
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    assert run(["--detections", tmp_path / "shifted.json", "--coco_path", root, "--out", tmp_path / "o"],
               BoxFiller()) == 0
    listed = {c["id"] for c in data["categories"]}
    strangers = sorted({d["category_id"] for d in shifted} - listed)
    count = sum(d["category_id"] in strangers for d in shifted)
    assert strangers and (f"warning: {count} detections of {tmp_path / 'shifted.json'} have category ids that "
                          f"{root / 'annotations' / 'instances_val2017.json'} does not list "
                          f"({', '.join(map(str, strangers))})") in capsys.readouterr().err
    assert run(["--detections", detections, "--coco_path", root, "--out", tmp_path / "p"], BoxFiller()) == 0
    assert "warning" not in capsys.readouterr().err


def test_tools_infer_detections_json_on_a_folder(rectangles, tmp_path):
    """tools/infer.py's detections.json: boxes matched to the folder's files by path, their sizes checked."""
    root, _, data = rectangles
    first = data["images"][0]
    box = [10.0, 12.0, 40.0, 30.0]
    entries = [{"file": str(root / "val2017" / image["file_name"]), "width": image["width"],
                "height": image["height"], "detections": [{"label": 2, "score": 0.7, "box": box}] * (image is first)}
               for image in data["images"]]  # as tools/infer.py writes it: every image, those without boxes too
    (tmp_path / "infer.json").write_text(json.dumps(entries))
    filler = BoxFiller()
    # a file named twice (its folder, then itself) is one image: it got two ids, the boxes only on the second
    assert run(["--detections", tmp_path / "infer.json", "--images", root / "val2017",
                root / "val2017" / first["file_name"], "--out", tmp_path / "out"], filler) == 0
    (mask,) = read(tmp_path / "out", "segm.json")
    assert mask["image_id"] == 1 and mask["category_id"] == 2 and decode(mask["segmentation"]).sum() == 30 * 18
    assert len(filler.embedded) == 1 and len(read(tmp_path / "out", "images.json")) == 3
    (tmp_path / "partial.json").write_text(json.dumps(entries[:1]))  # the other images got no boxes, silently
    with pytest.raises(ValueError, match=r"partial.json does not list 2 of the images given \(was tools/infer.py run "
                                         r"on them\?\): .*val2017"):
        run(["--detections", tmp_path / "partial.json", "--images", root / "val2017", "--out", tmp_path / "o"],
            BoxFiller())
    entries[0]["width"] += 1
    (tmp_path / "infer.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="as 121 x 80 pixels, but it is 120 x 80: its boxes are for another image"):
        run(["--detections", tmp_path / "infer.json", "--images", root / "val2017", "--out", tmp_path / "o"],
            BoxFiller())


@pytest.mark.parametrize("content, message", [
    ('{"image_id": 1}', "expected a list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 2], "score": 0.5}]', "entry 0 is not a COCO result"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 2]}]', "entry 0 is not a COCO result"),
    ('[{"file": "x.jpg", "width": 4, "height": 4, "detections": [{"label": 1, "score": 1, "box": [3, 0, 1, 2]}]}]',
     r"entry 0 \(x.jpg\) is not a detection"),
    ('[[1, 2, 3, 4]]', "is not a COCO result .*, nor an image of tools/infer.py's"),
    ("[{", "not valid JSON"),
])
def test_malformed_detections_file(rectangles, tmp_path, content, message):
    root, _, _ = rectangles
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        run(["--detections", tmp_path / "bad.json", "--coco_path", root, "--out", tmp_path / "o"], BoxFiller())


@pytest.mark.parametrize("argv, message", [
    (["--detections", "D"], "either --coco_path or --images"),
    (["--detections", "D", "--coco_path", "C", "--images", "C"], "either --coco_path or --images"),
    (["--coco_path", "C"], "--resume <checkpoint> .* or --detections <json>"),
    (["--detections", "D", "--coco_path", "C", "--topk", "5"], "with --detections they do not apply"),
    (["--detections", "D", "--coco_path", "C", "--threshold", "2"], r"--threshold is a score in \[0, 1\]"),
    (["--detections", "D", "--coco_path", "C", "--sam_batch", "0"], "--sam_batch must be at least 1"),
])
def test_bad_flags(rectangles, tmp_path, argv, message):
    root, detections, _ = rectangles
    argv = [detections if a == "D" else root if a == "C" else a for a in argv]
    with pytest.raises(ValueError, match=message):
        run(argv + ["--out", tmp_path / "o"], BoxFiller())


def test_missing_segment_anything_is_one_line(rectangles, tmp_path, monkeypatch):
    root, detections, _ = rectangles
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails as when it is not installed
    with pytest.raises(ImportError, match=r"need the segment-anything package: pip install segment-anything==1\.0"):
        run(["--detections", detections, "--coco_path", root, "--out", tmp_path / "o"])
    monkeypatch.setattr(sys, "argv", ["tools/sam_masks.py", "--detections", str(detections), "--coco_path", str(root),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "sam_masks.py"), run_name="__main__")
    message = str(info.value.code)
    assert message.startswith("sam_masks: ") and "segment-anything" in message and "\n" not in message
    monkeypatch.setitem(sys.modules, "sam2", None)
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    with pytest.raises(ImportError, match="--sam_model sam2.1_hiera_t needs the sam2 package .*pip install --no-deps"):
        run(["--detections", detections, "--coco_path", root, "--out", tmp_path / "o", "--sam_model", "sam2.1_hiera_t"])


def test_missing_sam_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--sam_checkpoint .*missing.pth: no such file \(the released "
                                                r"weights of vit_b: https://.*sam_vit_b_01ec64.pth"):
        check_sam_arguments("vit_b", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="--sam_model 'vit_x': choose one of vit_h, vit_l, vit_b, sam2.1_hiera_t"):
        check_sam_arguments("vit_x", "none")
    check_sam_arguments("vit_h", SAM_CHECKPOINTS["vit_h"])  # a URL is fetched when the model is built


@needs_sam
def test_missing_sam_checkpoint_through_the_tool_and_a_wrong_one(rectangles, tmp_path):
    root, detections, _ = rectangles
    with pytest.raises(FileNotFoundError, match="--sam_checkpoint .*nowhere.pth: no such file"):
        run(["--detections", detections, "--coco_path", root, "--out", tmp_path / "o", "--sam_checkpoint",
             tmp_path / "nowhere.pth"])
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not hold the weights of vit_b: .* tensors missing"):
        build_sam_predictor("vit_b", str(tmp_path / "other.pth"), "cpu")


def test_box_masks_batches_and_skips_images_without_boxes():
    image = np.zeros((30, 50, 3), dtype=np.uint8)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 50.0, 30.0], [1.0, 2.0, 3.0, 4.0]])
    filler = BoxFiller(long_side=64)  # a frame smaller than the image
    batches = list(box_masks(filler, image, boxes, batch_size=2))
    assert [len(iou) for _, iou in batches] == [2, 1] and len(filler.embedded) == 1
    masks = torch.cat([m for m, _ in batches])
    assert masks.shape == (3, 30, 50) and masks.sum(dim=(1, 2)).tolist() == [100, 45 * 25, 4]
    assert list(box_masks(filler, image, torch.zeros(0, 4), batch_size=2)) == [] and len(filler.embedded) == 1
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        list(box_masks(filler, image.astype(np.float32), boxes, batch_size=2))


def test_mask_results_of_another_size_are_refused(rectangles):
    from datasets.coco import load_coco_api

    root, _, _ = rectangles
    gt = load_coco_api(root / "annotations" / "instances_val2017.json")
    (rle,) = masks_to_rle(np.ones((1, 10, 10), dtype=bool))
    with pytest.raises(ValueError, match=r"its mask is 10 x 10 \(height x width\) but image 1 is 80 x 120"):
        evaluate_results(gt, [{"image_id": 1, "category_id": 1, "segmentation": rle, "score": 1.0}], "segm", [1])


def test_progress_lines_in_a_log():
    stream = io.StringIO()
    progress = Progress(20, "images", stream=stream)
    for _ in range(20):
        progress.step("x masks/s")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[" + "#" * 30 + "] 20/20 images") and "x masks/s" in lines[0]
