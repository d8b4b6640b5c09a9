"""util.compare_runs, tools/compare_hybrid.py and tools/compare_hybrid.sh's arguments, on hand-made log.txt files
(nothing is trained)."""
import json
import math
import runpy
import subprocess
import sys

import pytest
from model_helpers import ROOT

from util import compare_runs

# per variant, per seed: AP after each epoch (AP50 = AP + 0.2 in the logs below)
HYBRID = [[0.10, 0.30, 0.50], [0.20, 0.40, 0.60], [0.30, 0.50, 0.70]]
ONE2ONE = [[0.04, 0.20, 0.40], [0.10, 0.30, 0.50], [0.10, 0.40, 0.60]]


def write_run(folder, aps, train_time=60.0, test_time=6.0, wall_time=200.0):
    """A run folder as compare_hybrid.sh leaves it: log.txt as main.py writes it, and wall_time.txt."""
    folder.mkdir(parents=True)
    with (folder / "log.txt").open("w") as f:
        for epoch, ap in enumerate(aps):
            record = {"train_loss": 1.0, "test_coco_eval_bbox": [ap, ap + 0.2] + [0.0] * 10, "test_time": test_time,
                      "train_time": train_time, "epoch": epoch, "n_parameters": 1}
            f.write(json.dumps(record) + "\n")
    if wall_time is not None:
        (folder / "wall_time.txt").write_text(f"{wall_time}\n")
    return folder


@pytest.fixture
def study(tmp_path):
    for seed, (hybrid, one2one) in enumerate(zip(HYBRID, ONE2ONE)):
        write_run(tmp_path / "cmp" / f"hybrid_seed{seed}", hybrid, train_time=60.0 + 6 * seed)
        write_run(tmp_path / "cmp" / f"one2one_seed{seed}", one2one, train_time=30.0)
    (tmp_path / "cmp" / "table.txt").write_text("not a run\n")
    return tmp_path / "cmp"


def test_spread():
    mean, std, low, high = compare_runs.spread([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(math.sqrt(0.07)) and (low, high) == (0.1, 0.6)
    mean, std, low, high = compare_runs.spread([0.4])
    assert (mean, low, high) == (0.4, 0.4, 0.4) and math.isnan(std)  # no spread from one value


def test_runs_grouped_by_variant_with_mean_and_spread_per_epoch(study):
    groups = compare_runs.find_runs(study)
    assert list(groups) == ["hybrid", "one2one"]
    assert [run.seed for run in groups["hybrid"]] == [0, 1, 2]
    assert compare_runs.common_epochs(groups) == [0, 1, 2]
    ap = compare_runs.series(groups["hybrid"], [0, 1, 2], "ap")
    assert [s[0] for s in ap] == pytest.approx([0.2, 0.4, 0.6])
    assert [s[1] for s in ap] == pytest.approx([0.1, 0.1, 0.1])  # sample standard deviation
    assert ap[2][2:] == pytest.approx((0.5, 0.7))
    ap50 = compare_runs.series(groups["one2one"], [2], "ap50")
    assert ap50[0][0] == pytest.approx(0.7) and ap50[0][2:] == pytest.approx((0.6, 0.8))
    # training minutes summed up to each epoch: seeds at 60, 66 and 72 s per epoch
    minutes = compare_runs.series(groups["hybrid"], [0, 1, 2], "minutes")
    assert [s[0] for s in minutes] == pytest.approx([1.1, 2.2, 3.3])
    assert groups["one2one"][0].wall_time == 200.0


def test_table(study):
    text = compare_runs.table(compare_runs.find_runs(study))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["epochs", "hybrid", "AP", "one2one"]
    # after 3 epochs: 0.600 ± 0.100 against 0.500 ± 0.100, AP50 0.8 / 0.7, training 3.3 / 1.5 min
    assert lines[4].split() == ["3", "0.600", "±", "0.100", "0.500", "±", "0.100", "+0.100", "0.800", "±", "0.100",
                                "0.700", "±", "0.100", "3.3", "±", "0.3", "1.5", "±", "0.0"]
    assert lines[2].split()[7] == "+0.120"  # after 1 epoch: 0.2 against 0.08
    assert ("hybrid: 3 seed(s) (0, 1, 2); AP after 3 epochs 0.600 ± 0.100 (min 0.500, max 0.700); training "
            "3.3 ± 0.3 min, evaluation 0.3 ± 0.0 min, whole run 3.3 ± 0.0 min") in text


def test_table_compares_equal_epochs_only(tmp_path):
    write_run(tmp_path / "hybrid_seed0", [0.1, 0.2, 0.3])
    write_run(tmp_path / "one2one_seed0", [0.1, 0.15], wall_time=None)  # still running: no wall time yet
    text = compare_runs.table(compare_runs.find_runs(tmp_path))
    assert [line.split()[0] for line in text.splitlines()[2:4]] == ["1", "2"]
    assert "hybrid: 1 seed(s) (0); AP after 2 epochs 0.200 (min 0.200, max 0.200)" in text
    assert f"epochs after 2 left out, not in every run: {tmp_path / 'hybrid_seed0'}" in text
    assert "one2one: 1 seed(s) (0); AP after 2 epochs 0.150 (min" in text and "whole run n/a" in text


def test_logs_without_times(tmp_path):
    for seed in (0, 1):
        run = write_run(tmp_path / f"hybrid_seed{seed}", [0.1, 0.2])
        lines = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
        (run / "log.txt").write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_time")})
                                             + "\n" for r in lines))
    text = compare_runs.table(compare_runs.find_runs(tmp_path))
    assert text.splitlines()[3].split() == ["2", "0.200", "±", "0.000", "0.400", "±", "0.000", "n/a"]
    assert "training n/a, evaluation n/a, whole run 3.3 ± 0.0 min" in text


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no comparison folder at"):
        compare_runs.find_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no run folders"):
        compare_runs.find_runs(tmp_path)
    (tmp_path / "hybrid_seed0").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no training log at {tmp_path / 'hybrid_seed0' / 'log.txt'}"):
        compare_runs.find_runs(tmp_path)
    (tmp_path / "hybrid_seed0" / "log.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"hybrid_seed0/log.txt has no epoch lines"):
        compare_runs.find_runs(tmp_path)
    (tmp_path / "hybrid_seed0" / "log.txt").write_text('{"epoch": 0, "train_loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"log.txt: epoch 0 has no COCO evaluation"):
        compare_runs.find_runs(tmp_path)
    write_run(tmp_path / "one2one_seed0", [0.1])
    (tmp_path / "one2one_seed0" / "wall_time.txt").write_text("soon")
    with pytest.raises(ValueError, match=r"one2one_seed0/wall_time.txt: expected seconds, got 'soon'"):
        compare_runs.load_run(tmp_path / "one2one_seed0", "one2one", 0)


def run_tool(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["tools/compare_hybrid.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "compare_hybrid.py"), run_name="__main__")
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_tool_prints_the_table_with_or_without_matplotlib(study, monkeypatch, capsys):
    code, out, _ = run_tool(monkeypatch, capsys, str(study), "--no_figure")
    assert code == 0 and out.strip() == compare_runs.table(compare_runs.find_runs(study))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, out, err = run_tool(monkeypatch, capsys, str(study))
    assert code == 0 and "hybrid: 3 seed(s)" in out
    assert "no figure (drawing curves needs matplotlib: pip install matplotlib)" in err
    code, _, _ = run_tool(monkeypatch, capsys, str(study / "missing"))
    assert code == f"compare_hybrid: no comparison folder at {study / 'missing'}"


def test_figure(study, monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = run_tool(monkeypatch, capsys, str(study))
    figure = study.parent / "cmp.png"
    assert code == 0 and f"wrote {figure}" in out and figure.stat().st_size > 1000
    figure.unlink()
    monkeypatch.chdir(study)  # "." named the figure ".png", a hidden file written as ./.png.png
    code, out, _ = run_tool(monkeypatch, capsys, ".")
    assert code == 0 and f"wrote {figure.resolve()}" in out and figure.is_file() and not list(study.glob(".png*"))
    code, out, _ = run_tool(monkeypatch, capsys, ".", "--out", str(tmp_path / "fig"))  # matplotlib adds .png
    assert code == 0 and f"wrote {tmp_path / 'fig.png'}" in out and (tmp_path / "fig.png").is_file()
    fig, axes = compare_runs.plot(compare_runs.find_runs(study))
    (hybrid, one2one) = axes[0].get_lines()
    assert list(hybrid.get_xdata()) == [1, 2, 3] and list(hybrid.get_ydata()) == pytest.approx([0.2, 0.4, 0.6])
    assert list(one2one.get_ydata()) == pytest.approx([0.08, 0.3, 0.5])
    assert len(axes[0].collections) == 2  # each variant's min-max band
    assert list(axes[3].get_lines()[0].get_ydata()) == pytest.approx([0.4, 0.6, 0.8])  # AP50 against time
    assert list(axes[2].get_lines()[0].get_xdata()) == pytest.approx([1.1, 2.2, 3.3])  # minutes of training
    assert [c.get_label() for c in axes[0].get_lines()] == ["hybrid (3 seeds)", "one2one (3 seeds)"]
    sys.modules["matplotlib.pyplot"].close(fig)


def script(*argv):
    return subprocess.run(["bash", str(ROOT / "tools" / "compare_hybrid.sh"), *argv], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "x"], "--seeds must be a whole number > 0, got 'x'"),
    (["--seeds=0"], "--seeds must be a whole number > 0, got '0'"),
    (["--num_train", "-5"], "--num_train must be a whole number > 0, got '-5'"),
    (["--epochs", "2", "--seeds"], "--seeds needs a value"),
    (["--seed", "3"], "--seed is set by this script"),
    (["--output_dir=x"], "--output_dir=x is set by this script"),
    # main.py's parser takes an unambiguous prefix for the flag: every run had seed 7, or another folder
    (["--seeds", "2", "--see", "7"], "--see abbreviates --seed, which this script sets"),
    (["--output=exps/elsewhere"], "--output=exps/elsewhere abbreviates --output_dir, which this script sets"),
    (["--coco", "data/coco"], "--coco abbreviates --coco_path, which this script sets"),
])
def test_script_rejects_bad_arguments(argv, message):
    result = script(*argv)
    assert result.returncode == 2 and f"compare_hybrid.sh: {message}" in result.stderr


def test_script_runs_both_variants_per_seed_with_the_same_arguments():
    result = script("--dry_run", "--seeds", "2", "--epochs", "3", "--num_train=40", "--num_val", "10", "--out",
                    "exps/x/")
    assert result.returncode == 0, result.stderr
    config = "bash configs/demo/r18_synthetic_hybrid_two_stage.sh --coco_path data/synthetic_40_10"
    assert result.stdout.splitlines() == [
        f"{config} --output_dir exps/x/hybrid_seed0 --seed 0 --epochs 3",
        f"{config} --output_dir exps/x/one2one_seed0 --seed 0 --epochs 3 --num_queries_one2many 0",
        f"{config} --output_dir exps/x/hybrid_seed1 --seed 1 --epochs 3",
        f"{config} --output_dir exps/x/one2one_seed1 --seed 1 --epochs 3 --num_queries_one2many 0",
    ]
    defaults = script("--dry_run").stdout.splitlines()
    assert defaults == ["bash configs/demo/r18_synthetic_hybrid_two_stage.sh --coco_path data/synthetic --output_dir "
                        f"exps/demo/compare/{v}_seed0 --seed 0{b}" for v, b in
                        (("hybrid", ""), ("one2one", " --num_queries_one2many 0"))]


def test_script_help():
    result = script("--help")
    assert result.returncode == 0 and "--seeds N (seeds 0..N-1, default 1)" in result.stdout
    assert "set -euo" not in result.stdout
