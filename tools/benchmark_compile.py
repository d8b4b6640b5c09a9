#!/usr/bin/env python3
"""Training step (or with --eval the evaluation forward) of the eager model against the same model with --compile,
side by side: the rounds alternate eager and compiled steps, so that a change in the machine's load falls on both.

    python tools/benchmark_compile.py --image_size H W [--image_size H W ...] [--batch_size N] [--rounds 7]
                                      [--threads N] [--eval] [--config configs/...sh] [main.py flags]

Both models have the same random weights and see the same random batch (tools/benchmark.py's random_batch and
its measurements); the first round of each is left out of the medians (the compiled one compiles there, and its
time is printed). Also printed: the graphs and graph breaks torch._dynamo.explain finds in the model's forward.
"""
import argparse
import copy
import runpy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from main import get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from models.compile import compile_model  # noqa: E402
from util import amp as mixed_precision  # noqa: E402
from util.arguments import check_args, check_device  # noqa: E402
from util.config_script import main_arguments  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

BENCHMARK = runpy.run_path(str(ROOT / "tools" / "benchmark.py"))


def compile_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are main.py's (python main.py --help lists them).")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), action="append", required=True,
                        help="random H x W images; give it several times for a batch of several sizes")
    parser.add_argument("--batch_size", type=int, default=None, help="images per step (default: one per size)")
    parser.add_argument("--boxes", type=int, default=10, help="random boxes per image (training)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of one eager and one compiled step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eval", action="store_true", help="time the evaluation forward instead")
    parser.add_argument("--config", default=None, help="config script whose main.py flags build the model")
    return parser


def one_step(model, criterion, images, targets, device, evaluation, amp):
    """Seconds of one training step (forward, losses, backward) or one evaluation forward, in precision `amp`."""
    if evaluation:
        return BENCHMARK["measure"](model, nested_tensor_from_tensor_list(images), device, 1, 0, amp)[0]
    times, _ = BENCHMARK["measure_training"](model, criterion, images, targets, device, 1, 0, amp)
    return sum(series[0] for series in times.values())


def graph_breaks(model, images, evaluation):
    """(graphs, [reason (file:line)]) of the model's forward."""
    model.train(not evaluation)
    with torch.set_grad_enabled(not evaluation):
        explained = torch._dynamo.explain(model)(nested_tensor_from_tensor_list(images))
    reasons = []
    for reason in explained.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" ({Path(frame.filename).resolve().relative_to(ROOT)}:{frame.lineno})" \
            if frame is not None and Path(frame.filename).resolve().is_relative_to(ROOT) else ""
        reasons.append(reason.reason.splitlines()[0] + where)
    return explained.graph_count, reasons


def main(argv=None):
    args, rest = compile_args_parser().parse_known_args(argv)
    if args.rounds < 2:
        raise ValueError(f"--rounds must be at least 2 (the first is left out), got {args.rounds}")
    batch_size = args.batch_size if args.batch_size is not None else len(args.image_size)
    BENCHMARK["check_batch_options"](batch_size, args.boxes, args.image_size, args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_args = main_arguments(get_args_parser(), rest, args.config)
    check_args(model_args)
    check_device(model_args)
    BENCHMARK["refuse_untimed_flags"](model_args, "benchmark_compile")
    amp = mixed_precision.amp_mode(model_args)
    device = torch.device(model_args.device)
    mixed_precision.warn_if_slow(device, amp, training=not args.eval)
    images, targets = BENCHMARK["random_batch"](args.image_size, batch_size, args.boxes,
                                                model_args.num_classes or 91, device)
    model, criterion, _ = build_model(model_args)
    model.to(device)
    criterion.to(device)
    compiled = compile_model(copy.deepcopy(model), device)

    graphs, reasons = graph_breaks(model, images, args.eval)
    torch._dynamo.reset()  # explain's traces are not the compiled model's
    times = {"eager": [], "compiled": []}
    for round_index in range(args.rounds):
        for name, net in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            seconds = one_step(net, criterion, images, targets, device, args.eval, amp)
            if round_index == 0 and name == "compiled":
                print(f"first compiled step (compiling): {time.perf_counter() - start:.1f} s")
            if round_index > 0:
                times[name].append(seconds)

    what = "evaluation forward" if args.eval else "training step (forward, losses, backward)"
    shapes = ", ".join(sorted({"x".join(map(str, image.shape[1:])) for image in images}))
    where = f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    eager, fast = (statistics.median(times[name]) for name in ("eager", "compiled"))
    print(f"{what}, batch {batch_size} ({shapes}) on {where}, {amp}, median of {args.rounds - 1} alternating "
          "rounds:")
    print(f"  eager {1000 * eager:.0f} ms, compiled {1000 * fast:.0f} ms, compiled / eager {fast / eager:.2f}")
    print(f"  dynamo: {graphs} graph(s), {len(reasons)} graph break(s)" + "".join(f"\n    - {r}" for r in reasons))
    return eager, fast


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        sys.exit(f"benchmark_compile: {err}")
