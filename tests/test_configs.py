"""The upstream config scripts under configs/ and the launchers under tools/.

A config is read as text (its `python -u main.py` command, backslash continuations joined, ${EXP_DIR}
substituted) and checked against main.py's parser and against what its file name says; it is also run with
bash and a fake `python` to see the arguments it really passes. The launchers are run with a fake
`python`/`srun` on PATH, so nothing distributed starts here.
"""
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from main import get_args_parser  # noqa: E402
from util.config_script import read_config_script  # noqa: E402

CONFIGS = REPO / "configs"
REFERENCE = REPO.parent / "shared" / "reference" / "configs.json"
UPSTREAM_ROOTS = ("one_stage", "two_stage")  # configs of our own live elsewhere under configs/

ALL_SCRIPTS = sorted(CONFIGS.rglob("*.sh"))
# the ViT fork's configs (kxqt/H-Deformable-DETR) sit beside upstream's Swin ones, in vit/ folders
VIT_SCRIPTS = [p for p in ALL_SCRIPTS if p.parent.name == "vit"]
UPSTREAM_SCRIPTS = [p for p in ALL_SCRIPTS if p.relative_to(CONFIGS).parts[0] in UPSTREAM_ROOTS
                    and p not in VIT_SCRIPTS]
LR_DROP = {12: 11, 24: 20, 36: 30, 50: 40}


def rel(path):
    return path.relative_to(REPO).as_posix()


def parse(flags):
    return get_args_parser().parse_args(flags)


def fake_bin(tmp_path, *names):
    """A folder holding executables that print their argv, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        exe = bin_dir / name
        exe.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
        exe.chmod(0o755)
    return bin_dir


def clean_env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in {"GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "PYTHON",
                        "CPUS_PER_TASK", "SRUN_ARGS"}}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd, env, cwd=REPO):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- the scripts themselves

def test_upstream_configs_present():
    assert len(UPSTREAM_SCRIPTS) == 60


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=rel)
def test_script_shape(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -x" in lines
    assert 'PY_ARGS=("$@")' in lines and lines[-1] == '    "${PY_ARGS[@]}"'  # each argument as given
    assert path.stat().st_mode & stat.S_IXUSR, "config scripts must be executable"
    exp_dir, flags = read_config_script(path)
    assert exp_dir.startswith("exps/")
    args = parse(flags)
    assert args.output_dir == exp_dir


@pytest.mark.parametrize("path", UPSTREAM_SCRIPTS, ids=rel)
def test_name_matches_flags(path):
    """Every setting the file name encodes is what main.py receives; the rest stays at the defaults."""
    name = path.stem
    args = parse(read_config_script(path)[1])
    default = parse([])

    def number(pattern):
        m = re.search(pattern, name)
        return m and m.group(1)

    epochs = int(next(p for p in path.parts if p.endswith("eps"))[:-3])
    assert args.epochs == epochs and args.lr_drop == LR_DROP[epochs]

    hybrid = "hybrid_branch" in name
    if hybrid:
        assert args.lambda_one2many == float(number(r"lambda(\d+(?:\.\d+)?)"))
        assert args.k_one2many == int(number(r"group(\d+)"))
        assert args.num_queries_one2many == int(number(r"(?:^|_)t(\d+)(?:_|$)"))
    else:
        assert args.k_one2many == 0 and args.num_queries_one2many == 0
    n = number(r"(?:^|_)n(\d+)(?:_|$)")
    assert args.num_queries_one2one == (int(n) if n else 300)

    assert args.dropout == (0.0 if "_dp0_" in name else default.dropout)
    assert args.mixed_selection == ("_mqs" in name)
    assert args.look_forward_twice == ("_lft" in name)
    drop_path = number(r"drop_path(\d+(?:\.\d+)?)")
    assert args.drop_path_rate == (float(drop_path) if drop_path else default.drop_path_rate)
    decay = number(r"decay(\d+(?:\.\d+)?)")
    assert args.weight_decay == (float(decay) if decay else default.weight_decay)

    swin = number(r"swin_(tiny|small|large)")
    if swin:
        assert args.backbone == f"swin_{swin}"
        weights = Path(args.pretrained_backbone_path).name
        assert weights.startswith(f"swin_{swin}_")
        assert ("22k" in weights) == ("22k" in name or swin == "large")
    else:
        assert args.backbone == ("resnet101" if name.startswith("r101") else "resnet50")
        assert name.startswith(("r50", "r101"))

    assert args.two_stage == ("two_stage" in name)
    assert args.with_box_refine == ("iterative_bbox_refinement" in name)
    assert args.num_feature_levels == (1 if "single_scale" in name else 4)
    assert args.dilation == ("dc5" in name)


VIT_HYBRID = ("hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus"
              "_two_stage")


def test_vit_configs_present():
    """The fork's ViT-B (12 epochs; 6, 2, 0 encoder layers) and ViT-L (12, 36 epochs) H-Deformable-DETR."""
    expected = {f"12eps/vit/vit_base_{VIT_HYBRID}{s}" for s in ("", "_enc2", "_enc0")}
    expected |= {f"{e}eps/vit/vit_large_{VIT_HYBRID}" for e in (12, 36)}
    found = {p.relative_to(CONFIGS / "two_stage" / "deformable-detr-hybrid-branch").with_suffix("").as_posix()
             for p in VIT_SCRIPTS}
    assert found == expected


@pytest.mark.parametrize("path", VIT_SCRIPTS, ids=rel)
def test_vit_name_matches_flags(path):
    """As the fork's scripts: the hybrid recipe of the name, --backbone and MAE file of the name, the fork's
    (hard-coded there) drop path, the encoder depth of an _encN suffix, and the fork's backbone optimizer flags."""
    name = path.stem
    args = parse(read_config_script(path)[1])
    default = parse([])
    epochs = int(path.parts[-3][:-3])
    assert args.epochs == epochs and args.lr_drop == LR_DROP[epochs]
    assert (args.lambda_one2many, args.k_one2many, args.num_queries_one2many) == (1.0, 6, 1500)
    assert args.num_queries_one2one == 300 and args.dropout == 0.0 and args.dim_feedforward == 2048
    assert args.mixed_selection and args.look_forward_twice and args.two_stage and args.with_box_refine
    assert args.num_feature_levels == 4 and args.use_checkpoint and args.lsj is None
    size = re.match(r"vit_(base|large)_", name).group(1)
    assert args.backbone == f"vit_{size}"
    assert Path(args.pretrained_backbone_path).name == f"mae_pretrain_vit_{size}.pth"
    assert args.drop_path_rate == {"base": 0.1, "large": 0.4}[size]
    enc = re.search(r"_enc(\d+)$", name)
    assert args.enc_layers == (int(enc.group(1)) if enc else default.enc_layers)
    if size == "large":
        backbone_optim = (1e-4, 0.8, 1e-4)
    elif enc:
        backbone_optim = (1e-4, 0.7, 0.1)
    else:
        backbone_optim = (default.lr_backbone, 1.0, None)
    assert (args.lr_backbone, args.lr_layer_decay, args.wd_backbone) == backbone_optim
    assert args.use_fp16 == (not enc)
    assert args.weight_decay == default.weight_decay and args.lr == default.lr


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=rel)
def test_bash_passes_flags_then_extra_args(path, tmp_path):
    """Run the script for real with a fake `python`: the text reading above agrees with bash, extras go last."""
    exp_dir, flags = read_config_script(path)
    # upstream's unquoted ${PY_ARGS} expanded the pattern (ckpt1.pth exists: loaded instead), split "my coco"
    # and dropped the empty value
    (tmp_path / "ckpt1.pth").touch()
    extra = ["--resume", "ckpt[1].pth", "--eval", "--coco_path", "data/my coco", "--tta_scales", ""]
    env = clean_env(fake_bin(tmp_path, "python"))
    out = run(["bash", str(path), *extra], env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == ["-u", "main.py", *flags, *extra]


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference list of the upstream configs not available")
def test_matches_reference_list():
    reference = json.loads(REFERENCE.read_text())
    assert {rel(p) for p in UPSTREAM_SCRIPTS} == set(reference)
    for name, entry in reference.items():
        exp_dir, flags = read_config_script(REPO / name)
        assert exp_dir == entry["exp_dir"], name
        assert flags == [a.replace("${EXP_DIR}", exp_dir) for a in entry["args"]], name


# ---------------------------------------------------------------- launchers

LAUNCH = REPO / "tools" / "run_dist_launch.sh"
SLURM = REPO / "tools" / "run_dist_slurm.sh"
CONFIG = ("configs/two_stage/deformable-detr-baseline/12eps/"
          "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh")


def torchrun_call(argv):
    """Split the fake python's argv into torchrun's parsed options."""
    from torch.distributed.run import parse_args

    assert argv[:2] == ["-m", "torch.distributed.run"]
    return parse_args(argv[2:])


@pytest.mark.parametrize("gpus, env, nnodes, per_node", [
    ("8", {}, 1, 8),
    ("2", {}, 1, 2),
    ("16", {}, 2, 8),
    ("8", {"GPUS_PER_NODE": "4"}, 2, 4),
    ("16", {"GPUS_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "12345"}, 2, 8),
    ("08", {}, 1, 8),  # leading zeros are decimal, not octal (bash's $(( )) rejects 08, reads 010 as 8)
    ("010", {"GPUS_PER_NODE": "05"}, 2, 5),
])
def test_run_dist_launch_command(tmp_path, gpus, env, nnodes, per_node):
    out = run(["bash", str(LAUNCH), gpus, CONFIG, "--batch_size", "1", "--eval"],
              clean_env(fake_bin(tmp_path, "python"), **env))
    assert out.returncode == 0, out.stderr
    opts = torchrun_call(out.stdout.splitlines())
    assert opts.nnodes == str(nnodes)
    assert opts.nproc_per_node == str(per_node)
    assert opts.node_rank == int(env.get("NODE_RANK", 0))
    assert opts.master_addr == env.get("MASTER_ADDR", "127.0.0.1")
    assert opts.master_port == int(env.get("MASTER_PORT", 29500))
    assert opts.no_python
    assert opts.training_script == CONFIG
    assert opts.training_script_args == ["--batch_size", "1", "--eval"]


def test_run_dist_launch_uses_python_variable(tmp_path):
    bin_dir = fake_bin(tmp_path, "my-python")
    out = run(["bash", str(LAUNCH), "1", CONFIG], clean_env(tmp_path / "empty", PYTHON=str(bin_dir / "my-python")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["-m", "torch.distributed.run"]


@pytest.mark.parametrize("argv, message", [
    ([], "usage"),
    (["8"], "usage"),
    (["x", CONFIG], "positive integer"),
    (["00", CONFIG], "GPUS must be a positive integer, got '00'"),
    (["12", CONFIG], "multiple of GPUS_PER_NODE"),
    # torchrun waited for the missing node without a word
    (["8", CONFIG, {"NODE_RANK": "1"}], "NODE_RANK must be 0 to 0 for 1 node(s) of 8 GPUs, got '1'"),
    (["16", CONFIG, {"NODE_RANK": "-1"}], "NODE_RANK must be 0 to 1 for 2 node(s) of 8 GPUs, got '-1'"),
    (["16", CONFIG, {"NODE_RANK": "one"}], "NODE_RANK must be 0 to 1"),
])
def test_run_dist_launch_rejects(tmp_path, argv, message):
    env = argv.pop() if argv and isinstance(argv[-1], dict) else {}
    out = run(["bash", str(LAUNCH), *argv], clean_env(fake_bin(tmp_path, "python"), **env))
    assert out.returncode != 0
    assert message in out.stderr
    assert out.stdout == ""


def launcher_call(name, tmp_path, config, cwd=REPO):
    """Run launcher ``name`` (launch or slurm) on ``config`` with a fake python / srun that prints its argv."""
    if name == "launch":
        argv, fake = ["bash", str(LAUNCH), "1", str(config)], "python"
    else:
        argv, fake = ["bash", str(SLURM), "gpu", "hdetr", "1", str(config)], "srun"
    return run([*argv, "--eval"], clean_env(fake_bin(tmp_path, fake)), cwd=cwd)


@pytest.mark.parametrize("name", ["launch", "slurm"])
@pytest.mark.parametrize("case", ["missing", "relative", "folder", "not_executable"])
def test_launchers_check_the_config_first(tmp_path, name, case):
    """torchrun --no-python (srun: each task) ran the path as it was: a 63-line traceback ending in
    FileNotFoundError or PermissionError, once per process, for a script just written without chmod +x."""
    script = LAUNCH if name == "launch" else SLURM
    config = tmp_path / "my config.sh"
    shown = config
    if case == "relative":
        config = shown = Path("configs") / "no_such.sh"
    elif case == "folder":
        config = shown = tmp_path
    elif case == "not_executable":
        config.write_text((REPO / CONFIG).read_text())
        config.chmod(0o644)
    out = launcher_call(name, tmp_path, config)
    expected = {
        "missing": "does not exist; check the path",
        "relative": f"does not exist (a relative path, from {REPO}); check the path",
        "folder": "is not a regular file; give the script itself, e.g. configs/<config>.sh",
        "not_executable": f"is not executable; run: chmod +x {str(config).replace(' ', chr(92) + ' ')}",
    }[case]
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"{script}: config script '{shown}' {expected}"]
    if case == "not_executable":  # the advice, run as given, is enough
        fix = out.stderr.split("; run: ")[1]
        assert subprocess.run(["bash", "-c", fix]).returncode == 0
        out = launcher_call(name, tmp_path, config)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-2:] == [str(config), "--eval"]


def test_run_dist_launch_runs_a_bare_config_name_from_the_current_folder(tmp_path):
    """torchrun looks a name without a slash up on PATH: the checked file in this folder was not found."""
    (tmp_path / "mine.sh").write_text((REPO / CONFIG).read_text())
    (tmp_path / "mine.sh").chmod(0o755)
    out = launcher_call("launch", tmp_path, "mine.sh", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    opts = torchrun_call(out.stdout.splitlines())
    assert opts.training_script == "./mine.sh" and opts.training_script_args == ["--eval"]


@pytest.mark.parametrize("argv, message", [
    (["--resume", "exps/old/checkpoint0003.pth"], "--resume is set by this script"),  # it evaluated that one
    (["--resu=x.pth"], "--resu=x.pth abbreviates --resume, which this script sets"),
    (["--epochs", "1", "--output_dir", "exps/mine"], "--output_dir is set by this script"),
    (["--eval"], "--eval is set by this script"),
])
def test_demo_refuses_the_flags_it_sets(tmp_path, argv, message):
    """Before installing anything: the extra arguments also reached the evaluation, where they replaced the
    checkpoint the demo had just trained."""
    out = run(["bash", str(REPO / "tools" / "demo.sh"), *argv], clean_env(fake_bin(tmp_path, "python", "pip")))
    assert out.returncode == 2 and out.stderr.strip() == f"demo.sh: {message}" and out.stdout == ""


def test_launch_py_hands_over_to_torchrun(monkeypatch):
    import runpy

    import torch.distributed.run as torchrun

    seen = []
    monkeypatch.setattr(torchrun, "main", lambda argv: seen.append(argv))
    upstream = ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29501",
                "--nproc_per_node", "8", CONFIG, "--eval"]
    monkeypatch.setattr(sys, "argv", ["tools/launch.py", *upstream])
    runpy.run_path(str(REPO / "tools" / "launch.py"), run_name="__main__")
    opts = torchrun.parse_args(seen[0])
    assert opts.no_python and opts.nnodes == "2" and opts.node_rank == 1 and opts.nproc_per_node == "8"
    assert opts.master_addr == "10.0.0.1" and opts.master_port == 29501
    assert opts.training_script == CONFIG and opts.training_script_args == ["--eval"]


def test_run_dist_slurm_command(tmp_path):
    env = clean_env(fake_bin(tmp_path, "srun"), SRUN_ARGS="--quotatype=auto --time=1:00:00")
    out = run(["bash", str(SLURM), "gpu", "hdetr", "16", CONFIG, "--eval"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "-p", "gpu", "--job-name=hdetr", "--gres=gpu:8", "--ntasks=16", "--ntasks-per-node=8",
        "--cpus-per-task=4", "--kill-on-bad-exit=1", "--quotatype=auto", "--time=1:00:00", CONFIG, "--eval"]

    out = run(["bash", str(SLURM), "gpu", "hdetr", "2", CONFIG], clean_env(tmp_path / "bin", CPUS_PER_TASK="6"))
    assert "--gres=gpu:2" in out.stdout.splitlines() and "--cpus-per-task=6" in out.stdout.splitlines()

    out = run(["bash", str(SLURM), "gpu", "hdetr"], env)
    assert out.returncode != 0 and "usage" in out.stderr


def test_run_dist_slurm_passes_host_lists_as_written(tmp_path):
    """A file whose name the host list matches as a pattern, in the folder the job is started from."""
    (tmp_path / "--nodelist=node01").touch()
    env = clean_env(fake_bin(tmp_path, "srun"), SRUN_ARGS="--nodelist=node[01-04] --time=1:00:00")
    out = run(["bash", str(SLURM), "gpu", "hdetr", "8", str(REPO / CONFIG)], env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--nodelist=node[01-04]" in out.stdout.splitlines()


@pytest.mark.parametrize("gpus, env, message", [
    ("0", {}, "GPUS must be a positive integer"),
    ("", {}, "GPUS must be a positive integer"),
    ("8", {"GPUS_PER_NODE": "three"}, "GPUS_PER_NODE must be a positive integer"),
    # as run_dist_launch.sh: 12 tasks held 2 nodes of 8 GPUs
    ("12", {}, "GPUS (12) must be a multiple of GPUS_PER_NODE (8)"),
    ("4", {"GPUS_PER_NODE": "8"}, "GPUS (4) must be a multiple of GPUS_PER_NODE (8)"),
])
def test_run_dist_slurm_rejects(tmp_path, gpus, env, message):
    out = run(["bash", str(SLURM), "gpu", "hdetr", gpus, CONFIG], clean_env(fake_bin(tmp_path, "srun"), **env))
    assert out.returncode == 2 and message in out.stderr and "run_dist_slurm.sh" in out.stderr
    assert out.stdout == ""
