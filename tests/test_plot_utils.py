"""util.plot_utils and tools/plot_logs.py: reading logs, smoothing, summaries, saved evaluations, figures."""
import argparse
import json
import math
import runpy
import subprocess
import sys

import pytest
import torch
from model_helpers import ROOT

from datasets.coco import load_coco_api
from datasets.coco_eval import CocoEvaluator
from datasets.synthetic import make_synthetic_coco
from util import plot_utils
from util.checkpoint import save_checkpoint


def write_log(directory, aps):
    """A log.txt as main.py writes it: one record per epoch, COCO stats in test_coco_eval_bbox."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "log.txt").open("w") as f:
        for epoch, ap in enumerate(aps):
            record = {"train_loss": 10.0 - epoch, "test_loss": 5.0 - epoch / 2, "train_class_error": 50.0,
                      "test_coco_eval_bbox": [ap, ap + 0.2] + [0.0] * 10, "epoch": epoch, "n_parameters": 1}
            f.write(json.dumps(record) + "\n")
    return directory


def test_read_log_and_series(tmp_path):
    run = write_log(tmp_path / "run", [0.1, 0.3, 0.2])
    records = plot_utils.read_log(run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    epochs, train, test = plot_utils.metric_series(records, "loss")
    assert epochs == [0, 1, 2] and train == [10.0, 9.0, 8.0] and test == [5.0, 4.5, 4.0]
    _, train, test = plot_utils.metric_series(records, "AP50")
    assert all(math.isnan(v) for v in train) and test == pytest.approx([0.3, 0.5, 0.4])
    _, train, test = plot_utils.metric_series(records, "class_error")  # training only
    assert train == [50.0] * 3 and all(math.isnan(v) for v in test)


def test_read_log_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        plot_utils.read_log(tmp_path / "missing")
    bad = tmp_path / "log.txt"
    bad.write_text('{"epoch": 0}\n\n{"epoch": 1\n')
    with pytest.raises(ValueError, match=r"log.txt, line 3"):
        plot_utils.read_log(bad)
    with pytest.raises(ValueError, match="no field 'los'.*known fields: .*loss"):
        plot_utils.metric_series(plot_utils.read_log(write_log(tmp_path / "run", [0.1])), "los")


def test_smooth_is_an_exponentially_weighted_mean():
    assert plot_utils.smooth([1.0, 5.0, 2.0]) == [1.0, 5.0, 2.0]
    # com 1: weights 1, 1/2, 1/4 from the newest value back
    assert plot_utils.smooth([1.0, 2.0, 3.0], com=1) == pytest.approx([1.0, 2.5 / 1.5, 4.25 / 1.75])
    out = plot_utils.smooth([1.0, math.nan, 3.0], com=1)
    assert math.isnan(out[1]) and out[2] == pytest.approx(3.5 / 1.5)
    with pytest.raises(ValueError):
        plot_utils.smooth([1.0], com=-1)


def test_summarize(tmp_path):
    summary = plot_utils.summarize(plot_utils.read_log(write_log(tmp_path / "run", [0.1, 0.3, 0.2])))
    assert summary == {"epochs": 3, "best_mAP": 0.3, "best_epoch": 1, "last_mAP": 0.2,
                       "last_AP50": pytest.approx(0.4)}


@pytest.fixture(scope="module")
def saved_evaluation(tmp_path_factory):
    """An eval/latest.pth as main.py saves it, of detections that find some objects with wrong scores,
    and the AP50 pycocotools reports for it."""
    root = tmp_path_factory.mktemp("pr")
    make_synthetic_coco(root, 0, 6, image_size=64, seed=3)
    coco = load_coco_api(root / "annotations" / "instances_val2017.json")
    evaluator = CocoEvaluator(coco, ("bbox",))
    gen = torch.Generator().manual_seed(0)
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[1::2] += 6.0  # every other box shifted: some misses
        labels = torch.tensor([a["category_id"] for a in anns])
        predictions[image_id] = {"scores": torch.rand(len(anns), generator=gen), "labels": labels, "boxes": boxes}
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    path = root / "eval" / "latest.pth"
    save_checkpoint(evaluator.coco_eval["bbox"].eval, path)
    return path, evaluator.coco_eval["bbox"].stats[1]


def test_precision_recall_of_a_saved_evaluation(saved_evaluation):
    path, ap50 = saved_evaluation
    assert 0.1 < ap50 < 0.9
    recall, precision, scores = plot_utils.precision_recall(plot_utils.load_evaluation(path))
    assert recall.shape == precision.shape == scores.shape == (101,)
    assert precision.mean() == pytest.approx(ap50, abs=1e-9)
    assert (precision[:-1] >= precision[1:] - 1e-12).all()  # COCO's interpolated precision never rises


class Payload:
    """An arbitrary picklable object, which a weights-only load must refuse."""


def test_load_evaluation_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_utils.load_evaluation(tmp_path / "none.pth")
    torch.save({"model": torch.zeros(1)}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a saved COCO evaluation"):
        plot_utils.load_evaluation(tmp_path / "checkpoint.pth")
    torch.save({"precision": Payload(), "params": None}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"pickle\.pth is not a saved COCO evaluation: a weights-only torch\.load "
                                         r"cannot read it \(Unsupported global: GLOBAL test_plot_utils\.Payload"):
        plot_utils.load_evaluation(tmp_path / "pickle.pth")  # only Params and arrays pass


def test_tool_pr_on_other_files_is_one_line(tmp_path, monkeypatch, capsys):
    """A log.txt, a checkpoint (its args a Namespace), an empty file: the tool names the file in one line."""
    log = write_log(tmp_path / "run", [0.1]) / "log.txt"
    save_checkpoint({"model": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "checkpoint.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    for path, reason in ((log, "Unsupported operand"),
                         (tmp_path / "checkpoint.pth", "Unsupported global: GLOBAL argparse.Namespace"),
                         (tmp_path / "empty.pth", "EOFError: the file ends early")):
        code, _ = run_tool(monkeypatch, capsys, "--pr", str(path))
        assert code.startswith(f"plot_logs: {path} is not a saved COCO evaluation: a weights-only torch.load cannot "
                               f"read it ({reason}") and "\n" not in code, code


def run_tool(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["tools/plot_logs.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "plot_logs.py"), run_name="__main__")
    return info.value.code, capsys.readouterr().out


def test_tool_prints_summaries(tmp_path, monkeypatch, capsys, saved_evaluation):
    a, b = write_log(tmp_path / "a", [0.1, 0.3, 0.2]), write_log(tmp_path / "b", [0.4])
    code, out = run_tool(monkeypatch, capsys, str(a), str(b))
    assert code == 0
    assert f"{a}: 3 epochs, best mAP 0.3000 (epoch 1), last mAP 0.2000, last AP50 0.4000" in out
    assert f"{b}: 1 epochs, best mAP 0.4000 (epoch 0)" in out
    code, out = run_tool(monkeypatch, capsys, "--pr", str(saved_evaluation[0]))
    assert code == 0 and f"AP50 {saved_evaluation[1]:.4f}" in out
    code, _ = run_tool(monkeypatch, capsys, str(tmp_path / "c"))
    assert "no training log" in str(code)


def test_tool_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    run = write_log(tmp_path / "a", [0.1])
    code, _ = run_tool(monkeypatch, capsys, str(run), "--fields", "loss", "--out", str(tmp_path / "c.png"))
    assert "pip install matplotlib" in str(code)
    code, _ = run_tool(monkeypatch, capsys, str(run), "--fields", "los", "--out", str(tmp_path / "c.png"))
    assert "no field 'los'" in str(code)  # a misspelt field is reported before matplotlib is needed


def test_figures(tmp_path, saved_evaluation):
    pytest.importorskip("matplotlib")
    a, b = write_log(tmp_path / "a", [0.1, 0.3, 0.2]), write_log(tmp_path / "b", [0.4, 0.5])
    fig, axes = plot_utils.plot_logs([a, b], fields=("loss", "class_error", "mAP"), ewm_col=1,
                                     out=tmp_path / "curves.png")
    assert [len(ax.get_lines()) for ax in axes] == [4, 2, 2]  # train+test per run / train only / test only
    assert list(axes[2].get_lines()[1].get_ydata()) == pytest.approx(plot_utils.smooth([0.4, 0.5], 1))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    fig, axes = plot_utils.plot_precision_recall([saved_evaluation[0]], out=tmp_path / "pr.png")
    assert f"AP50 {saved_evaluation[1]:.3f}" in axes[0].get_lines()[0].get_label()
    assert (tmp_path / "pr.png").stat().st_size > 1000


def test_a_partial_last_line_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    """A run killed while writing its log line: what is complete is read and plotted, the rest named."""
    run = write_log(tmp_path / "run", [0.1, 0.3])
    log = run / "log.txt"
    complete = log.read_text()
    log.write_text(complete + '{"train_loss": 7.0, "test_coco_eval_bbox": [0.5, 0.')
    with pytest.warns(plot_utils.IncompleteLogWarning, match=r"log\.txt: skipped the last line \(line 3\), which is "
                                                              r"incomplete .*; 2 complete records read"):
        records = plot_utils.read_log(run)
    assert records == plot_utils.read_log(write_log(tmp_path / "whole", [0.1, 0.3]))
    code, out = run_tool(monkeypatch, capsys, str(run))
    assert code == 0 and f"{run}: 2 epochs, best mAP 0.3000 (epoch 1)" in out


def test_epochs_logged_again_after_a_resume_keep_their_later_line(tmp_path, monkeypatch, capsys):
    """Upstream's resumed runs append the epochs they train again: 0, 1, 2, then 1, 2, 3. The summary counted 6
    epochs and took its best mAP from a superseded line; the curves went backwards."""
    run = write_log(tmp_path / "run", [0.1, 0.2, 0.35])
    again = write_log(tmp_path / "again", [0.0, 0.21, 0.22, 0.3])
    with (run / "log.txt").open("a") as f:
        f.writelines((again / "log.txt").read_text().splitlines(keepends=True)[1:])
    with pytest.warns(plot_utils.RepeatedEpochWarning, match=r"epochs 1, 2 are logged more than once \(a resumed "
                                                             r"run appended them\): the later line of each is used, "
                                                             r"2 earlier lines left out"):
        records = plot_utils.read_log(run)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["test_coco_eval_bbox"][0] for r in records] == [0.1, 0.21, 0.22, 0.3]
    code, out = run_tool(monkeypatch, capsys, str(run))
    assert code == 0 and f"{run}: 4 epochs, best mAP 0.3000 (epoch 3)" in out


def test_a_figure_name_without_suffix_is_reported_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = write_log(tmp_path / "run", [0.1, 0.3])
    code, out = run_tool(monkeypatch, capsys, str(run), "--fields", "loss", "--out", str(tmp_path / "curves"))
    assert code == 0 and f"wrote {tmp_path / 'curves.png'}" in out and (tmp_path / "curves.png").is_file()


def test_the_tool_says_which_line_it_skipped(tmp_path):
    run = write_log(tmp_path / "run", [0.1, 0.3])
    with (run / "log.txt").open("a") as f:
        f.write('{"epoch": 2, "train_lo')
    result = subprocess.run([sys.executable, "tools/plot_logs.py", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{run}: 2 epochs, best mAP 0.3000" in result.stdout
    assert result.stderr == (f"plot_logs: {run / 'log.txt'}: skipped the last line (line 3), which is incomplete "
                             "(was the run killed while writing it?); 2 complete records read\n")


def test_a_bad_line_that_is_not_the_last_partial_one_stays_an_error(tmp_path):
    bad = tmp_path / "log.txt"
    bad.write_text('{"epoch": 0}\n{"epoch": 1\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"log\.txt, line 2: not a JSON record"):
        plot_utils.read_log(bad)


def test_precision_recall_at_a_raised_maxdets(tmp_path):
    root = tmp_path / "data"
    make_synthetic_coco(root, 0, 3, image_size=64, seed=3)
    coco = load_coco_api(root / "annotations" / "instances_val2017.json")
    evaluator = CocoEvaluator(coco, ("bbox",), topk=300)
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        predictions[image_id] = {"scores": torch.ones(len(anns)), "boxes": boxes,
                                 "labels": torch.tensor([a["category_id"] for a in anns])}
    evaluator.update(predictions)
    evaluator.accumulate()
    evaluator.summarize(table=False)
    save_checkpoint(evaluator.coco_eval["bbox"].eval, tmp_path / "eval.pth")
    evaluation = plot_utils.load_evaluation(tmp_path / "eval.pth")
    _, precision, _ = plot_utils.precision_recall(evaluation)  # at maxDets 300, the largest
    assert precision.mean() == pytest.approx(evaluator.stats()[1])
    _, at_coco, _ = plot_utils.precision_recall(evaluation, max_dets=100)
    assert at_coco.mean() == pytest.approx(precision.mean())  # at most 6 objects an image: no cap here
    with pytest.raises(ValueError, match=r"max_dets 50 was not evaluated: maxDets \[1, 10, 100, 300\]"):
        plot_utils.precision_recall(evaluation, max_dets=50)
