#!/usr/bin/env python3
"""Instance masks from detections: each detected box prompts Segment Anything (SAM); masks written as COCO RLE.

    python tools/sam_masks.py --resume <checkpoint> [main.py flags] --coco_path data/coco --out masks/
    python tools/sam_masks.py --detections bbox.json --coco_path data/coco --out masks/
    python tools/sam_masks.py --resume <checkpoint> --images photos/ --out masks/
        [--sam_model vit_h|vit_l|vit_b|sam2.1_hiera_t|_s|_b+|_l] [--sam_checkpoint FILE|URL|none]
        [--threshold 0] [--multimask] [--no_sam_iou] [--sam_batch 32] [--amp fp32|bf16|fp16] [--device cuda|cpu]
        [--max_images N]

The boxes come from our detector (--resume, built and run as tools/infer.py runs it: evaluation's one-to-one
queries, its top-k after post-processing) or from a detections json (COCO results, or tools/infer.py's
detections.json); the images from the val split under --coco_path or from --images. For each image SAM embeds the
image once, then takes its boxes (those scoring at least --threshold) in batches of --sam_batch, with
multimask_output=False (--multimask: the best of SAM's 3 masks by predicted IoU); each mask is SAM's mask logits
above its mask threshold, and its score the detection's score times SAM's predicted IoU (--no_sam_iou: the
detection's score).

Writes in --out: segm.json (COCO results with RLE masks), bbox.json (the boxes that prompted them, with the
detector's scores, in the same order), images.json (with --images: the id given to each file) and, with
--coco_path, eval.json: COCO's bbox summary and, when every annotation has a segmentation, its segm summary; both
tables are printed. docs/sam.md: the recipe, figures, SAM 2.
"""
import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from util.amp import AMP_DTYPES  # noqa: E402
from util.image_io import decode_image, read_bytes  # noqa: E402
from util.progress import Progress  # noqa: E402
from util.sam import NO_CHECKPOINT, SAM_CHECKPOINTS, SAM_MODELS  # noqa: E402


def sam_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Other arguments are main.py's, for the detector of --resume.")
    source = parser.add_argument_group("images and boxes")
    source.add_argument("--coco_path", default=None, help="images of the val split (val2017/, "
                                                          "annotations/instances_val2017.json), evaluated")
    source.add_argument("--images", nargs="+", default=None, help="image files and/or folders of images")
    source.add_argument("--max_images", type=int, default=None, help="the first N images only (by id, or in the "
                                                                    "order of --images); evaluated alone")
    source.add_argument("--detections", default=None, help="boxes from this json (COCO results, or tools/infer.py's "
                                                            "detections.json) instead of a --resume checkpoint")
    source.add_argument("--config", default=None, help="config script whose main.py flags build the detector, for "
                                                       "a checkpoint without saved arguments (ours and upstream's "
                                                       "hold them)")
    source.add_argument("--threshold", type=float, default=0.0, help="lowest detection score prompted (default: "
                                                                     "all of the detector's top-k)")
    sam = parser.add_argument_group("SAM")
    sam.add_argument("--sam_model", default="vit_h", choices=SAM_MODELS, help="SAM's image encoder (vit_*; the "
                                                                           "segment-anything package) or SAM 2.1 "
                                                                           "(sam2.1_*; the sam2 package)")
    sam.add_argument("--sam_checkpoint", default=None,
                     help=f"SAM weights, a file or URL (default: the released file of --sam_model, downloaded once "
                          f"into the checkpoint cache); '{NO_CHECKPOINT}': random weights, for tests and timing")
    sam.add_argument("--sam_batch", type=int, default=32, help="boxes per SAM prompt batch")
    sam.add_argument("--multimask", action="store_true", help="the best of SAM's 3 masks by its predicted IoU")
    sam.add_argument("--no_sam_iou", action="store_true", help="keep the detector's score (default: times SAM's "
                                                               "predicted IoU)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--amp", default="fp32", choices=sorted(AMP_DTYPES), help="precision of SAM and the detector "
                                                                             "(autocast, as main.py --amp)")
    run.add_argument("--device", default=None, help="device of SAM and the detector (default: cuda if available)")
    return parser


class ImageSet(NamedTuple):
    """The images to segment: ids (in order), {id: path}, load(id) -> PIL RGB image, and with --coco_path the
    ground truth (a pycocotools COCO) and its annotation file."""

    ids: list
    paths: dict
    load: Callable
    coco: Optional[object] = None
    ann_file: Optional[Path] = None


def coco_images(coco_path, max_images):
    """The val split under coco_path, read and checked as evaluation reads it."""
    from datasets.coco import COCO_SPLITS, CocoDetection, check_layout, dataset_root

    root = dataset_root(argparse.Namespace(coco_path=coco_path))
    check_layout(root, "val")
    folder, ann_file = COCO_SPLITS["val"]
    dataset = CocoDetection(root / folder, root / ann_file)
    paths = {i: root / folder / dataset.coco.imgs[i]["file_name"] for i in dataset.ids}
    return ImageSet(dataset.ids[:max_images], paths, dataset.load_image, dataset.coco, root / ann_file)


def folder_images(inputs, max_images):
    """Image files (folders expanded, as tools/infer.py lists them), numbered 1, 2, ... in that order."""
    from tools.infer import image_paths

    paths = dict(enumerate(image_paths(inputs), start=1))
    return ImageSet(list(paths)[:max_images], paths, lambda i: decode_image(read_bytes(paths[i]), paths[i]))


def file_detections(path, images):
    """detections(image id, PIL image) -> Detections of the detections json at `path`, matched to the image set;
    detections of images that are not in it are an error naming them."""
    from datasets.detections_file import no_detections, read_detections_file

    form, found = read_detections_file(path)
    if form == "coco":
        if images.coco is None:
            raise ValueError(f"{path} names its images by COCO image id: pass the images with --coco_path")
        unknown = sorted(set(found) - set(images.coco.getImgIds()))
        if unknown:
            raise ValueError(f"{path} has detections for {len(unknown)} image ids that are not in {images.ann_file}: "
                             f"{', '.join(map(str, unknown[:10]))}{', ...' if len(unknown) > 10 else ''}")
        categories = Counter(int(label) for dets in found.values() for label in dets.labels)
        strangers = sorted(set(categories) - set(images.coco.getCatIds()))
        if strangers:  # COCO's evaluation matches no ground truth to them: AP 0 for these boxes and masks
            print(f"warning: {sum(categories[c] for c in strangers)} detections of {path} have category ids that "
                  f"{images.ann_file} does not list ({', '.join(map(str, strangers[:10]))}"
                  f"{', ...' if len(strangers) > 10 else ''}): COCO's evaluation counts them as wrong (are they "
                  "numbered 0..K-1 rather than by the file's ids?)", file=sys.stderr)
        return lambda image_id, image: found.get(image_id, no_detections())
    if form == "files":
        ids = {p.resolve(): i for i, p in images.paths.items()}
        unknown = [str(p) for p in found if p not in ids]
        if unknown:
            raise ValueError(f"{path} has detections for {len(unknown)} files that are not among the images given: "
                             f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
        by_id = {ids[p]: entry for p, entry in found.items()}
        unlisted = [str(images.paths[i]) for i in images.ids if i not in by_id]
        if unlisted:  # tools/infer.py lists every image it ran on, those without detections too
            raise ValueError(f"{path} does not list {len(unlisted)} of the images given (was tools/infer.py run on "
                             f"them?): {', '.join(unlisted[:5])}{', ...' if len(unlisted) > 5 else ''}")

        def detections(image_id, image):
            dets, size = by_id[image_id]
            if tuple(size) != image.size:
                raise ValueError(f"{path} lists {images.paths[image_id]} as {size[0]} x {size[1]} pixels, but it is "
                                 f"{image.width} x {image.height}: its boxes are for another image")
            return dets

        return detections
    return lambda image_id, image: no_detections()


def model_detections(args, rest, device):
    """detections(image id, PIL image) -> Detections of the checkpoint's model (tools/infer.py's detector)."""
    from datasets.detections_file import sorted_detections
    from tools.infer import checkpoint_detector

    detect, _ = checkpoint_detector(argparse.Namespace(config=args.config),
                                    rest + ["--device", device, "--amp", args.amp])
    return lambda image_id, image: sorted_detections(*detect(image))


def check_args(args, rest):
    problems = []
    if (args.coco_path is None) == (args.images is None):
        problems.append("give the images with either --coco_path or --images")
    if args.detections is not None and rest:
        problems.append(f"main.py flags build the detector of --resume; with --detections they do not apply (got "
                        f"{' '.join(rest)})")
    if args.detections is None and not any(a == "--resume" or a.startswith("--resume=") for a in rest):
        problems.append("give the boxes: --resume <checkpoint> (runs the detector) or --detections <json>")
    if not 0 <= args.threshold <= 1:
        problems.append(f"--threshold is a score in [0, 1], got {args.threshold}")
    if args.sam_batch < 1:
        problems.append(f"--sam_batch must be at least 1, got {args.sam_batch}")
    if args.max_images is not None and args.max_images < 1:
        problems.append(f"--max_images must be at least 1, got {args.max_images}")
    if problems:
        raise ValueError("; ".join(problems))


class Results:
    """The COCO results of the images done so far: segm (masks, rescored) and bbox (the prompting boxes)."""

    def __init__(self, use_sam_iou):
        self.use_sam_iou = use_sam_iou
        self.segm, self.bbox, self.per_image = [], [], {}

    def add(self, image_id, detections, masks, iou):
        """One batch: Detections of B boxes, their masks bool [B, H, W] and SAM's predicted IoU [B]."""
        from datasets.coco_eval import masks_to_rle, predictions_to_coco_results

        boxes = predictions_to_coco_results(image_id, detections._asdict())
        scores = detections.scores * iou if self.use_sam_iou else detections.scores
        for box, rle, score in zip(boxes, masks_to_rle(masks), scores.tolist()):
            self.segm.append({"image_id": image_id, "category_id": box["category_id"], "segmentation": rle,
                              "score": score})
            self.bbox.append(box)
        self.per_image[image_id] = self.per_image.get(image_id, 0) + len(boxes)


def segment(images, detections, predictor, args, results):
    """SAM's masks of every image's boxes into `results`; returns (SAM seconds, skipped image paths)."""
    from util.sam import box_masks

    sam_seconds, skipped = 0.0, []
    progress = Progress(len(images.ids), "images")
    for image_id in images.ids:
        try:
            image = images.load(image_id)
        except (OSError, RuntimeError) as error:
            if images.coco is not None:
                raise
            skipped.append(str(images.paths[image_id]))
            print(f"skipped {images.paths[image_id]}: {error}", file=sys.stderr)
            progress.step()
            continue
        found = detections(image_id, image)
        keep = found.scores >= args.threshold
        found = type(found)(*(t[keep] for t in found))
        results.per_image.setdefault(image_id, 0)
        batches = box_masks(predictor, np.asarray(image), found.boxes, args.sam_batch, args.multimask, args.amp)
        start = 0
        while True:
            tic = time.perf_counter()
            batch = next(batches, None)
            sam_seconds += time.perf_counter() - tic
            if batch is None:
                break
            masks, iou = batch
            results.add(image_id, type(found)(*(t[start:start + len(iou)] for t in found)), masks, iou)
            start += len(iou)
        done = len(results.segm)
        progress.step(f"{done} masks, {done / sam_seconds:.2f} masks/s" if sam_seconds else f"{done} masks")
    progress.close()
    return sam_seconds, skipped


def evaluate(images, results):
    """COCO's bbox and (when every annotation has one) segm summaries of the processed images: prints the tables,
    returns {"bbox": stats, "segm": stats}."""
    from datasets.coco_eval import COCO_MAX_DETS, evaluate_results

    evaluated = sorted(results.per_image)
    max_dets = max([COCO_MAX_DETS[-1], *results.per_image.values()])
    annotations = images.coco.dataset["annotations"]
    unsegmented = sum(1 for a in annotations if not a.get("segmentation"))
    stats = {}
    for iou_type, found in (("bbox", results.bbox), ("segm", results.segm)):
        if iou_type == "segm" and (unsegmented or not annotations):
            print(f"segm not evaluated: {unsegmented} of the {len(annotations)} annotations in {images.ann_file} "
                  "have no segmentation")
            continue
        values, lines = evaluate_results(images.coco, found, iou_type, evaluated, max_dets)
        print(f"IoU metric: {iou_type}" + (" (the detector's boxes and scores)" if iou_type == "bbox" else ""),
              *lines, sep="\n")
        stats[iou_type] = values.tolist()
    return stats


def write_json(path, value):
    path.write_text(json.dumps(value, separators=(",", ":")))
    print(f"wrote {path}")


def main(argv=None, predictor=None):
    """Run the tool; `predictor` replaces SAM (an object with SamPredictor's interface, see util.sam)."""
    started = time.perf_counter()
    args, rest = sam_args_parser().parse_known_args(argv)
    check_args(args, rest)
    checkpoint = args.sam_checkpoint or SAM_CHECKPOINTS[args.sam_model]
    if predictor is None:  # the optional package and the weights' file, before anything slow
        from util.sam import check_sam_arguments, segment_anything

        segment_anything(args.sam_model)
        check_sam_arguments(args.sam_model, checkpoint)
    images = coco_images(args.coco_path, args.max_images) if args.coco_path else folder_images(args.images,
                                                                                                args.max_images)
    import torch

    from util import amp as mixed_precision
    from util.sam import build_sam_predictor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    detections = file_detections(args.detections, images) if args.detections else None
    if predictor is None:
        mixed_precision.warn_if_slow(device, args.amp)
        if checkpoint == NO_CHECKPOINT:
            print(f"warning: {args.sam_model} with random weights (--sam_checkpoint {NO_CHECKPOINT}): the masks "
                  "mean nothing", file=sys.stderr)
        predictor = build_sam_predictor(args.sam_model, checkpoint, device)
    if detections is None:
        detections = model_detections(args, rest, device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(use_sam_iou=not args.no_sam_iou)
    with torch.inference_mode():
        sam_seconds, skipped = segment(images, detections, predictor, args, results)
    write_json(out / "segm.json", results.segm)
    write_json(out / "bbox.json", results.bbox)
    if images.coco is None:
        write_json(out / "images.json", [{"id": i, "file": str(images.paths[i])} for i in images.ids
                                         if str(images.paths[i]) not in skipped])
    else:
        write_json(out / "eval.json", evaluate(images, results))
    masks = len(results.segm)
    rate = f": {masks / sam_seconds:.2f} masks/s" if sam_seconds else ""
    print(f"{masks} masks of {len(results.per_image)} images in {sam_seconds:.1f} s of SAM (embedding and "
          f"prompting){rate}; {time.perf_counter() - started:.1f} s in all"
          + (f"; {len(skipped)} images skipped" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, ImportError) as err:
        sys.exit(f"sam_masks: {err}")
