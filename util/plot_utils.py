"""Training curves and precision-recall curves from the files a run writes (log.txt, eval/*.pth).

Reading and summarising needs nothing beyond the project's dependencies; drawing needs matplotlib
(`pip install matplotlib`), imported only when a figure is made.
"""
import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

# COCO summary entries of "test_coco_eval_bbox" that can be plotted by name
COCO_FIELDS = {"mAP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5}


class IncompleteLogWarning(UserWarning):
    """A log's last line was cut short (its run killed while writing it) and is left out."""


class RepeatedEpochWarning(UserWarning):
    """A log names an epoch more than once (a resumed upstream run appends the epochs it trains again): the later
    line of each is kept."""


def read_log(path):
    """The records of a log.txt (one JSON object per line, one line per epoch), in file order. A last line that is
    not JSON and lacks its newline (a run killed while writing it) is left out with an IncompleteLogWarning; any
    other line that is not JSON is an error. An epoch logged more than once keeps its later line, in the place of
    that line, with a RepeatedEpochWarning (main.py trims its log on resume; upstream's runs appended)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: skipped the last line (line {number}), which is incomplete (was the run "
                              f"killed while writing it?); {len(records)} complete records read",
                              IncompleteLogWarning, stacklevel=2)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg})") from None
    return _latest_per_epoch(records, path)


def _latest_per_epoch(records, path):
    """records without the earlier lines of an epoch that a later line logs again."""
    epochs = [r.get("epoch") if isinstance(r, dict) else None for r in records]
    last = {epoch: i for i, epoch in enumerate(epochs) if epoch is not None}
    superseded = [i for i, epoch in enumerate(epochs) if epoch is not None and last[epoch] != i]
    if superseded:
        repeated = sorted({epochs[i] for i in superseded})
        shown = ", ".join(map(str, repeated[:10])) + (", ..." if len(repeated) > 10 else "")
        warnings.warn(f"{path}: epochs {shown} are logged more than once (a resumed run appended them): the later "
                      f"line of each is used, {len(superseded)} earlier lines left out", RepeatedEpochWarning,
                      stacklevel=3)
    dropped = set(superseded)
    return [r for i, r in enumerate(records) if i not in dropped]


def metric_series(records, field):
    """(epochs, train values, test values) of one field; a missing value is nan.

    `field` is a loss or statistic name without its train_/test_ prefix (e.g. "class_error",
    "loss_bbox_unscaled"), or a COCO summary entry: "mAP" (AP at IoU .50:.95), "AP50", "AP75", "AP_small", ...
    """
    epochs = [r.get("epoch", i) for i, r in enumerate(records)]
    if field in COCO_FIELDS:
        index = COCO_FIELDS[field]
        test = [r["test_coco_eval_bbox"][index] if "test_coco_eval_bbox" in r else math.nan for r in records]
        return epochs, [math.nan] * len(records), test
    train = [r.get(f"train_{field}", math.nan) for r in records]
    test = [r.get(f"test_{field}", math.nan) for r in records]
    if all(math.isnan(v) for v in train + test):
        known = sorted({k.split("_", 1)[1] for r in records for k, v in r.items()
                        if k.startswith(("train_", "test_")) and isinstance(v, (int, float))})
        raise ValueError(f"no field {field!r} in the log; known fields: {', '.join(known + list(COCO_FIELDS))}")
    return epochs, train, test


def smooth(values, com=0.0):
    """Exponentially weighted mean with centre of mass `com` (pandas' ewm(com).mean(), adjust=True); nan
    values are skipped and keep their place. com=0 returns the values unchanged."""
    if com < 0:
        raise ValueError(f"com must be >= 0, got {com}")
    decay = com / (1.0 + com)
    out, weighted, total = [], 0.0, 0.0
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
            continue
        weighted = weighted * decay + v
        total = total * decay + 1.0
        out.append(weighted / total)
    return out


def summarize(records):
    """Epochs run, best mAP (COCO AP at IoU .50:.95) with its epoch, and the last mAP / AP50 of a log."""
    _, _, ap = metric_series(records, "mAP")
    _, _, ap50 = metric_series(records, "AP50")
    evaluated = [(v, e) for v, e in zip(ap, (r.get("epoch", i) for i, r in enumerate(records))) if not math.isnan(v)]
    summary = {"epochs": len(records)}
    if evaluated:
        best, best_epoch = max(evaluated)
        summary.update(best_mAP=best, best_epoch=best_epoch, last_mAP=ap[-1], last_AP50=ap50[-1])
    return summary


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("drawing curves needs matplotlib: pip install matplotlib") from err
    return plt


def figure_path(out):
    """The file a figure asked for as `out` goes to: a name without a suffix gets .png (matplotlib's default
    format, which it adds itself), so that what is reported is what is written."""
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".png")


def _finish(fig, axes, out):
    """Grid and legend on every panel; write the figure to figure_path(out) when given. Returns (figure, axes)."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    if out is not None:
        fig.savefig(figure_path(out), dpi=100)
    return fig, axes


def plot_logs(logs, fields=("class_error", "loss_bbox_unscaled", "mAP"), ewm_col=0, log_name="log.txt",
              out=None):
    """One panel per field, one colour per run: training values solid, evaluation values dashed.

    logs: run directories (or log files); ewm_col: smoothing centre of mass (0 = none); out: image file to write.
    Returns (figure, axes).
    """
    if isinstance(logs, (str, Path)):
        logs = [logs]
    runs = []
    for p in map(Path, logs):
        records = read_log(p / log_name if p.is_dir() else p)
        # every series first: a misspelt field fails before matplotlib is needed
        runs.append((p.name if p.is_dir() else p.parent.name, [metric_series(records, f) for f in fields]))
    plt = _pyplot()
    fig, axes = plt.subplots(ncols=len(fields), figsize=(5 * len(fields), 4), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (label, series) in enumerate(runs):
        colour = colours[run_index % len(colours)]
        for ax, (epochs, train, test) in zip(axes, series):
            if not all(math.isnan(v) for v in train):
                ax.plot(epochs, smooth(train, ewm_col), color=colour, label=f"{label} train")
            if not all(math.isnan(v) for v in test):
                ax.plot(epochs, smooth(test, ewm_col), color=colour, linestyle="--", label=f"{label} test")
    for ax, field in zip(axes, fields):
        ax.set(title=field, xlabel="epoch")
    return _finish(fig, axes, out)


def _evaluation_globals():
    """What a saved COCOeval.eval dict pickles besides tensors: pycocotools' Params and numpy arrays."""
    from pycocotools.cocoeval import Params

    core = getattr(np, "_core", None) or np.core
    names = [Params, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    names += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return names


def load_evaluation(path):
    """A saved evaluation (eval/latest.pth: COCOeval.eval with "precision" [T, R, K, A, M], "recall", "scores",
    "params"), loaded with weights_only=True and only pycocotools' Params and numpy arrays allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation file at {path}")
    try:
        with torch.serialization.safe_globals(_evaluation_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:  # not a torch file, or one holding more
        raise ValueError(f"{path} is not a saved COCO evaluation: a weights-only torch.load cannot read it "
                         f"({_load_failure(error)})") from None
    if not isinstance(data, dict) or "precision" not in data or "params" not in data:
        raise ValueError(f"{path} is not a saved COCO evaluation (expected COCOeval.eval with 'precision')")
    return data


def _load_failure(error):
    """The gist of a failed torch.load in one line: weights-only's own reason (an object it refuses, a byte that
    is no pickle code), or the first sentence of another error."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else f"{type(error).__name__}: the file ends early"


def precision_recall(evaluation, iou=0.5, area="all", max_dets=None):
    """(recall thresholds [R], precision [R] and detection score [R] averaged over the categories with ground
    truth) at one IoU threshold, area range and detection limit (default: the largest evaluated, COCO's 100 unless
    --topk raised it)."""
    params = evaluation["params"]
    t = int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou)))
    a = list(params.areaRngLbl).index(area)
    max_dets = params.maxDets[-1] if max_dets is None else max_dets
    if max_dets not in params.maxDets:
        raise ValueError(f"max_dets {max_dets} was not evaluated: maxDets {list(params.maxDets)}")
    m = list(params.maxDets).index(max_dets)
    precision = np.asarray(evaluation["precision"])[t, :, :, a, m]  # [R, K], -1 where a category has no GT
    scores = np.asarray(evaluation["scores"])[t, :, :, a, m]
    valid = (precision > -1).any(0)
    if not valid.any():
        raise ValueError("no category with ground truth in this evaluation")
    return np.asarray(params.recThrs), precision[:, valid].mean(1), scores[:, valid].mean(1)


def plot_precision_recall(files, naming_scheme="iter", out=None):
    """Precision and score against recall (IoU 0.5, all areas, the largest maxDets) for saved evaluations.

    naming_scheme "iter" labels each curve by its file name, "exp_id" by the run directory (eval/'s parent).
    Returns (figure, axes).
    """
    if naming_scheme not in ("iter", "exp_id"):
        raise ValueError(f"naming_scheme must be 'iter' or 'exp_id', got {naming_scheme!r}")
    plt = _pyplot()
    fig, axes = plt.subplots(ncols=2, figsize=(10, 4))
    for f in files:
        f = Path(f)
        recall, precision, scores = precision_recall(load_evaluation(f))
        label = f.stem if naming_scheme == "iter" else f.parent.parent.name
        label = f"{label} (AP50 {precision.mean():.3f})"
        axes[0].plot(recall, precision, label=label)
        axes[1].plot(recall, scores, label=label)
    axes[0].set(title="precision / recall", xlabel="recall", ylabel="precision")
    axes[1].set(title="score / recall", xlabel="recall", ylabel="score")
    return _finish(fig, axes, out)
