"""COCO box evaluation of detections gathered over the evaluation loop (and over processes)."""
import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather

SUPPORTED_IOU_TYPES = ("bbox",)


def predictions_to_coco_results(image_id, prediction):
    """One image's {"scores", "labels", "boxes" (xyxy absolute)} -> COCO result dicts (xywh boxes)."""
    boxes = prediction["boxes"].detach().float().cpu().reshape(-1, 4).clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    scores = prediction["scores"].detach().float().cpu().reshape(-1).tolist()
    labels = prediction["labels"].detach().cpu().reshape(-1).tolist()
    return [
        {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
        for box, label, score in zip(boxes.tolist(), labels, scores)
    ]


def load_detections(coco_gt, results):
    """COCO object holding ``results`` as annotations; unlike ``COCO.loadRes`` it accepts an empty list."""
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids absent from the ground truth: {sorted(unknown)[:10]}")
    annotations = []
    for ann_id, result in enumerate(results, start=1):
        x, y, w, h = result["bbox"]
        annotations.append({**result, "id": ann_id, "area": w * h, "iscrowd": 0})
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Collects per-image detections, then scores every seen image once with pycocotools.

    ``coco_eval[iou_type]`` is a ``COCOeval``; its ``stats`` (the 12 summary numbers) and ``eval`` are set
    by ``accumulate()`` / ``summarize()``.
    """

    def __init__(self, coco_gt, iou_types):
        unsupported = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"unsupported iou types {unsupported}; supported: {SUPPORTED_IOU_TYPES}")
        self.coco_gt = copy.deepcopy(coco_gt)  # COCOeval annotates ground-truth dicts in place
        self.iou_types = list(iou_types)
        self.coco_eval = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        self.detections = {}  # image id -> list of COCO result dicts

    def update(self, predictions):
        """Record ``{image_id: {"scores", "labels", "boxes"}}``; an image seen again keeps its first result."""
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.detections:
                self.detections[image_id] = predictions_to_coco_results(image_id, prediction)

    @property
    def img_ids(self):
        return sorted(self.detections)

    def synchronize_between_processes(self):
        """Merge the detections of all processes; images scored by several processes are kept once."""
        merged = {}
        for detections in all_gather(self.detections):
            for image_id, results in detections.items():
                merged.setdefault(image_id, results)
        self.detections = merged

    def accumulate(self):
        """Match detections to the ground truth over every seen image and accumulate precision/recall."""
        results = [r for image_id in self.img_ids for r in self.detections[image_id]]
        coco_dt = load_detections(self.coco_gt, results)
        for iou_type, coco_eval in self.coco_eval.items():
            coco_eval.cocoDt = coco_dt
            coco_eval.params.imgIds = self.img_ids
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.evaluate()
                coco_eval.accumulate()

    def summarize(self, table=True):
        """Fill ``coco_eval[t].stats`` for each iou type, printing the standard COCO table unless ``table`` is
        False."""
        for iou_type, coco_eval in self.coco_eval.items():
            with contextlib.nullcontext() if table else contextlib.redirect_stdout(io.StringIO()):
                print(f"IoU metric: {iou_type}")
                coco_eval.summarize()

    def stats(self, iou_type="bbox"):
        """The 12 summary numbers of ``iou_type`` as a float array (after ``summarize``)."""
        return np.asarray(self.coco_eval[iou_type].stats, dtype=np.float64)
