"""tools/benchmark.py: timing as evaluation runs the model, inputs from the dataset or of a given size, errors."""
import json
import re
import runpy
import statistics
import sys

import pytest
import torch
from model_helpers import ROOT, SMALL, TWO_STAGE_HYBRID, build, parse

from datasets.synthetic import make_synthetic_coco
from util.checkpoint import save_checkpoint
from util.config_script import read_config_script

TOOL = runpy.run_path(str(ROOT / "tools" / "benchmark.py"))  # its functions, without running main
FLAGS = SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "2"]


def test_measure_times_the_one_to_one_queries_in_eval_mode():
    model, _, _, _ = build(FLAGS)
    model.train()
    seen = []
    forward = model.forward

    def recording(samples):
        out = forward(samples)
        seen.append((out["pred_logits"].shape[1], "pred_logits_one2many" in out, model.training,
                     torch.is_grad_enabled()))
        return out

    model.forward = recording
    times = TOOL["measure"](model, [torch.randn(3, 64, 80)], torch.device("cpu"), num_iters=3, warm_iters=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert seen == [(10, False, False, False)] * 3  # 10 one-to-one of 30 queries alone, eval mode, no autograd
    assert model.training and model.num_queries == 30  # restored afterwards


def test_random_image_of_a_given_size(capsys):
    fps = TOOL["main"](["--image_size", "96", "112", "--num_iters", "3", "--warm_iters", "1", "--batch_size", "2",
                        *FLAGS])
    out = capsys.readouterr().out
    assert fps > 0 and "input 2 x (3, 96, 112) on cpu, 1 threads, fp32, 2 timed passes" in out
    assert f"Inference Speed: {fps:.1f} FPS" in out


def test_first_validation_image_and_a_checkpoint(tmp_path, capsys):
    make_synthetic_coco(tmp_path / "data", 0, 2, image_size=96, seed=1)
    flags = FLAGS + ["--coco_path", str(tmp_path / "data"), "--val_scale", "96", "--max_size", "128"]
    model, _, _, args = build(flags + ["--num_classes", "7"])
    save_checkpoint({"model": model.state_dict(), "args": args}, tmp_path / "model.pth")
    TOOL["main"](["--num_iters", "2", "--warm_iters", "1", "--resume", str(tmp_path / "model.pth"), *flags])
    first_image = TOOL["build_dataset"]("val", parse(flags))[0][0]
    # the checkpoint's 7 classes are also what the annotations give (ids 1..6)
    assert f"input 1 x {tuple(first_image.shape)} on cpu" in capsys.readouterr().out

    model, _, _, args = build(flags + ["--num_classes", "5"])
    save_checkpoint({"model": model.state_dict(), "args": args}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="class_embed"):
        TOOL["main"](["--num_iters", "2", "--warm_iters", "1", "--resume", str(tmp_path / "other.pth"), *flags])


@pytest.mark.parametrize("argv, message", [
    (["--num_iters", "3", "--warm_iters", "3"], "--warm_iters"),
    (["--batch_size", "0"], "--batch_size"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_errors(argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises((ValueError, RuntimeError), match=message):
        TOOL["main"](["--image_size", "64", "64", *FLAGS, *argv])


def test_command_line_error_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/benchmark.py", "--image_size", "64", "64", "--num_iters", "0", *FLAGS])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "benchmark.py"), run_name="__main__")
    assert str(info.value.code).startswith("benchmark: need 0 <= --warm_iters")


def test_model_from_a_config_script_with_overrides(monkeypatch, capsys):
    built = []
    build_model = TOOL["main"].__globals__["build_model"]

    def recording(args):
        built.append(args)
        return build_model(args)

    monkeypatch.setitem(TOOL["main"].__globals__, "build_model", recording)
    TOOL["main"](["--config", str(ROOT / "configs/demo/r18_synthetic_hybrid_two_stage.sh"), "--image_size", "64", "80",
                  "--num_iters", "2", "--warm_iters", "1", "--num_queries_one2one", "12"])
    (args,) = built
    assert (args.backbone, args.hidden_dim, args.two_stage, args.num_queries_one2many) == ("resnet18", 64, True, 120)
    assert args.num_queries_one2one == 12  # given on the command line: overrides the config's 30
    assert "Inference Speed" in capsys.readouterr().out


def test_config_script_errors(tmp_path):
    read = read_config_script
    with pytest.raises(FileNotFoundError, match="no config script"):
        read(tmp_path / "none.sh")
    (tmp_path / "a.sh").write_text("echo hello\n")
    with pytest.raises(ValueError, match="not a config script"):
        read(tmp_path / "a.sh")
    (tmp_path / "b.sh").write_text("EXP_DIR=exps/b\npython -u main.py \\\n"
                                   "  --output_dir ${EXP_DIR} \\\n  --two_stage\n")
    with pytest.raises(ValueError, match="must end with"):
        read(tmp_path / "b.sh")
    (tmp_path / "c.sh").write_text("EXP_DIR=exps/c\npython -u main.py \\\n  --output_dir ${EXP_DIR} \\\n  ${PY_ARGS}\n")
    assert read(tmp_path / "c.sh") == ("exps/c", ["--output_dir", "exps/c"])


def test_training_mode_times_forward_loss_and_backward(capsys):
    step = TOOL["main"](["--train", "--image_size", "64", "80", "--image_size", "72", "64", "--num_iters", "3",
                         "--warm_iters", "1", "--threads", "1", *FLAGS])
    out = capsys.readouterr().out
    assert step > 0
    assert "training step, batch 2 (64x80, 72x64) on cpu, 1 threads, fp32, median of 2 timed steps: forward" in out
    for part in ("loss", "backward", "step", "peak memory"):
        assert f" {part} " in out


def test_measure_training_computes_gradients_and_leaves_the_weights():
    model, criterion, _, _ = build(FLAGS)
    before = {k: v.clone() for k, v in model.named_parameters()}
    images, targets = TOOL["random_batch"]([(64, 80), (80, 64)], 2, 3, 91, torch.device("cpu"))
    backward = []
    model.class_embed[0].weight.register_hook(lambda grad: backward.append(grad.abs().sum().item()))
    times, peak = TOOL["measure_training"](model, criterion, images, targets, torch.device("cpu"), 3, 1)
    assert {k: len(v) for k, v in times.items()} == {"forward": 2, "loss": 2, "backward": 2, "cpu": 2}
    assert all(t > 0 for v in times.values() for t in v) and peak > 2 ** 20
    assert len(backward) == 3 and all(g > 0 for g in backward)  # one backward per step, reaching the heads
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_training_mode_on_the_first_training_images(tmp_path, capsys):
    make_synthetic_coco(tmp_path / "data", 3, 1, image_size=96, seed=2)
    flags = FLAGS + ["--coco_path", str(tmp_path / "data"), "--train_scales", "96", "--max_size", "128",
                     "--no_crop_augment"]
    TOOL["main"](["--train", "--batch_size", "2", "--num_iters", "2", "--warm_iters", "1", *flags])
    assert re.search(r"training step, batch 2 \(\d+x\d+(, \d+x\d+)?\) on cpu", capsys.readouterr().out)
    with pytest.raises(ValueError, match="--batch_size 4 needs at least that many train images"):
        TOOL["main"](["--train", "--batch_size", "4", "--num_iters", "2", "--warm_iters", "1", *flags])


# --------------------------------------------------------------------------- mixed precision (--amp)


def test_amp_runs_the_model_under_autocast_and_the_header_names_the_cpu(capsys, monkeypatch):
    seen = []
    build_model = TOOL["main"].__globals__["build_model"]

    def recording(args):
        model, criterion, post = build_model(args)
        model.register_forward_pre_hook(lambda *_: seen.append(torch.get_autocast_dtype("cpu")
                                                               if torch.is_autocast_enabled("cpu") else None))
        return model, criterion, post

    monkeypatch.setitem(TOOL["main"].__globals__, "build_model", recording)
    step = TOOL["main"](["--train", "--image_size", "64", "80", "--image_size", "72", "64", "--num_iters", "2",
                         "--warm_iters", "1", "--amp", "bf16", "--profile", "1", "--profile_rows", "3", *FLAGS])
    out = capsys.readouterr().out
    assert step > 0 and seen == [torch.bfloat16] * 3  # 2 timed steps and 1 profiled, all under bf16 autocast
    assert re.match(r"benchmark: training step in bf16 on cpu; CPU capability \S+: bf16 (native|emulated \(slow\)), "
                    r"fp16 (native|emulated \(slow\))\n", out)
    assert "training step, batch 2 (64x80, 72x64) on cpu, 1 threads, bf16, median of 1 timed steps" in out
    table = out[out.index("top operators by self CPU time"):].splitlines()
    assert len(table) == 1 + 1 + 3 + 1 and re.match(r"  aten::\S+ +\d+\.\d +\d+\.\d% +\d+$", table[2])
    assert re.match(r"casts and copies per iteration: aten::copy_ \d+, .*calls; \d+\.\d% of the self CPU time$",
                    table[-1])

    seen.clear()
    TOOL["main"](["--image_size", "64", "80", "--num_iters", "2", "--warm_iters", "1", "--use_fp16", *FLAGS])
    out = capsys.readouterr().out
    assert seen == [torch.float16] * 2 and "input 1 x (3, 64, 80) on cpu, 1 threads, fp16, 1 timed passes" in out
    assert "peak memory" in out


def test_the_fp16_training_step_scales_the_loss():
    model, criterion, _, _ = build(FLAGS)
    model.backbone.requires_grad_(False)  # fp16 convolution weight gradients have no fast CPU kernel
    images, targets = TOOL["random_batch"]([(64, 80), (80, 64)], 2, 3, 91, torch.device("cpu"))
    grads = []
    model.class_embed[0].weight.register_hook(lambda grad: grads.append(grad.abs().sum().item()))
    TOOL["measure_training"](model, criterion, images, targets, torch.device("cpu"), 1, 0, "fp32")
    TOOL["measure_training"](model, criterion, images, targets, torch.device("cpu"), 1, 0, "fp16")
    # the gradient reaching the weights is the scaled loss's: 2^16 times fp32's, within fp16 rounding
    assert grads[1] == pytest.approx(2.0 ** 16 * grads[0], rel=0.05)


# --------------------------------------------------------------------------- --compare and --json


def test_json_holds_the_printed_figures(tmp_path, capsys):
    path = tmp_path / "run.json"
    step = TOOL["main"](["--train", "--image_size", "96", "112", "--num_iters", "3", "--warm_iters", "1", "--json",
                         str(path), *FLAGS])
    figures = json.loads(path.read_text())
    assert figures["amp"] == "fp32" and figures["device"] == "cpu" and len(figures["times_ms"]) == 2
    assert statistics.median(figures["times_ms"]) == pytest.approx(1000 * step)
    printed = re.search(r"step ([\d.]+) ms \(process CPU time ([\d.]+) ms\); peak memory (\d+) MiB",
                        capsys.readouterr().out)
    assert float(printed[1]) == pytest.approx(statistics.median(figures["times_ms"]), abs=0.05)
    assert float(printed[2]) == pytest.approx(statistics.median(figures["cpu_ms"]), abs=0.05)
    assert int(printed[3]) == round(figures["peak_mib"])


def test_compare_alternates_the_precisions_and_reports_the_ratios(capsys):
    runs = []
    figures = {"fp32": [[100.0, 300.0, 200.0], [210.0, 190.0]], "bf16": [[90.0, 110.0], [60.0, 160.0, 80.0]]}
    peaks = {"fp32": [1000.0, 1100.0], "bf16": [800.0, 770.0]}

    def fake_run(argv, json_path, label):
        amp = argv[argv.index("--amp") + 1]
        round_index = sum(1 for a, _ in runs if a == amp)
        runs.append((amp, argv))
        return {"times_ms": figures[amp][round_index], "cpu_ms": [1.0], "peak_mib": peaks[amp][round_index]}, \
            ["a warning", ""]

    args, rest = TOOL["benchmark_args_parser"]().parse_known_args(
        ["--train", "--image_size", "64", "80", "--image_size", "72", "64", "--num_iters", "4", "--warm_iters", "1",
         "--threads", "1", "--compare", "fp32", "bf16", "--rounds", "2", *FLAGS])
    args = TOOL["tool_options"](args)
    model_args = TOOL["main_arguments"](TOOL["get_args_parser"](), rest)
    summary = TOOL["compare_precisions"](args, rest, model_args, run=fake_run)
    assert [amp for amp, _ in runs] == ["fp32", "bf16", "fp32", "bf16"]  # alternated
    options = ["--num_iters", "4", "--warm_iters", "1", "--boxes", "10", "--threads", "1", "--image_size", "64", "80",
               "--image_size", "72", "64", "--train", *FLAGS]
    assert all(argv == options + ["--amp", amp] for amp, argv in runs)
    # medians of the runs: fp32 200, 200; bf16 100, 80
    assert summary == {"fp32": 200.0, "bf16": 90.0}
    out, err = capsys.readouterr()
    assert err.count("a warning") == 1  # a run's message is passed on once
    lines = out.splitlines()
    assert lines[0].startswith("benchmark: training step in fp32, bf16, 2 rounds, each run a fresh process; CPU ")
    assert "round 2 bf16: 80.0 ms (process CPU time 1.0 ms), peak memory 770 MiB" in lines
    assert lines[-3].split() == ["fp32", "200.0", "200.0", "200.0", "1.00", "1100", "1.00"]
    assert lines[-2].split() == ["bf16", "100.0", "80.0", "90.0", "0.45", "800", "0.73"]
    assert lines[-1] == "bf16 / fp32 per round: 0.50, 0.40"


def test_compare_runs_each_precision_in_its_own_process(capsys):
    summary = TOOL["main"](["--image_size", "96", "112", "--num_iters", "2", "--warm_iters", "1", "--threads", "1",
                            "--compare", "fp32", "bf16", "--rounds", "1", *FLAGS])
    assert set(summary) == {"fp32", "bf16"} and all(ms > 0 for ms in summary.values())
    out = capsys.readouterr().out
    assert re.search(r"^round 1 bf16: [\d.]+ ms", out, re.M) and "bf16 / fp32 per round: " in out


@pytest.mark.parametrize("argv, message", [
    (["--compare", "fp32", "fp32"], "lists a precision twice"),
    (["--compare", "fp32", "bf16", "--rounds", "0"], "--rounds must be positive"),
    (["--compare", "fp32", "bf16", "--amp", "bf16"], "leave out --amp"),
    (["--compare", "fp32", "fp16", "--use_fp16"], "leave out --amp"),
    (["--compare", "fp32", "bf16", "--profile", "1"], "one run at a time"),
])
def test_compare_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        TOOL["main"](["--image_size", "64", "64", *FLAGS, *argv])


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "5"], "--rounds needs --compare: without it nothing reads --rounds"),
    (["--profile_rows", "30"], "--profile_rows needs --profile"),
    (["--boxes", "50"], r"--boxes needs --train with --image_size \(the random images it places boxes on\)"),
    (["--eval", "--tta"], "--tta: benchmark times one forward pass at one scale"),
    (["--compile"], "--compile: benchmark times the eager model; tools/benchmark_compile.py"),
])
def test_options_that_nothing_would_read_are_refused(argv, message):
    """They were accepted and ignored: the figure printed was of something else than asked."""
    with pytest.raises(ValueError, match=message):
        TOOL["main"](["--image_size", "64", "64", *FLAGS, *argv])
    with pytest.raises(ValueError, match="--boxes needs --train with --image_size"):
        TOOL["main"](["--train", "--boxes", "5", *FLAGS])  # dataset images: their own boxes


def test_a_failed_run_of_compare_names_it(tmp_path):
    with pytest.raises(RuntimeError, match=r"the round 1 fp32 run failed \(exit status 1\): benchmark: .*batch_size"):
        TOOL["_run_in_process"](["--image_size", "64", "64", "--batch_size", "-1", *FLAGS], tmp_path / "r.json",
                                "round 1 fp32")


def test_benchmark_compile_times_the_precision_asked_for(monkeypatch, capsys):
    """tools/benchmark_compile.py ran every step in fp32 whatever --amp (or a config's --use_fp16) said. Compiling
    is stubbed out here (the compiled model is the eager one): what is checked is the precision of the steps."""
    import util.amp

    tool = runpy.run_path(str(ROOT / "tools" / "benchmark_compile.py"))
    seen = []
    forward = util.amp.forward
    monkeypatch.setattr(util.amp, "forward", lambda model, samples, device, amp: (seen.append(amp),
                                                                                  forward(model, samples, device,
                                                                                          amp))[1])
    monkeypatch.setitem(tool["main"].__globals__, "compile_model", lambda model, device: model)
    monkeypatch.setitem(tool["main"].__globals__, "graph_breaks", lambda *args: (1, []))
    tool["main"](["--image_size", "64", "64", "--rounds", "2", "--eval", "--threads", "1", "--amp", "bf16", *FLAGS])
    assert seen == ["bf16"] * 4  # 2 rounds of eager and "compiled"
    assert "on cpu, 1 threads, bf16, median of 1 alternating rounds:" in capsys.readouterr().out
    for option, message in ((["--batch_size", "0"], "--batch_size must be positive"),
                            (["--boxes", "-1"], "--boxes must be >= 0"),
                            (["--threads", "0"], "--threads must be positive")):
        with pytest.raises(ValueError, match=message):
            tool["main"](["--image_size", "64", "64", *option, *FLAGS])
    with pytest.raises(ValueError, match="--image_size must be positive"):
        tool["main"](["--image_size", "0", "64", *FLAGS])
