#!/usr/bin/env python3
"""Table and figure of a hybrid vs one-to-one comparison (the <variant>_seed<N> run folders of a directory).

    python tools/compare_hybrid.py exps/demo/compare                  # table; figure exps/demo/compare.png
    python tools/compare_hybrid.py exps/demo/compare --out fig.png
    python tools/compare_hybrid.py exps/demo/compare --no_figure

tools/compare_hybrid.sh trains the runs and then calls this. The figure needs matplotlib; without it the table is
still printed, with a note.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util import compare_runs, plot_utils  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="folder holding <variant>_seed<N> run folders")
    parser.add_argument("--out", type=Path, default=None, help="figure to write (default: <directory>.png)")
    parser.add_argument("--no_figure", action="store_true", help="only the table")
    args = parser.parse_args(argv)

    groups = compare_runs.find_runs(args.directory)
    print(compare_runs.table(groups))
    if args.no_figure:
        return 0
    folder = args.directory.resolve()  # "." has no name of its own
    out = plot_utils.figure_path(args.out or folder.parent / f"{folder.name}.png")  # beside the folder
    try:
        compare_runs.plot(groups, out=out)
    except ImportError as err:
        print(f"compare_hybrid: no figure ({err})", file=sys.stderr)
        return 0
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"compare_hybrid: {err}")
