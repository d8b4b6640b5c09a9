"""Variants of a training run over several seeds, as tools/compare_hybrid.sh leaves them (one folder per run,
<variant>_seed<N>, each with log.txt and wall_time.txt): COCO AP and AP50 per epoch and per training time, their
mean and spread over seeds, as a table and a figure.

Reading and the table need nothing beyond the project's dependencies; the figure needs matplotlib.
"""
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from util import plot_utils

RUN_FOLDER = re.compile(r"^(?P<variant>.+)_seed(?P<seed>\d+)$")
WALL_TIME = "wall_time.txt"  # seconds of the whole main.py process, written by tools/compare_hybrid.sh


@dataclass
class Run:
    """One run's evaluation after every epoch (epoch -> value) and its times in seconds (nan when not logged)."""
    variant: str
    seed: int
    path: Path
    ap: dict
    ap50: dict
    train_time: dict
    test_time: dict
    wall_time: float  # nan without wall_time.txt


def load_run(path, variant, seed):
    """A Run from a run folder; a missing or empty log.txt, an epoch without COCO evaluation or a wall_time.txt
    that is not a number is an error naming the file."""
    path = Path(path)
    records = plot_utils.read_log(path / "log.txt")
    if not records:
        raise ValueError(f"{path / 'log.txt'} has no epoch lines (the run has not finished an epoch)")
    epochs, _, ap = plot_utils.metric_series(records, "mAP")
    _, _, ap50 = plot_utils.metric_series(records, "AP50")
    for epoch, value in zip(epochs, ap):
        if math.isnan(value):
            raise ValueError(f"{path / 'log.txt'}: epoch {epoch} has no COCO evaluation (test_coco_eval_bbox)")
    times = {key: {e: r.get(key, math.nan) for e, r in zip(epochs, records)} for key in ("train_time", "test_time")}
    wall_time = math.nan
    if (path / WALL_TIME).is_file():
        text = (path / WALL_TIME).read_text().strip()
        try:
            wall_time = float(text)
        except ValueError:
            raise ValueError(f"{path / WALL_TIME}: expected seconds, got {text!r}") from None
    return Run(variant, seed, path, dict(zip(epochs, ap)), dict(zip(epochs, ap50)), times["train_time"],
               times["test_time"], wall_time)


def find_runs(directory):
    """{variant: [Run, ...] by seed} of the <variant>_seed<N> folders in `directory`, variants in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no comparison folder at {directory}")
    found = sorted((m["variant"], int(m["seed"]), p) for p in directory.iterdir()
                   if p.is_dir() and (m := RUN_FOLDER.match(p.name)))
    if not found:
        raise FileNotFoundError(f"no run folders (<variant>_seed<N>) in {directory}")
    groups = {}
    for variant, seed, path in found:
        groups.setdefault(variant, []).append(load_run(path, variant, seed))
    return groups


def spread(values):
    """(mean, sample standard deviation (nan for one value), min, max) of a list of numbers; all nan when one is."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan, math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, min(values), max(values)


def common_epochs(groups):
    """The epochs every run of every variant has evaluated, in order."""
    runs = [run for group in groups.values() for run in group]
    return sorted(set.intersection(*(set(run.ap) for run in runs)))


def cumulative_minutes(run, key="train_time"):
    """{epoch: minutes of `key` (train_time or test_time) summed up to and including that epoch}."""
    total, out = 0.0, {}
    for epoch in sorted(run.ap):
        total += getattr(run, key)[epoch]
        out[epoch] = total / 60
    return out


def series(group, epochs, metric):
    """Per epoch (mean, std, min, max) over the seeds of one variant; metric: "ap", "ap50" or "minutes" (training
    time up to the end of the epoch)."""
    if metric == "minutes":
        values = [cumulative_minutes(run) for run in group]
    else:
        values = [getattr(run, metric) for run in group]
    return [spread(v[epoch] for v in values) for epoch in epochs]


def _cell(stats, digits=3):
    mean, std, _, _ = stats
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _seconds_cell(values):
    values = [v for v in values if not math.isnan(v)]
    return _cell(spread(v / 60 for v in values), 1) + " min" if values else "n/a"


def table(groups):
    """The comparison as text: after each epoch (counted from 1), AP, AP50 and training minutes of each variant
    (mean ± std over seeds) and, for two variants, the difference of mean AP; then each variant's seeds, times and
    last AP range."""
    epochs = common_epochs(groups)
    if not epochs:
        raise ValueError("the runs have no evaluated epoch in common")
    names = list(groups)
    columns = ["epochs"] + [f"{n} AP" for n in names]
    if len(names) == 2:
        columns.append(f"AP {names[0]} - {names[1]}")
    columns += [f"{n} AP50" for n in names] + [f"{n} train min" for n in names]
    stats = {n: {m: series(groups[n], epochs, m) for m in ("ap", "ap50", "minutes")} for n in names}
    rows = []
    for i, epoch in enumerate(epochs):
        row = [str(epoch + 1)] + [_cell(stats[n]["ap"][i]) for n in names]
        if len(names) == 2:
            row.append(f"{stats[names[0]]['ap'][i][0] - stats[names[1]]['ap'][i][0]:+.3f}")
        row += [_cell(stats[n]["ap50"][i]) for n in names] + [_cell(stats[n]["minutes"][i], 1) for n in names]
        rows.append(row)
    widths = [max(len(r[c]) for r in [columns] + rows) for c in range(len(columns))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(row, widths)) for row in [columns] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for n in names:
        group = groups[n]
        _, _, low, high = stats[n]["ap"][-1]
        lines.append(f"{n}: {len(group)} seed(s) ({', '.join(str(r.seed) for r in group)}); AP after "
                     f"{epochs[-1] + 1} epochs {_cell(stats[n]['ap'][-1])} (min {low:.3f}, max {high:.3f}); "
                     f"training {_seconds_cell([sum(r.train_time.values()) for r in group])}, "
                     f"evaluation {_seconds_cell([sum(r.test_time.values()) for r in group])}, "
                     f"whole run {_seconds_cell([r.wall_time for r in group])}")
    longer = sorted(str(r.path) for g in groups.values() for r in g if max(r.ap) > epochs[-1])
    if longer:
        lines.append(f"(epochs after {epochs[-1] + 1} left out, not in every run: {', '.join(longer)})")
    lines.append("mean ± sample std over seeds; train min: training time up to the end of the epoch (evaluation "
                 "excluded)")
    return "\n".join(lines)


def plot(groups, out=None):
    """AP and AP50 against epochs trained (top) and against training time (bottom), one colour per variant: the
    mean over seeds as a line, the min-max range shaded. Writes `out` when given; returns (figure, axes [2, 2])."""
    epochs = common_epochs(groups)
    if not epochs:
        raise ValueError("the runs have no evaluated epoch in common")
    plt = plot_utils._pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for variant, group in groups.items():
        minutes = [mean for mean, _, _, _ in series(group, epochs, "minutes")]
        for column, (metric, name) in enumerate((("ap", "AP"), ("ap50", "AP50"))):
            stats = series(group, epochs, metric)
            mean = [s[0] for s in stats]
            label = f"{variant} ({len(group)} seed{'s' if len(group) > 1 else ''})"
            for ax, x in ((axes[0, column], [e + 1 for e in epochs]), (axes[1, column], minutes)):
                line, = ax.plot(x, mean, marker="o", markersize=3, label=label)
                if len(group) > 1:
                    ax.fill_between(x, [s[2] for s in stats], [s[3] for s in stats], color=line.get_color(),
                                    alpha=0.2)
                ax.set(title=f"COCO {name}", ylabel=name)
    for ax in axes[0]:
        ax.set(xlabel="epochs trained")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[1]:
        ax.set(xlabel="training time (min, mean over seeds; evaluation excluded)")
    several = any(len(group) > 1 for group in groups.values())
    fig.suptitle("mean over seeds; shaded: min to max over seeds" if several else "one seed per variant")
    return plot_utils._finish(fig, axes.ravel(), out)
