#!/usr/bin/env python3
"""Detect objects in image files with a trained model; write the detections as JSON and draw them.

    python tools/infer.py --resume exps/run/checkpoint.pth --images photo.jpg photos/ --out detections/
                          [--threshold 0.3] [--no_draw] [--config configs/...sh] [main.py flags]
    python tools/infer.py --onnx model.onnx --images photo.jpg photos/ --out detections/ [--threshold 0.3]

The model is built from the arguments saved in the checkpoint (else from --config), overridden by main.py flags
given here (e.g. --device cpu), and run as evaluation runs it: one-to-one queries, the validation resize
(--val_scale / --max_size), or with --tta the multi-scale test of `main.py --eval --tta` (same flags, same code), in
float32 or with --amp bf16|fp16 under autocast (the checkpoint's training precision does not carry over).
Boxes are in the pixels of each original image. Category names come from the annotation file under --coco_path
when there is one. An image that cannot be read is reported and skipped.

With --onnx, a file written by tools/export_onnx.py runs in onnxruntime, with numpy and PIL: torch is not
imported. The resize, --topk and the category names are those written into the file at export.
"""
import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import ImageDraw  # noqa: E402

from util.image_io import decode_image, read_bytes  # noqa: E402
from util.output_dir import check_output_path  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # a GIF: its first frame


def infer_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are main.py's (python main.py --help lists them).")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or directories of images")
    parser.add_argument("--out", required=True, help="output directory: detections.json and drawn images")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score kept")
    parser.add_argument("--no_draw", action="store_true", help="write detections.json only")
    parser.add_argument("--config", default=None, help="config script whose main.py flags build the model "
                                                       "(when the checkpoint carries no arguments)")
    parser.add_argument("--onnx", default=None, help="run this exported model (tools/export_onnx.py) with "
                                                     "onnxruntime instead of a checkpoint")
    return parser


def image_paths(inputs):
    """The image files among `inputs`, directories expanded (sorted), each file once (a folder and a file in it
    name it twice: kept where it comes first); a missing path is an error."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"no image or directory at {item}")
    if not paths:
        raise FileNotFoundError(f"no image files in {' '.join(inputs)}")
    first = {}
    for path in paths:
        first.setdefault(path.resolve(), path)
    return list(first.values())


def drawing_names(paths):
    """A distinct file name for each image's drawing: <stem>_detections.jpg; where stems repeat (a/x.jpg and
    b/x.jpg), the image's path below the images' common folder, separators and dots made underscores; a name that
    still repeats gets the first suffix _2, _3, ... that no other image's name takes (compared ignoring case, as
    some file systems do)."""
    stems = Counter(path.stem for path in paths)
    common = Path(os.path.commonpath([str(path.resolve().parent) for path in paths]))
    bases = [path.stem if stems[path.stem] == 1 else
             "_".join(path.resolve().relative_to(common).parts).replace(".", "_") for path in paths]
    taken = {base.casefold() for base in bases}  # each image's own name, kept for it
    used, names = set(), []
    for base in bases:
        name, suffix = base, 1
        while name.casefold() in used or (name != base and name.casefold() in taken):
            suffix += 1
            name = f"{base}_{suffix}"
        used.add(name.casefold())
        names.append(f"{name}_detections.jpg")
    return names


def format_detections(scores, labels, boxes, threshold):
    """[{"label", "score", "box"}] (xyxy pixels) of one image's top-k detections scoring at least `threshold`."""
    return [{"label": int(label), "score": round(float(score), 4), "box": [round(float(v), 1) for v in box]}
            for score, label, box in zip(scores, labels, boxes) if score >= threshold]


def checkpoint_detector(args, rest):
    """(detect: PIL image -> (scores, labels, boxes), {category id: name}) of the model rebuilt from --resume; with
    --tta the passes of every scale (and flip) merged as `main.py --eval --tta` merges them."""
    import torch

    from datasets.coco import category_names, transform_options
    from datasets.transforms import make_coco_transforms
    from datasets.tta import MultiScaleViews, TestTimeAugmentation
    from models.trained_model import trained_model
    from util import amp as mixed_precision
    from util.misc import nested_tensor_from_tensor_list

    model, postprocessors, model_args = trained_model(rest, args.config)  # flag values checked there
    device = torch.device(model_args.device)
    mixed_precision.warn_if_slow(device, model_args.amp)
    transform = make_coco_transforms("val", **transform_options(model_args))
    tta = TestTimeAugmentation.from_args(model_args, postprocessors["bbox"]) if model_args.tta else None
    if tta is not None:
        transform = MultiScaleViews(transform, tta.scales)
        print(tta)

    @torch.no_grad()
    def detect(image):
        tensor, target = transform(image, {})
        tensor, views = tensor if tta is not None else (tensor, None)
        samples = nested_tensor_from_tensor_list([tensor.to(device)])
        # eval mode (the one-to-one queries), in the --amp precision as evaluation runs it
        outputs = mixed_precision.forward(model, samples, device, model_args.amp)
        orig_size = torch.tensor([image.height, image.width], device=device)
        result = postprocessors["bbox"](outputs, orig_size[None])[0]
        if tta is not None:
            target = {"size": target["size"].to(device), "orig_size": orig_size}
            result = tta(model, samples, [target], [result], [views], model_args.amp)[0]
        return result["scores"].cpu(), result["labels"].cpu(), result["boxes"].cpu()

    return detect, category_names(model_args.coco_path)


def onnx_detector(args, rest):
    """(detect, names) of an exported model run by onnxruntime; nothing here imports torch."""
    from util.onnx_runtime import OnnxDetector

    if rest:
        raise ValueError(f"--onnx runs the exported model as it is: main.py flags do not apply (got {' '.join(rest)})")
    if args.config:
        raise ValueError("--onnx runs the exported model as it is: --config does not apply")
    if not Path(args.onnx).is_file():
        raise FileNotFoundError(f"--onnx {args.onnx}: no such file")
    detector = OnnxDetector(args.onnx)
    return (lambda image: detector.detect([image])[0]), detector.names


def draw(image, detections, names):
    """A copy of the image with each detection's box and "name score" drawn."""
    image = image.copy()
    canvas = ImageDraw.Draw(image)
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        canvas.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=2)
        canvas.text((x0 + 2, y0 + 1), f"{names.get(det['label'], det['label'])} {det['score']:.2f}",
                    fill=(255, 255, 0))
    return image


def main(argv=None):
    args, rest = infer_args_parser().parse_known_args(argv)
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold is a score in [0, 1], got {args.threshold}")
    check_output_path(args.out, "--out", directory=True)  # before the model is loaded
    detect, names = onnx_detector(args, rest) if args.onnx else checkpoint_detector(args, rest)
    paths = image_paths(args.images)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    for path, drawing in zip(paths, drawing_names(paths)):
        try:
            image = decode_image(read_bytes(path), path)
        except (OSError, RuntimeError) as err:
            skipped.append(str(path))
            print(f"skipped {path}: {err}", file=sys.stderr)
            continue
        detections = format_detections(*detect(image), args.threshold)
        for det in detections:
            if det["label"] in names:
                det["name"] = names[det["label"]]
        results.append({"file": str(path), "width": image.width, "height": image.height, "detections": detections})
        if not args.no_draw:
            draw(image, detections, names).save(out / drawing, quality=90)
            results[-1]["drawing"] = drawing
        print(f"{path}: {len(detections)} detections")
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'detections.json'} ({len(results)} images" + (f", {len(skipped)} skipped)" if skipped
                                                                          else ")"))
    return 1 if skipped else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        sys.exit(f"infer: {err}")
