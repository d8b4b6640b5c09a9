"""Distributed training and evaluation: 2 CPU processes with gloo, started by torchrun (issue #6).

The workers under tests/dist_workers/ check gradient synchronisation and evaluation de-duplication from the
inside; the last tests run main.py and tools/run_dist_launch.sh end to end.
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import main as project_main
from datasets.synthetic import SHAPE_NAMES, make_synthetic_coco
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "dist_workers"
NPROC = 2
TIMEOUT_S = 300
NUM_CLASSES = len(SHAPE_NAMES) + 1  # category ids 1..6 of the synthetic set, as main.py derives it

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# the small hybrid two-stage model of test_end_to_end, with the frozen-BatchNorm backbone (no batch statistics)
TINY_TWO_STAGE = [
    "--device", "cpu", "--backbone", "resnet18", "--num_classes", str(NUM_CLASSES), "--num_feature_levels", "2",
    "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
    "--dropout", "0.0", "--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
    "--num_queries_one2one", "6", "--num_queries_one2many", "12", "--k_one2many", "2",
]
# main.py: a small hybrid model (single stage, so its box head can be started at a useful size), batch 1 so
# that a single process and each rank see every validation image in a batch of its own
TINY_MAIN = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--lr_backbone", "1e-4",
    "--num_classes", str(NUM_CLASSES), "--num_feature_levels", "2", "--hidden_dim", "32", "--nheads", "2",
    "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--dropout", "0.0",
    "--num_queries_one2one", "6", "--num_queries_one2many", "12", "--k_one2many", "2",
    "--train_scales", "80", "96", "--val_scale", "96", "--max_size", "128", "--no_crop_augment",
    "--batch_size", "1", "--num_workers", "0", "--print_freq", "100",
]
NUM_TRAIN, NUM_VAL = 8, 5  # an odd validation set: the distributed sampler pads it with a repeated image


# --------------------------------------------------------------------------- helpers


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra):
    """This environment, one thread per process, the venv's bin first on PATH (for `python` in the configs)
    and no distributed variables inherited from an outer launcher."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def run(cmd, env=None):
    """Run ``cmd`` in the repository root; fail with its output on a non-zero exit or a timeout."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            output, _ = proc.communicate()
            pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(cmd)}\n{output[-20000:]}")
    assert proc.returncode == 0, f"exit code {proc.returncode}: {' '.join(cmd)}\n{output[-20000:]}"
    return output


def torchrun(*args):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", NPROC,
                "--master_addr", "127.0.0.1", "--master_port", free_port(), *args])


def assert_both_ranks_ran(output):
    for rank in range(NPROC):
        assert f"distributed init (rank {rank} of {NPROC}, backend gloo)" in output, output[-5000:]


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """8 train and 5 val images, 1-2 large objects each (so that a box head started wide finds some)."""
    root = tmp_path_factory.mktemp("dist_coco")
    make_synthetic_coco(root, NUM_TRAIN, NUM_VAL, image_size=96, seed=7, min_object_frac=0.4,
                        max_object_frac=0.7, max_objects=2)
    return root


# --------------------------------------------------------------------------- gradient synchronisation


def test_ddp_step_equals_single_process_step_on_the_global_batch(tmp_path):
    out = tmp_path / "ddp_step.json"
    flags = [*TINY_TWO_STAGE, "--sgd", "--lr", "0.05", "--lr_backbone", "0.05", "--weight_decay", "0"]
    torchrun(WORKERS / "ddp_step.py", out, *flags)
    reports = json.loads(out.read_text())
    assert [r["rank"] for r in reports] == list(range(NPROC)) and all(r["world_size"] == NPROC for r in reports)
    for r in reports:
        assert r["initial_identical_across_ranks"], r
        assert r["max_abs_update"] > 1e-3, f"the step hardly moved the weights, nothing is tested: {r}"
        assert r["identical_across_ranks"], f"rank {r['rank']} ended with other weights than its peer: {r}"
        assert r["allclose_to_reference"], f"DDP step differs from the single-process step: {r}"
    # each rank computed the loss of its own half; their mean is the loss of the whole batch
    ddp_losses = [r["ddp_loss"] for r in reports]
    assert ddp_losses[0] != ddp_losses[1]
    assert sum(ddp_losses) / NPROC == pytest.approx(reports[0]["reference_loss"], rel=1e-5)


# --------------------------------------------------------------------------- evaluation


def test_distributed_eval_scores_every_image_exactly_once(tmp_path):
    # many objects per image: every category recurs in several images, so a twice-scored image lowers AP
    make_synthetic_coco(tmp_path / "coco", 0, NUM_VAL, image_size=64, seed=11, min_objects=5, max_objects=8)
    out = tmp_path / "eval_once.json"
    torchrun(WORKERS / "eval_once.py", out, tmp_path / "coco")
    reports = json.loads(out.read_text())
    assert len(reports) == NPROC
    shares = [set(r["indices"]) for r in reports]
    assert all(len(r["indices"]) == math.ceil(NUM_VAL / NPROC) for r in reports)
    assert set.union(*shares) == set(range(NUM_VAL))
    assert set.intersection(*shares), "the sampler should have padded the odd split with a repeated image"
    for r in reports:
        assert len(r["all_image_ids"]) == NUM_VAL
        assert set(r["local_image_ids"]) < set(r["all_image_ids"]), "each rank should see only its share"
        assert r["merged_image_ids"] == r["all_image_ids"] == r["evaluated_image_ids"], r
        assert r["num_detections"] == r["num_ground_truth"], f"some image was scored twice (or not at all): {r}"
        # the worker's scores fall with the image index: a twice-scored image would pull AP below 1
        assert r["stats"][0] == 1.0 and r["stats"][1] == 1.0, r


# --------------------------------------------------------------------------- main.py under torchrun


@pytest.fixture(scope="module")
def main_run(coco_set, tmp_path_factory):
    """One epoch of main.py on 2 processes, from weights whose box head predicts 0.6-wide boxes: an untrained
    head predicts 0.12-wide boxes that never overlap an object by IoU 0.5, and all-zero COCO scores would make
    the comparison of evaluations below vacuous. Returns (output dir, log entries, console output)."""
    out = tmp_path_factory.mktemp("dist_main")
    torch.manual_seed(0)
    model, _, _ = build_model(project_main.get_args_parser().parse_args(TINY_MAIN))
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].bias[2:] = math.log(0.6 / 0.4)  # shared by all decoder layers
    torch.save({"model": model.state_dict()}, out / "init.pth")
    output = torchrun(ROOT / "main.py", *TINY_MAIN, "--coco_path", coco_set, "--output_dir", out,
                      "--epochs", 1, "--resume", out / "init.pth")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return out, log, output


def test_main_trains_and_evaluates_on_two_processes(main_run):
    out, log, output = main_run
    assert_both_ranks_ran(output)
    # 8 training images over 2 processes, 1 per batch: 4 iterations on each
    assert re.search(r"Epoch 0 \[3/4\]", output), output[-5000:]
    assert len(log) == 1 and log[0]["epoch"] == 0
    assert math.isfinite(log[0]["train_loss"]) and math.isfinite(log[0]["test_loss"])
    assert len(log[0]["test_coco_eval_bbox"]) == 12
    for name in ("checkpoint.pth", "checkpoint0000.pth", "eval/latest.pth"):
        assert (out / name).is_file(), name


def test_single_process_eval_of_the_checkpoint_matches_the_distributed_eval(main_run, coco_set):
    out, log, _ = main_run
    logged = log[0]["test_coco_eval_bbox"]
    assert logged[1] > 0, f"AP50 is 0: the comparison would not test anything: {logged}"
    args = project_main.get_args_parser().parse_args(
        [*TINY_MAIN, "--coco_path", str(coco_set), "--eval", "--resume", str(out / "checkpoint.pth")])
    stats = project_main.main(args)
    assert stats["coco_eval_bbox"] == pytest.approx(logged, abs=1e-6)


def test_distributed_tta_eval_matches_the_single_process_one(main_run, coco_set):
    """--eval --tta on 2 processes (the odd set padded with a repeated image) scores each image once: the same AP
    as one process."""
    out, _, _ = main_run
    flags = [*TINY_MAIN, "--coco_path", str(coco_set), "--eval", "--resume", str(out / "checkpoint.pth"), "--tta",
             "--tta_scales", "64", "128", "--tta_flip"]
    output = torchrun(ROOT / "main.py", *flags)
    assert_both_ranks_ran(output)
    assert "test-time augmentation: 6 passes per image" in output
    printed = re.search(r"bbox AP (\S+)  AP50 (\S+)  AP75 (\S+)", output)
    single = project_main.main(project_main.get_args_parser().parse_args(flags))["coco_eval_bbox"]
    assert single[1] > 0, f"AP50 is 0: the comparison would not test anything: {single}"
    assert [float(v) for v in printed.groups()] == pytest.approx(single[:3], abs=1e-4)


# --------------------------------------------------------------------------- the launcher script


def test_run_dist_launch_with_the_synthetic_demo_config(coco_set, tmp_path):
    out = tmp_path / "demo"
    output = run(["bash", "tools/run_dist_launch.sh", NPROC, "configs/demo/r18_synthetic_hybrid_two_stage.sh",
                  "--device", "cpu", "--coco_path", coco_set, "--output_dir", out, "--epochs", 1,
                  "--batch_size", 1, "--num_workers", 0, "--train_scales", 96, "--val_scale", 96,
                  "--max_size", 128],
                 env=subprocess_env(MASTER_PORT=str(free_port()), MAX_RESTARTS="1"))
    assert_both_ranks_ran(output)
    assert "--max-restarts 1" in output  # the launcher's trace (set -x) of the torchrun command
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0]
    assert (out / "checkpoint.pth").is_file() and (out / "eval" / "latest.pth").is_file()
