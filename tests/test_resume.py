"""Preemptible training: checkpoints mid-epoch and at every epoch end, exact resumes from any kill (iteration by
iteration the losses of an uninterrupted run, and the same log.txt), SIGTERM / SIGUSR1, --auto_resume with a
fallback, --keep_checkpoints, the weight average (--model_ema), the short console line, TensorBoard."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_helpers import ROOT
from test_distributed import free_port, subprocess_env

import engine
import main as project_main
import util.preemption
from datasets.synthetic import make_synthetic_coco
from models import build_model
from models.optimizer import build_optimizer
from util.checkpoint import load_checkpoint, save_checkpoint
from util.training_state import ITERATION_LOG

# dropout on, from-scratch BatchNorm: the random states and batch statistics must come back too
TINY = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--lr_backbone", "1e-4",
    "--num_feature_levels", "2", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
    "--dim_feedforward", "64", "--dropout", "0.1", "--with_box_refine", "--two_stage", "--mixed_selection",
    "--look_forward_twice", "--num_queries_one2one", "6", "--num_queries_one2many", "12", "--k_one2many", "2",
    "--train_scales", "80", "96", "--val_scale", "96", "--max_size", "128", "--batch_size", "2",
    "--num_workers", "0", "--print_freq", "1", "--epochs", "2",
]
ITERATIONS = 4  # 8 training images, batch 2


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=8, num_val=2, image_size=96, seed=4)
    return root


def flags(coco, out, *extra):
    return [*TINY, "--coco_path", str(coco), "--output_dir", str(out), *map(str, extra)]


def train(coco, out, *extra):
    return project_main.main(project_main.get_args_parser().parse_args(flags(coco, out, *extra)))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


TIMES = ("train_time", "test_time")  # seconds: the one thing of log.txt a resumed run does not repeat


def epoch_lines(path):
    """log.txt without its times, after checking they are there."""
    entries = lines(path)
    assert all(entry[key] > 0 for entry in entries for key in TIMES)
    return [{k: v for k, v in entry.items() if k not in TIMES} for entry in entries]


def losses(out):
    """(epoch, iteration, loss) of every iteration."""
    return [(e["epoch"], e["iteration"], e["loss"]) for e in lines(out / ITERATION_LOG)]


@pytest.fixture(scope="module")
def uninterrupted(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(coco, out)
    return out


def assert_same_run(out, reference):
    """Iteration by iteration the same losses, and the same log.txt (train and test figures of every epoch, not
    their times)."""
    assert losses(out) == losses(reference)
    assert len(losses(out)) == 2 * ITERATIONS
    ours, theirs = epoch_lines(out / "log.txt"), epoch_lines(reference / "log.txt")
    assert [e["epoch"] for e in ours] == [0, 1]
    assert ours == theirs
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0000.pth",
                                                                    "checkpoint0001.pth"]


class Killed(BaseException):
    """Stands for a kill at a chosen point of the run (nothing after it runs)."""


def test_resuming_a_mid_epoch_checkpoint_repeats_the_run(coco, uninterrupted, tmp_path, monkeypatch):
    original = engine.TrainingRun.after_iteration

    def dies_after_epoch_0_iteration_2(self, epoch, iteration, logger, scalars):
        original(self, epoch, iteration, logger, scalars)
        if (epoch, iteration) == (0, 2):
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(engine.TrainingRun, "after_iteration", dies_after_epoch_0_iteration_2)
        with pytest.raises(Killed):
            train(coco, tmp_path, "--save_every_iters", 2)
    saved = load_checkpoint(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == -1 and (saved["in_epoch"]["epoch"], saved["in_epoch"]["iteration"]) == (0, 2)
    assert saved["in_epoch"]["batches"] == {"batch_size": 2, "seed": 42, "images": 8}
    assert len(losses(tmp_path)) == 3  # iteration 2 ran after the checkpoint: it is logged again on resume
    before = saved["in_epoch"]["seconds"]
    assert before > 0
    started = time.time()
    train(coco, tmp_path, "--save_every_iters", 2, "--auto_resume")
    assert_same_run(tmp_path, uninterrupted)
    # epoch 0's training time: the seconds before the save, and those of the resumed iterations
    epoch_0 = lines(tmp_path / "log.txt")[0]
    assert before < epoch_0["train_time"] < before + (time.time() - started)


@pytest.mark.parametrize("dies", ["before the per-epoch copy", "before the log line"])
def test_a_kill_at_an_epoch_end_leaves_no_gap(coco, uninterrupted, tmp_path, monkeypatch, dies):
    """Killed after epoch 0's checkpoint.pth but before its copy, or before its evaluation and log line: the
    resumed run writes them, then goes on; the log has every epoch once."""
    with monkeypatch.context() as patch:
        if dies == "before the per-epoch copy":
            original = engine.save_checkpoint

            def save(obj, path):
                if path.name == "checkpoint0000.pth":
                    raise Killed
                original(obj, path)

            patch.setattr(engine, "save_checkpoint", save)
        else:
            patch.setattr(engine.TrainingRun, "evaluate_and_log", lambda *a: (_ for _ in ()).throw(Killed))
        with pytest.raises(Killed):
            train(coco, tmp_path)
    assert not (tmp_path / "log.txt").exists()
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 0
    train(coco, tmp_path, "--auto_resume")
    assert_same_run(tmp_path, uninterrupted)


def start(coco, out, *extra):
    env = subprocess_env()
    return subprocess.Popen([sys.executable, "main.py", *flags(coco, out, *extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_iterations(process, out, count, timeout=300):
    log = out / ITERATION_LOG
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.02)
    pytest.fail("the run did not get that far")


@pytest.fixture(scope="module")
def uninterrupted_subprocess(coco, tmp_path_factory):
    """The same run in its own process, one thread (as the killed runs), for exact comparisons with them."""
    out = tmp_path_factory.mktemp("uninterrupted_subprocess")
    process = start(coco, out)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    return out


@pytest.mark.parametrize("kill_after", [2, 6])
def test_kill_9_anywhere_and_auto_resume(coco, uninterrupted_subprocess, tmp_path, kill_after):
    process = start(coco, tmp_path, "--save_every_iters", 1)
    wait_for_iterations(process, tmp_path, kill_after)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    process = start(coco, tmp_path, "--save_every_iters", 1, "--auto_resume")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert "--auto_resume: resuming from" in output
    assert not list(tmp_path.glob(".*.tmp"))
    assert_same_run(tmp_path, uninterrupted_subprocess)


# Ctrl-C in a terminal: SIGINT to the whole foreground process group, the DataLoader's workers included
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_saves_after_the_iteration_and_exits(coco, uninterrupted_subprocess, tmp_path, signum):
    ctrl_c = signum == signal.SIGINT
    process = start(coco, tmp_path, *(["--num_workers", 1] if ctrl_c else []))
    wait_for_iterations(process, tmp_path, 3)
    (os.killpg if ctrl_c else os.kill)(process.pid, signum)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signum, output[-3000:]
    name = signal.Signals(signum).name
    assert f"received {name}: saving a checkpoint after this iteration, then stopping" in output
    assert ("Ctrl-C again: stop at once" in output) == ctrl_c
    message = next(line for line in output.splitlines() if line.startswith(f"received {name}: stopped after epoch"))
    assert f"resume with --resume {tmp_path / 'checkpoint.pth'} (or --auto_resume)" in message
    assert "Traceback" not in output, output[-3000:]
    at = load_checkpoint(tmp_path / "checkpoint.pth")
    assert "in_epoch" in at or at["epoch"] >= 0
    process = start(coco, tmp_path, "--auto_resume")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert_same_run(tmp_path, uninterrupted_subprocess)


def test_a_stop_signal_during_the_last_evaluation_ends_the_run_normally(coco, tmp_path, monkeypatch, capsys):
    """SIGTERM while the last epoch is evaluated: everything is saved and logged by then, so the run ends as a
    complete one (it exited with 143 and a "resume with" message for a run with nothing left to train)."""
    evaluate = engine.evaluate

    def evaluate_then_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler of the training run only notes it
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_signalled)
    stats = train(coco, tmp_path, "--epochs", 1)
    assert stats is not None and "coco_eval_bbox" in stats
    output = capsys.readouterr().out
    assert "received SIGTERM during the last epoch's end: the run is complete (nothing left to stop)" in output
    assert [entry["epoch"] for entry in lines(tmp_path / "log.txt")] == [0]


def test_ctrl_c_twice_stops_at_once_but_not_during_the_stop_save(tmp_path):
    """A second Ctrl-C before the stop's save stops at once (Preempted, nothing saved); one during a save
    interrupts it without harm (saves are atomic: the previous file stays, no temporary is left); once the stop
    is under way (requested() said yes) further Ctrl-Cs are only remembered, so its save completes."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"step": 1}, path)
    before = signal.getsignal(signal.SIGINT)

    class CtrlCWhilePickled:
        def __reduce__(self):
            signal.raise_signal(signal.SIGINT)
            return (dict, ())

    preemption = util.preemption.Preemption()
    with preemption.handling():
        signal.raise_signal(signal.SIGINT)  # the first: remembered
        assert preemption.signum == signal.SIGINT
        with pytest.raises(util.preemption.Preempted, match="received SIGINT twice: stopped at once, nothing saved"):
            save_checkpoint({"step": 2, "payload": CtrlCWhilePickled()}, path)
    assert load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]

    preemption = util.preemption.Preemption()
    with preemption.handling():
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested()  # the stop begins: its save must not be cut short
        save_checkpoint({"step": 3, "payload": CtrlCWhilePickled()}, path)
        signal.raise_signal(signal.SIGINT)
    assert torch.load(path, weights_only=False) == {"step": 3, "payload": {}}  # the save went through
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_forked_children_ignore_the_handlers_they_inherit():
    """A DataLoader worker forked inside handling() inherits its handler: the signal is for the main process, so
    the worker neither stops nor records it (it ends when the main process does)."""
    preemption = util.preemption.Preemption()
    with preemption.handling():
        child = os.fork()
        if child == 0:
            try:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                os._exit(0 if preemption.signum == 0 else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def torchrun(coco, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "main.py",
                             *flags(coco, out, "--batch_size", 1, *extra)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_a_signal_during_the_stop_collective_is_kept_for_the_next_iteration(monkeypatch):
    preemption = util.preemption.Preemption()
    reduced = []

    def all_reduce(flag, op):  # the other process has no signal; this one's arrives while the collective runs
        reduced.append(int(flag.item()))
        if len(reduced) == 1:
            signal.raise_signal(signal.SIGUSR1)

    monkeypatch.setattr(util.preemption, "is_dist_avail_and_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with preemption.handling():
        assert not preemption.requested()  # the others had none when it began: nobody stops after this iteration
        assert preemption.requested() and preemption.name == "SIGUSR1"  # all stop after the next one
    assert reduced == [0, signal.SIGUSR1]


def process_tree(pid):
    """pid and all its descendants (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    for child in children.read_text().split() if children.exists() else []:
        found += process_tree(int(child))
    return found


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc")
def test_two_processes_stop_on_a_signal_and_resume_exactly(coco, tmp_path):
    reference = tmp_path / "reference"
    process = torchrun(coco, reference, "--epochs", 4)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    out = tmp_path / "interrupted"
    process = torchrun(coco, out, "--epochs", 4, "--save_every_iters", 3)
    wait_for_iterations(process, out, 2)
    # what SLURM does: every process of the job gets it (torchrun starts its workers in sessions of their own, so
    # its process group is torchrun alone)
    for pid in process_tree(process.pid):
        os.kill(pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert "received SIGTERM: stopped after epoch" in output, output[-3000:]
    assert len(load_checkpoint(out / "checkpoint.pth")["in_epoch"]["random"]) == 2  # both processes' states
    process = torchrun(coco, out, "--epochs", 4, "--save_every_iters", 3, "--auto_resume")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert losses(out) == losses(reference) and len(losses(out)) == 16  # 4 epochs of 4 iterations (batch 1 x 2)
    assert epoch_lines(out / "log.txt") == epoch_lines(reference / "log.txt")


def test_upstream_and_epoch_end_checkpoints_resume_at_the_next_epoch(coco, uninterrupted, tmp_path):
    checkpoint = load_checkpoint(uninterrupted / "checkpoint0000.pth")
    upstream = {k: checkpoint[k] for k in ("model", "optimizer", "lr_scheduler", "epoch", "args")}
    save_checkpoint(upstream, tmp_path / "upstream.pth")
    train(coco, tmp_path / "run", "--resume", tmp_path / "upstream.pth")
    assert [e["epoch"] for e in lines(tmp_path / "run" / "log.txt")] == [1]
    assert losses(tmp_path / "run") == losses(uninterrupted)[ITERATIONS:]


@pytest.mark.parametrize("changed, message", [
    (["--batch_size", 1], r"--batch_size 2 \(now 1\)"), (["--seed", 7], r"--seed 42 \(now 7\)")])
def test_a_mid_epoch_checkpoint_resumes_only_with_the_same_batches(coco, uninterrupted, tmp_path, changed, message):
    """Its iteration counts batches of its --batch_size and --seed: with others it would skip and repeat images."""
    checkpoint = load_checkpoint(uninterrupted / "checkpoint0000.pth")
    checkpoint["in_epoch"] = {"epoch": 1, "iteration": 2, "batches": {"batch_size": 2, "seed": 42, "images": 8}}
    save_checkpoint(checkpoint, tmp_path / "mid.pth")
    with pytest.raises(ValueError, match=rf"mid\.pth was saved at iteration 2 of epoch 1 by a run with {message}: "
                                         r"this run's batches of that epoch are others"):
        train(coco, tmp_path / "run", "--resume", tmp_path / "mid.pth", *changed)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


@pytest.mark.parametrize("changed, message", [
    (["--sgd"], r"its optimizer is AdamW, this run's SGD \(--sgd\)"),
    (["--lr_linear_proj_names", "sampling_offsets.weight"],  # the offsets' biases move to the --lr group
     r"its optimizer has parameter groups of \[\d+, \d+, \d+\] tensors, this run's \[\d+, \d+, \d+\] \(the "
     r"flags that group or freeze parameters differ")])
def test_an_optimizer_state_of_other_flags_is_refused_naming_them(coco, uninterrupted, tmp_path, changed, message):
    source = uninterrupted / "checkpoint0000.pth"
    with pytest.raises(ValueError, match=rf"cannot resume the training state of .*checkpoint0000\.pth: {message}"):
        train(coco, tmp_path, "--resume", source, *changed)


def test_the_command_line_weight_decay_wins_on_resume(coco, uninterrupted):
    """As its learning rates (upstream's rule): the checkpoint's args then record what the run used."""
    args = project_main.get_args_parser().parse_args(flags(coco, "", "--weight_decay", 0.05, "--lr", 1e-4))
    args.num_classes = 7
    model = build_model(args)[0]
    optimizer, scheduler = build_optimizer(args, model)
    checkpoint = load_checkpoint(uninterrupted / "checkpoint0000.pth")
    assert {g["weight_decay"] for g in checkpoint["optimizer"]["param_groups"]} == {1e-4}
    project_main.resume_training_state(args, checkpoint, optimizer, scheduler, None)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05] * 3
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-4, 1e-5]


def test_resuming_a_copy_from_elsewhere_writes_its_own_epoch_copy(coco, uninterrupted, tmp_path, capsys):
    """The folder's checkpoint.pth is of epoch 1; the resumed copy (epoch 0, its copy missing in the folder) is the
    one written as checkpoint0000.pth. With nothing left to train, log.txt keeps its lines."""
    for name in ("checkpoint.pth", "log.txt"):
        shutil.copy(uninterrupted / name, tmp_path / name)
    shutil.copy(uninterrupted / "checkpoint0000.pth", tmp_path / "backup.pth")
    train(coco, tmp_path, "--resume", tmp_path / "backup.pth", "--epochs", 1)
    assert load_checkpoint(tmp_path / "checkpoint0000.pth")["epoch"] == 0
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert [e["epoch"] for e in lines(tmp_path / "log.txt")] == [0, 1]
    assert "backup.pth ends before epoch 1: nothing to train up to --epochs 1" in capsys.readouterr().out


def test_keep_checkpoints_keeps_the_last_copies(coco, tmp_path):
    train(coco, tmp_path, "--epochs", 3, "--keep_checkpoints", 2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pth")) == [
        "checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth"]


def test_auto_resume_skips_a_corrupt_checkpoint_naming_it(coco, uninterrupted, tmp_path, capsys):
    for name in ("checkpoint.pth", "checkpoint0000.pth"):
        shutil.copy(uninterrupted / name, tmp_path / name)
    shutil.copy(uninterrupted / "log.txt", tmp_path / "log.txt")
    (tmp_path / "checkpoint.pth").write_bytes((tmp_path / "checkpoint.pth").read_bytes()[:5000])  # truncated
    (tmp_path / ".checkpoint.pth.x1y2.tmp").write_bytes(b"half")
    train(coco, tmp_path, "--auto_resume")
    out = capsys.readouterr().out
    assert f"removed {tmp_path / '.checkpoint.pth.x1y2.tmp'}" in out
    assert f"cannot resume from {tmp_path / 'checkpoint.pth'}" in out
    assert f"--auto_resume: resuming from {tmp_path / 'checkpoint0000.pth'} (epoch 1, iteration 0)" in out
    assert [e["epoch"] for e in lines(tmp_path / "log.txt")] == [0, 1]  # epoch 1 again, once
    assert epoch_lines(tmp_path / "log.txt") == epoch_lines(uninterrupted / "log.txt")


def test_auto_resume_refuses_to_overwrite_checkpoints_it_cannot_read(coco, uninterrupted, tmp_path):
    shutil.copy(uninterrupted / "log.txt", tmp_path / "log.txt")
    (tmp_path / "checkpoint.pth").write_bytes(uninterrupted.joinpath("checkpoint.pth").read_bytes()[:5000])
    with pytest.raises(RuntimeError, match=r"--auto_resume: no checkpoint in .* can be read \(checkpoint\.pth\), "
                                           r"and a new run would overwrite them"):
        train(coco, tmp_path, "--auto_resume")
    assert (tmp_path / "log.txt").read_text() == (uninterrupted / "log.txt").read_text()


def test_a_new_run_refuses_a_folder_with_another_run(coco, uninterrupted, tmp_path):
    """Without --resume or --auto_resume it would overwrite the checkpoints and append to the other run's log (whose
    epoch lines would then stand for the new run's at a resume)."""
    shutil.copy(uninterrupted / "log.txt", tmp_path / "log.txt")
    shutil.copy(uninterrupted / "checkpoint0001.pth", tmp_path / "checkpoint0001.pth")
    with pytest.raises(FileExistsError, match=r"--output_dir .* holds another run \(log\.txt, checkpoint0001\.pth\): "
                                              r"a new run would overwrite"):
        train(coco, tmp_path, "--epochs", 1)
    assert (tmp_path / "log.txt").read_text() == (uninterrupted / "log.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint0001.pth", "log.txt"]


def test_auto_resume_without_a_checkpoint_starts_a_new_run(coco, tmp_path, capsys):
    train(coco, tmp_path, "--auto_resume", "--epochs", 1)
    assert f"--auto_resume: no checkpoint in {tmp_path} yet, starting a new run" in capsys.readouterr().out


def test_model_ema_is_trained_saved_and_evaluated(coco, uninterrupted, tmp_path, capsys):
    train(coco, tmp_path, "--model_ema", "--model_ema_decay", "0.9")
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    raw, average = checkpoint["model"], checkpoint["model_ema"]
    assert raw.keys() == average.keys()
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], average[k])]
    assert len(moved) > len(raw) // 2  # an average of the path, not the last weights
    # the training run's evaluation scored the average, as --eval --resume does
    stats = project_main.main(project_main.get_args_parser().parse_args(
        flags(coco, tmp_path / "eval", "--eval", "--resume", tmp_path / "checkpoint.pth")))
    assert f"evaluating the weight average (model_ema) of {tmp_path / 'checkpoint.pth'}" in capsys.readouterr().out
    assert stats["coco_eval_bbox"] == lines(tmp_path / "log.txt")[-1]["test_coco_eval_bbox"]
    # an upstream checkpoint (no average) resumes with --model_ema: the average starts from its weights
    train(coco, tmp_path / "from_upstream", "--resume", uninterrupted / "checkpoint0000.pth", "--model_ema")
    assert "model_ema" in load_checkpoint(tmp_path / "from_upstream" / "checkpoint.pth")
    assert "checkpoint0000.pth holds no weight average: --model_ema starts one from its weights" in \
        capsys.readouterr().out
    # resumed without --model_ema, the average is not continued, and the run says so
    train(coco, tmp_path / "dropped", "--resume", tmp_path / "checkpoint0000.pth", "--epochs", 1)
    assert f"note: {tmp_path / 'checkpoint0000.pth'} holds a weight average (--model_ema) that this run, without " \
           "--model_ema, does not continue" in capsys.readouterr().out


def test_ema_decay_warms_up_to_the_flag(coco, tmp_path, monkeypatch):
    decays = []
    original = engine.train_one_epoch

    def spy(*args, **kwargs):
        ema = kwargs["ema"]
        decays.append([ema.get_decay(step) for step in (1, 2, 10, 1000, 10 ** 9)])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    train(coco, tmp_path, "--model_ema", "--epochs", 1)
    low, second, early, later, end = decays[0]
    assert low == 0 and 0 < second < early < later < end == pytest.approx(0.9997)


def test_console_lines_are_short_and_every_term_is_in_the_logs(coco, uninterrupted, capsys, tmp_path):
    train(coco, tmp_path, "--epochs", 1)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("Epoch 0 [", "Test ["))]
    assert len(progress) == ITERATIONS + 1  # every iteration (--print_freq 1), the evaluation batch
    for line in progress:
        assert len(line) <= 130, line
    first = progress[0]
    for field in ("Epoch 0 [0/4]", "eta ", "loss ", "o2o ", "o2m ", "cls_err ", "lr ", "grad ", " s/it", "mem "):
        assert field in first, first
    epoch = lines(tmp_path / "log.txt")[0]
    assert {"train_loss_ce_one2many", "train_loss_giou_enc", "train_class_error", "test_coco_eval_bbox"} <= set(epoch)
    iteration = lines(tmp_path / ITERATION_LOG)[0]
    assert {"loss", "loss_one2one", "loss_one2many", "loss_bbox_0_one2many", "lr", "grad_norm"} <= set(iteration)
    assert iteration["loss"] == pytest.approx(iteration["loss_one2one"] + iteration["loss_one2many"], rel=1e-5)


def test_tensorboard_logging(coco, tmp_path):
    pytest.importorskip("tensorboard")
    train(coco, tmp_path, "--epochs", 1, "--tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_without_the_package_is_a_one_line_error(coco, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    with pytest.raises(ImportError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        train(coco, tmp_path, "--epochs", 1, "--tensorboard")


def test_a_missing_optional_package_is_one_line_before_anything_starts(coco, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = project_main.get_args_parser().parse_args(flags(coco, tmp_path, "--use_wandb", "--tensorboard", "--eval"))
    assert project_main.missing_packages(args) == ["--use_wandb needs the wandb package: pip install wandb"]
    with pytest.raises(ImportError, match="^--use_wandb needs the wandb package: pip install wandb$"):
        project_main.main(args)
    assert not (tmp_path / "log.txt").exists()
    # main.py's command line: the parser's one-line error (exit status 2), no traceback
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['wandb'] = None; sys.argv[0] = 'main.py'; "
                             "import runpy; runpy.run_path('main.py', run_name='__main__')", "--use_wandb",
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith("error: --use_wandb needs the wandb package: pip install wandb")
