"""Detections read from a json file, for tools that take them instead of running a model. Two forms:

- COCO's results format: ``[{"image_id", "category_id", "bbox": [x, y, width, height], "score"}, ...]`` (what
  COCO's evaluation reads; other detectors and tools/sam_masks.py's bbox.json write it), images named by id;
- tools/infer.py's detections.json: ``[{"file", "width", "height", "detections": [{"label", "score", "box":
  [x0, y0, x1, y1]}]}, ...]``, images named by their path (a relative one is taken from the current folder).

A malformed entry is an error naming the file and the entry.
"""
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from .coco_file import _short


class Detections(NamedTuple):
    """One image's detections, highest score first: scores float32 [N], labels (category ids) int64 [N], boxes
    float32 [N, 4] xyxy in the image's pixels."""

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


def no_detections():
    return Detections(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))


def sorted_detections(scores, labels, boxes):
    """Detections of one image from lists (or tensors), ordered by score, highest first (ties kept in order)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    return Detections(scores[order], torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[order],
                      torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)[order])


def _number(value):
    return type(value) in (int, float) and math.isfinite(value)


def _integer(value):
    return type(value) is int


def _entry_error(path, index, entry, expected):
    return ValueError(f"detections file {path}: entry {index} is not {expected}: {_short(entry, 120)}")


COCO_RESULT = "a COCO result {image_id, category_id, bbox: [x, y, width, height], score}"
INFER_IMAGE = "an image of tools/infer.py's detections.json {file, width, height, detections}"
INFER_DETECTION = "a detection {label, score, box: [x0, y0, x1, y1]}"


def _coco_results(entries, path):
    """{image id: Detections} of a COCO results list."""
    grouped = {}
    for index, entry in enumerate(entries):
        box = entry.get("bbox") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and _integer(entry.get("image_id")) and _integer(entry.get("category_id"))
                and _number(entry.get("score")) and isinstance(box, list) and len(box) == 4
                and all(map(_number, box)) and box[2] >= 0 and box[3] >= 0):
            raise _entry_error(path, index, entry, COCO_RESULT)
        x, y, w, h = box
        grouped.setdefault(entry["image_id"], []).append((entry["score"], entry["category_id"], [x, y, x + w, y + h]))
    return {image_id: sorted_detections(*zip(*rows)) for image_id, rows in grouped.items()}


def _infer_results(entries, path):
    """{resolved image path: (Detections, (width, height))} of tools/infer.py's detections.json."""
    images = {}
    for index, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and _integer(entry.get("width"))
                and _integer(entry.get("height")) and isinstance(entry.get("detections"), list)):
            raise _entry_error(path, index, entry, INFER_IMAGE)
        rows = []
        for det in entry["detections"]:
            box = det.get("box") if isinstance(det, dict) else None
            if not (isinstance(det, dict) and _integer(det.get("label")) and _number(det.get("score"))
                    and isinstance(box, list) and len(box) == 4 and all(map(_number, box))
                    and box[2] >= box[0] and box[3] >= box[1]):
                raise _entry_error(path, f"{index} ({entry['file']})", det, INFER_DETECTION)
            rows.append((det["score"], det["label"], box))
        key = Path(entry["file"]).resolve()
        if key in images:
            raise ValueError(f"detections file {path}: {entry['file']} is listed twice")
        images[key] = (sorted_detections(*zip(*rows)) if rows else no_detections(), (entry["width"], entry["height"]))
    return images


def read_detections_file(path):
    """(form, detections) of a detections json: ("coco", {image id: Detections}), ("files", {resolved image path:
    (Detections, (width, height))}) or, for an empty list, ("empty", {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file not found: {path}")
    try:
        entries = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"detections file {path} is not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"detections file {path}: expected a list (COCO results, or tools/infer.py's "
                         f"detections.json), got {type(entries).__name__}")
    if not entries:
        return "empty", {}
    if isinstance(entries[0], dict) and "image_id" in entries[0]:
        return "coco", _coco_results(entries, path)
    if isinstance(entries[0], dict) and "file" in entries[0]:
        return "files", _infer_results(entries, path)
    raise _entry_error(path, 0, entries[0], f"{COCO_RESULT}, nor {INFER_IMAGE}")
