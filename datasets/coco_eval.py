"""COCO box evaluation of detections gathered over the evaluation loop (and over processes)."""
import contextlib
import copy
import io
import warnings
from collections import Counter

import numpy as np

from util.misc import all_gather, is_main_process

from .coco_file import AnnotationWarning, pycocotools

SUPPORTED_IOU_TYPES = ("bbox",)
COCO_MAX_DETS = 100  # detections per image COCO's AP counts (its maxDets), kept unless --topk asks for more
# the 12 numbers of COCO's summary: (AP or AR, IoU threshold (None: their mean), area range, which maxDets)
SUMMARY_ROWS = (
    ("AP", None, "all", 2), ("AP", 0.5, "all", 2), ("AP", 0.75, "all", 2),
    ("AP", None, "small", 2), ("AP", None, "medium", 2), ("AP", None, "large", 2),
    ("AR", None, "all", 0), ("AR", None, "all", 1), ("AR", None, "all", 2),
    ("AR", None, "small", 2), ("AR", None, "medium", 2), ("AR", None, "large", 2),
)


def max_detections(topk=COCO_MAX_DETS):
    """COCO's maxDets (1, 10, 100), the last raised to ``topk`` when more detections per image are kept."""
    return [1, 10, max(COCO_MAX_DETS, int(topk))]


def warn_if_capped(coco_gt, max_dets):
    """A warning when images have more objects (crowd regions aside) than the detections evaluation counts:
    their recall, hence AP, cannot reach 1."""
    objects = Counter(a["image_id"] for a in coco_gt.anns.values() if not a.get("iscrowd", 0))
    dense = [count for count in objects.values() if count > max_dets]
    if dense and is_main_process():
        warnings.warn(f"{len(dense)} of the {len(coco_gt.imgs)} evaluated images have more ground-truth boxes than "
                      f"the {max_dets} detections COCO's AP counts per image (maxDets), up to {max(dense)}: their "
                      f"recall, hence AP, is capped; --topk above 100 (e.g. --topk {max(dense)}) raises maxDets "
                      "(docs/data.md)", AnnotationWarning, stacklevel=3)


def summary_stats(coco_eval):
    """The 12 numbers of COCO's summary (as COCOeval.summarize computes them) from an accumulated COCOeval, at its
    own maxDets (COCOeval.summarize looks for 100 in the first one); a category without ground truth is left out,
    -1 when nothing is left. Returns (stats float64 [12], the table's lines)."""
    params, stats, lines = coco_eval.params, np.zeros(len(SUMMARY_ROWS)), []
    for row, (kind, iou, area, max_dets_index) in enumerate(SUMMARY_ROWS):
        area_index = list(params.areaRngLbl).index(area)
        max_dets = params.maxDets[max_dets_index]
        # precision [T, R, K, A, M], recall [T, K, A, M]
        values = coco_eval.eval["precision" if kind == "AP" else "recall"]
        if iou is not None:
            values = values[np.abs(np.asarray(params.iouThrs) - iou) < 1e-9]
        values = values[..., area_index, max_dets_index]
        valid = values[values > -1]
        stats[row] = np.mean(valid) if valid.size else -1
        name = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
        thresholds = f"{params.iouThrs[0]:0.2f}:{params.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        lines.append(f" {name} @[ IoU={thresholds:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {stats[row]:0.3f}")
    return stats, lines


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
    coco_dt = pycocotools("coco").COCO()
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
    by ``accumulate()`` / ``summarize()``. ``topk`` (the detections kept per image, --topk) above COCO's 100 raises
    the maxDets the summary counts at; at most 100 leaves COCO's (1, 10, 100).
    """

    def __init__(self, coco_gt, iou_types, topk=COCO_MAX_DETS):
        unsupported = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"unsupported iou types {unsupported}; supported: {SUPPORTED_IOU_TYPES}")
        self.coco_gt = copy.deepcopy(coco_gt)  # COCOeval annotates ground-truth dicts in place
        self.iou_types = list(iou_types)
        cocoeval = pycocotools("cocoeval")
        self.coco_eval = {t: cocoeval.COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        for coco_eval in self.coco_eval.values():
            coco_eval.params.maxDets = max_detections(topk)
        warn_if_capped(self.coco_gt, max_detections(topk)[-1])
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
            coco_eval.stats, lines = summary_stats(coco_eval)
            if table:
                print(f"IoU metric: {iou_type}", *lines, sep="\n")

    def stats(self, iou_type="bbox"):
        """The 12 summary numbers of ``iou_type`` as a float array (after ``summarize``)."""
        return np.asarray(self.coco_eval[iou_type].stats, dtype=np.float64)
