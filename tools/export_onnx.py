#!/usr/bin/env python3
"""Export a trained model to ONNX and check the file against PyTorch with onnxruntime.

    python tools/export_onnx.py --resume exps/run/checkpoint.pth --out model.onnx [--with_postprocess]
                                [--config configs/...sh] [--example_size H W] [--opset N] [--no_check] [main.py flags]

The model is rebuilt from the arguments saved in the checkpoint (else from --config), overridden by main.py flags
given here, and exported in eval mode on the CPU: the one-to-one queries, deformable attention on the PyTorch path
(grid_sample; the compiled ops are not exportable), no gradient checkpointing. The graph takes "images"
[B, 3, H, W] (normalised, padded bottom/right) and "mask" [B, H, W] (True on padding), with dynamic B, H and W,
and returns "pred_logits" and "pred_boxes"; --with_postprocess adds the input "orig_sizes" [B, 2] (h, w) and the
outputs "scores", "labels" and "boxes" (the --topk best, xyxy in pixels of orig_sizes). The evaluation resize,
--topk and the category names (from the annotation file under --coco_path, when found) are written into the
file's metadata, for tools/infer.py --onnx. Then onnx.checker checks the file and onnxruntime runs it on random
images of three sizes of the evaluation resize and a padded batch of two, against PyTorch (max abs difference of
logits and boxes at most 1e-4). Needs onnx, onnxscript and onnxruntime.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import category_names, transform_options  # noqa: E402
from datasets.transforms import eval_resize  # noqa: E402
from models.onnx_export import (  # noqa: E402
    CHECK_TOLERANCE,
    EXAMPLE_SIZE,
    MIN_EXAMPLE_SIDE,
    check_export,
    check_sizes,
    export_metadata,
    export_onnx,
    import_onnx_packages,
    opsets_written,
    supported_opsets,
)
from models.trained_model import trained_model  # noqa: E402
from util.arguments import get_args_parser, tta_options_given  # noqa: E402
from util.onnx_runtime import import_onnxruntime  # noqa: E402
from util.output_dir import check_output_path  # noqa: E402


def export_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are main.py's (python main.py --help lists them).")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--with_postprocess", action="store_true",
                        help="include the post-processing: top-k scores, labels and boxes in pixels of orig_sizes")
    parser.add_argument("--config", default=None, help="config script whose main.py flags build the model "
                                                       "(when the checkpoint carries no arguments)")
    parser.add_argument("--example_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image size traced with (default 800 1066, at least 400 a side); the graph runs on "
                             "any size")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset, from 18 to the newest the installed onnx package defines (default: "
                             "torch.onnx's); the file is written in exactly this one")
    parser.add_argument("--no_check", action="store_true", help="skip onnx.checker and the onnxruntime comparison")
    return parser


def tta_flags(rest):
    """The test-time augmentation flags among main.py's `rest`: the export writes the single-scale graph only."""
    given = get_args_parser().parse_known_args(rest)[0]
    return ["--tta"] * given.tta + tta_options_given(given)


def main(argv=None):
    args, rest = export_args_parser().parse_known_args(argv)
    if args.example_size and min(args.example_size) < MIN_EXAMPLE_SIDE:
        raise ValueError(f"--example_size must be at least {MIN_EXAMPLE_SIDE} on each side, got {args.example_size}")
    import_onnx_packages()
    if args.opset is not None and args.opset not in supported_opsets():
        raise ValueError(f"--opset {args.opset}: {opsets_written()}")
    tta = tta_flags(rest)
    if tta:
        raise ValueError(f"{', '.join(tta)}: the export writes the single-scale evaluation graph; the "
                         "multi-scale test runs in PyTorch (main.py --eval --tta, tools/infer.py --tta)")
    check_output_path(args.out, "--out", directory=False)  # before the model is built and exported
    if not args.no_check:
        import_onnxruntime()
    # the export traces on the CPU whatever the model was trained on
    model, postprocessors, model_args = trained_model(
        rest, args.config, device="cpu",
        fp32_only="the export writes the float32 graph (mixed precision is for training and evaluation in PyTorch)")
    postprocess = postprocessors["bbox"]
    options = transform_options(model_args)
    val_scale, max_size = eval_resize(options["scales"], options["max_size"], options["val_size"])
    example_size = tuple(args.example_size or EXAMPLE_SIZE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # missing folders: check_output_path made sure they can be

    start = time.perf_counter()
    export_onnx(model, out, postprocess if args.with_postprocess else None, example_size,
                export_metadata(val_scale, max_size, model_args.topk, category_names(model_args.coco_path)),
                args.opset)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB) in {seconds:.1f} s; traced at {example_size}, "
          f"evaluation resize {val_scale} (max {max_size})")
    if args.no_check:
        return 0
    report = check_export(model, out, check_sizes(val_scale, max_size),
                          postprocess if args.with_postprocess else None)
    for shapes, logits_diff, boxes_diff in report:
        print(f"  onnxruntime vs PyTorch, images {shapes}: max |logits diff| {logits_diff:.1e}, "
              f"max |boxes diff| {boxes_diff:.1e}")
    print(f"checked: onnx.checker passed, onnxruntime within {CHECK_TOLERANCE:.0e} of PyTorch")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        sys.exit(f"export_onnx: {err}")
