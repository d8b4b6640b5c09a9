"""Write the synthetic shapes dataset in COCO layout (skipped when an identical one is already there).

Example: python tools/make_synthetic_coco.py --out data/synthetic --num_train 800 --num_val 100

It replaces only what it wrote itself (a folder with its manifest.json): a folder holding COCO's files (annotations
or images named like 000000000001.jpg) without that manifest is refused, not overwritten.
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic import SyntheticConfig, generation_parameters, make_synthetic_coco, read_manifest  # noqa: E402

# knobs with their own flags below, or set through the dedicated options
_DEDICATED = {"image_size"}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", type=Path, help="output folder")
    parser.add_argument("--num_train", default=800, type=int)
    parser.add_argument("--num_val", default=100, type=int)
    parser.add_argument("--image_size", default=128, type=int, help="geometric mean of image width and height")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--force", action="store_true", help="regenerate even if the output matches")
    for field in fields(SyntheticConfig):
        if field.name not in _DEDICATED:
            parser.add_argument(f"--{field.name}", default=field.default, type=type(field.default),
                                help=f"generator knob (default {field.default})")
    return parser


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    knobs = {f.name: getattr(args, f.name) for f in fields(SyntheticConfig) if f.name not in _DEDICATED}
    cfg = SyntheticConfig(image_size=args.image_size, **knobs)
    wanted = generation_parameters(args.num_train, args.num_val, args.seed, cfg)
    ann_files = [args.out / "annotations" / f"instances_{split}2017.json" for split in ("train", "val")]
    complete = all(path.is_file() for path in ann_files)
    if not args.force and complete and read_manifest(args.out) == wanted:
        print(f"{args.out}: already generated with these parameters, nothing to do (use --force to redo)")
        return 0
    summary = make_synthetic_coco(args.out, args.num_train, args.num_val, image_size=args.image_size,
                                  seed=args.seed, **knobs)
    for split, info in summary["splits"].items():
        print(f"{split}: {info['images']} images, {info['objects']} objects -> {info['image_dir']}, "
              f"{info['ann_file']}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileExistsError) as err:  # a knob out of range (SyntheticConfig); a folder not its own
        sys.exit(f"make_synthetic_coco: {err}")
