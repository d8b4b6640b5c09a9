"""COCO evaluation: boxes gathered over the evaluation loop (and over processes), and finished COCO result lists
(boxes or masks, e.g. tools/sam_masks.py's)."""
import contextlib
import copy
import io
import warnings

import numpy as np

from util.misc import all_gather, is_main_process

from .coco_file import AnnotationWarning, objects_by, pycocotools

SUPPORTED_IOU_TYPES = ("bbox",)
# COCO's maxDets: the detections of one image and category its AP and AR count at most (the top-scoring ones)
COCO_MAX_DETS = (1, 10, 100)
# the 12 numbers of COCO's summary: (AP or AR, IoU threshold (None: their mean), area range, which maxDets)
SUMMARY_ROWS = (
    ("AP", None, "all", -1), ("AP", 0.5, "all", -1), ("AP", 0.75, "all", -1),
    ("AP", None, "small", -1), ("AP", None, "medium", -1), ("AP", None, "large", -1),
    ("AR", None, "all", 0), ("AR", None, "all", 1), ("AR", None, "all", -1),
    ("AR", None, "small", -1), ("AR", None, "medium", -1), ("AR", None, "large", -1),
)


def max_detections(topk=COCO_MAX_DETS[-1]):
    """COCO's maxDets (1, 10, 100); with ``topk`` above 100, ``topk`` is added as the largest, which the summary
    reports at (100 stays, for the one line comparable with COCO's own AP)."""
    return [*COCO_MAX_DETS] + ([int(topk)] if topk > COCO_MAX_DETS[-1] else [])


def warn_if_capped(coco_gt, max_dets, kept=None, queries=None):
    """A warning when an image has more objects (crowd regions aside) than evaluation can match: more than the
    `kept` detections the model keeps per image (--topk; when given, the tighter cap, as maxDets is at least it) or
    the `queries` boxes it predicts per image (its one-to-one queries), whichever is fewer, else more of one category
    than the `max_dets` per image and category COCO's AP counts. Their recall, hence AP, cannot reach 1."""
    remedy = "--topk {most} lifts the cap (above 100 it also raises maxDets; docs/data.md)"
    fields = ("image_id",)  # the key's first field is the image in every branch
    if queries is not None and (kept is None or queries < kept):
        limit, cap = queries, f"than the {queries} boxes the model predicts per image (--num_queries_one2one)"
        remedy = "a model with more one-to-one queries lifts the cap"
    elif kept is not None:
        limit, cap = kept, f"than the {kept} detections kept per image (--topk)"
    else:
        fields = ("image_id", "category_id")
        limit = max_dets
        cap = f"of one category than the {max_dets} detections per image and category COCO's AP counts (maxDets)"
    objects = objects_by(coco_gt, *fields)
    dense = [key for key, count in objects.items() if count > limit]
    if dense and is_main_process():
        most = max(objects[key] for key in dense)
        images = len({key[0] for key in dense})
        warnings.warn(f"{images} of the {len(coco_gt.imgs)} evaluated images have more ground-truth boxes {cap}, up "
                      f"to {most}: their recall, hence AP, is capped; {remedy.format(most=most)}", AnnotationWarning,
                      stacklevel=3)


def _summary_line(kind, iou, area, max_dets, value, params):
    name = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
    thresholds = f"{params.iouThrs[0]:0.2f}:{params.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
    return f" {name} @[ IoU={thresholds:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {value:0.3f}"


def _summary_value(coco_eval, kind, iou, area, max_dets_index):
    """Mean precision (or recall) over the IoU thresholds (or one), the categories with ground truth and the recall
    thresholds at one area range and maxDets; -1 when nothing has ground truth."""
    params = coco_eval.params
    values = coco_eval.eval["precision" if kind == "AP" else "recall"]  # [T, R, K, A, M] or [T, K, A, M]
    if iou is not None:
        values = values[np.abs(np.asarray(params.iouThrs) - iou) < 1e-9]
    values = values[..., list(params.areaRngLbl).index(area), max_dets_index]
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def summary_stats(coco_eval):
    """The 12 numbers of COCO's summary from an accumulated COCOeval, computed as COCOeval.summarize does but at
    the largest of its maxDets (COCOeval.summarize looks for 100); with a raised maxDets, the table adds AP at COCO's
    100. Returns (stats float64 [12], the table's lines)."""
    params, stats, lines = coco_eval.params, np.zeros(len(SUMMARY_ROWS)), []
    for row, (kind, iou, area, max_dets_index) in enumerate(SUMMARY_ROWS):
        stats[row] = _summary_value(coco_eval, kind, iou, area, max_dets_index)
        lines.append(_summary_line(kind, iou, area, params.maxDets[max_dets_index], stats[row], params))
    if params.maxDets[-1] != COCO_MAX_DETS[-1] and COCO_MAX_DETS[-1] in params.maxDets:
        at_coco = _summary_value(coco_eval, "AP", None, "all", list(params.maxDets).index(COCO_MAX_DETS[-1]))
        lines.append(_summary_line("AP", None, "all", COCO_MAX_DETS[-1], at_coco, params)
                     + "  (COCO's maxDets, as upstream's --topk 300 results)")
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


def masks_to_rle(masks):
    """Boolean masks [N, H, W] (tensor or array) -> COCO's compressed RLE of each, {"size": [H, W], "counts": str},
    ready for json (pycocotools.mask.encode)."""
    masks = np.asarray(masks.cpu() if hasattr(masks, "cpu") else masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle: expected masks [N, H, W], got shape {masks.shape}")
    if not len(masks):
        return []
    # pycocotools takes [H, W, N] uint8 in column-major order
    rles = pycocotools("mask").encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def _mask_area_and_box(result, image, index):
    """(pixel area, xywh box) of a result's RLE segmentation; an RLE of another size than its image is an error."""
    rle = result["segmentation"]
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError(f"result {index} (image {result['image_id']}): 'segmentation' is not an RLE "
                         "{'size': [height, width], 'counts': ...}")
    if list(rle["size"]) != [image.get("height"), image.get("width")]:
        raise ValueError(f"result {index}: its mask is {rle['size'][0]} x {rle['size'][1]} (height x width) but "
                         f"image {result['image_id']} is {image.get('height')} x {image.get('width')}")
    mask_api = pycocotools("mask")
    if isinstance(rle["counts"], str):
        rle = {**rle, "counts": rle["counts"].encode()}
    elif isinstance(rle["counts"], list):
        rle = mask_api.frPyObjects(rle, *rle["size"])
    return float(mask_api.area(rle)), mask_api.toBbox(rle).tolist()


def load_detections(coco_gt, results):
    """COCO object holding ``results`` as annotations; unlike ``COCO.loadRes`` it accepts an empty list. A result
    with an RLE ``segmentation`` (a mask) gets the mask's area and, when it has none, the mask's box, as
    ``COCO.loadRes`` gives them; a box result gets its box's area."""
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids absent from the ground truth: {sorted(unknown)[:10]}")
    annotations = []
    for ann_id, result in enumerate(results, start=1):
        if "segmentation" in result:
            area, box = _mask_area_and_box(result, coco_gt.imgs[result["image_id"]], ann_id - 1)
            annotations.append({"bbox": box, **result, "id": ann_id, "area": area, "iscrowd": 0})
            continue
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


def run_cocoeval(coco_eval, coco_dt, image_ids):
    """Match ``coco_dt``'s detections of ``image_ids`` to the ground truth and accumulate (COCOeval's prints
    silenced)."""
    coco_eval.cocoDt = coco_dt
    coco_eval.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()


def evaluate_results(coco_gt, results, iou_type, image_ids, max_dets=COCO_MAX_DETS[-1]):
    """COCO's summary of finished result dicts (``iou_type`` "bbox": their boxes, "segm": their RLE masks) over
    ``image_ids``; ``max_dets`` above 100 raises maxDets as --topk does. Returns (stats float64 [12], the table's
    lines)."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"unknown iou type {iou_type!r}: 'bbox' or 'segm'")
    coco_gt = copy.deepcopy(coco_gt)  # COCOeval annotates ground-truth dicts in place
    coco_eval = pycocotools("cocoeval").COCOeval(coco_gt, iouType=iou_type)
    coco_eval.params.maxDets = max_detections(max_dets)
    warn_if_capped(coco_gt, max_detections(max_dets)[-1])
    run_cocoeval(coco_eval, load_detections(coco_gt, results), image_ids)
    return summary_stats(coco_eval)


class CocoEvaluator:
    """Collects per-image detections, then scores every seen image once with pycocotools.

    ``coco_eval[iou_type]`` is a ``COCOeval``; its ``stats`` (the 12 summary numbers) and ``eval`` are set
    by ``accumulate()`` / ``summarize()``. ``topk`` (the detections kept per image, --topk) above COCO's 100 raises
    the maxDets the summary counts at (see max_detections); at most 100 leaves COCO's (1, 10, 100). ``queries``:
    the boxes the model predicts per image (its one-to-one queries; None where detections are merged, as by TTA),
    for the warning on images with more objects than can be found (warn_if_capped).
    """

    def __init__(self, coco_gt, iou_types, topk=COCO_MAX_DETS[-1], queries=None):
        unsupported = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"unsupported iou types {unsupported}; supported: {SUPPORTED_IOU_TYPES}")
        self.coco_gt = copy.deepcopy(coco_gt)  # COCOeval annotates ground-truth dicts in place
        self.iou_types = list(iou_types)
        cocoeval = pycocotools("cocoeval")
        self.coco_eval = {t: cocoeval.COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        for coco_eval in self.coco_eval.values():
            coco_eval.params.maxDets = max_detections(topk)
        warn_if_capped(self.coco_gt, max_detections(topk)[-1], kept=topk, queries=queries)
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
        for coco_eval in self.coco_eval.values():
            run_cocoeval(coco_eval, coco_dt, self.img_ids)

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
