#!/usr/bin/env python3
"""Compare runs: print each run's epochs and best / last COCO AP, and optionally draw curves.

    python tools/plot_logs.py exps/run_a exps/run_b
    python tools/plot_logs.py exps/run_a exps/run_b --out curves.png --fields loss class_error mAP --ewm 1
    python tools/plot_logs.py --pr exps/run_a/eval/latest.pth exps/run_b/eval/latest.pth --out pr.png

Drawing (--out) needs matplotlib.
"""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util import plot_utils  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories (or log files); with --pr, eval/*.pth files")
    parser.add_argument("--fields", nargs="+", default=["class_error", "loss_bbox_unscaled", "mAP"],
                        help="fields to plot: loss names without train_/test_, or mAP, AP50, AP75, AP_small, ...")
    parser.add_argument("--ewm", type=float, default=0.0, help="smoothing centre of mass (0: none)")
    parser.add_argument("--pr", action="store_true", help="precision-recall curves of saved evaluations")
    parser.add_argument("--out", default=None, help="image file to write (needs matplotlib)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:  # e.g. a log's last line skipped: one line each, once
        warnings.simplefilter("always")
        try:
            return report(args)
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught):
                print(f"plot_logs: {message}", file=sys.stderr)


def report(args):
    """Print the summaries (or AP50s) of args.paths and draw args.out when asked."""
    if args.pr:
        for path in args.paths:
            recall, precision, _ = plot_utils.precision_recall(plot_utils.load_evaluation(path))
            print(f"{path}: AP50 {precision.mean():.4f}")
        if args.out:
            plot_utils.plot_precision_recall(args.paths, out=args.out)
    else:
        for path in args.paths:
            s = plot_utils.summarize(plot_utils.read_log(path))
            if "best_mAP" in s:
                print(f"{path}: {s['epochs']} epochs, best mAP {s['best_mAP']:.4f} (epoch {s['best_epoch']}), "
                      f"last mAP {s['last_mAP']:.4f}, last AP50 {s['last_AP50']:.4f}")
            else:
                print(f"{path}: {s['epochs']} epochs, no evaluation yet")
        if args.out:
            plot_utils.plot_logs(args.paths, fields=args.fields, ewm_col=args.ewm, out=args.out)
    if args.out:
        print(f"wrote {plot_utils.figure_path(args.out)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, ImportError) as err:
        sys.exit(f"plot_logs: {err}")
