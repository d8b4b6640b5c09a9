#!/usr/bin/env python3
"""Inference speed (images per second) of a model, run as evaluation runs it: eval mode, one-to-one queries.

    python tools/benchmark.py [--num_iters 300] [--warm_iters 5] [--batch_size 1] [--resume CKPT]
                              [--image_size H W] [--config configs/...sh] [main.py flags]

The input is the first validation image of --coco_path (as upstream's benchmark.py), or with --image_size a
random image of that size, which needs no dataset. Other arguments are main.py's (--device, --use_fp16, model
flags). Upstream's script timed all queries, one-to-many included; evaluation uses only the one-to-one ones.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datasets import build_dataset  # noqa: E402
from main import check_device, get_args_parser, resolve_num_classes  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from util.config_script import main_arguments  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402


def benchmark_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--num_iters", type=int, default=300, help="timed forward passes, warm-up included")
    parser.add_argument("--warm_iters", type=int, default=5, help="first passes left out of the timing")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--resume", default=None, help="checkpoint whose model is timed (default: random weights)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="time a random H x W image instead of the first validation image")
    parser.add_argument("--config", default=None,
                        help="config script (configs/**/*.sh) whose main.py flags build the model; flags given "
                             "here as well override them")
    return parser


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, inputs, device, num_iters, warm_iters, use_fp16=False):
    """Seconds per forward pass of each timed iteration (after warm_iters), in eval mode (one-to-one queries);
    the model's train/eval mode is restored afterwards."""
    times = []
    training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=use_fp16):
            for i in range(num_iters):
                _synchronize(device)
                start = time.perf_counter()
                model(inputs)
                _synchronize(device)
                if i >= warm_iters:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(training)
    return times


def main(argv=None):
    args, rest = benchmark_args_parser().parse_known_args(argv)
    if args.num_iters <= 0 or not 0 <= args.warm_iters < args.num_iters:
        raise ValueError(f"need 0 <= --warm_iters ({args.warm_iters}) < --num_iters ({args.num_iters})")
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    model_args = main_arguments(get_args_parser(), rest, args.config)
    check_device(model_args)
    device = torch.device(model_args.device)

    model_args.eval = True  # the class count, like the input, comes from the validation split
    if args.image_size is None:
        resolve_num_classes(model_args)
        image = build_dataset("val", model_args)[0][0]
    else:
        image = torch.randn(3, *args.image_size, generator=torch.Generator().manual_seed(0))
    model, _, _ = build_model(model_args)
    if args.resume:
        load_model_state(model, load_checkpoint(args.resume), args.resume, model_args)
    model.to(device)
    inputs = nested_tensor_from_tensor_list([image.to(device)] * args.batch_size)

    times = measure(model, inputs, device, args.num_iters, args.warm_iters, model_args.use_fp16)
    mean = statistics.fmean(times)
    print(f"input {args.batch_size} x {tuple(image.shape)} on {device}, {len(times)} timed passes: "
          f"{1000 * mean:.1f} ms per pass (median {1000 * statistics.median(times):.1f} ms)")
    fps = args.batch_size / mean
    print(f"Inference Speed: {fps:.1f} FPS")
    return fps


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        sys.exit(f"benchmark: {err}")
