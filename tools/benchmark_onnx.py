#!/usr/bin/env python3
"""Latency of an exported model in onnxruntime against the PyTorch model it came from, on the CPU.

    python tools/benchmark_onnx.py --resume CKPT --onnx model.onnx [--image_size 800 1066] [--num_iters 10]
                                   [--warm_iters 2] [--threads N] [--config configs/...sh] [main.py flags]

Times one forward pass on a random normalised image of --image_size (one image, no padding), median over the
timed iterations (each iteration runs both once): PyTorch eager in eval mode as evaluation runs it (the compiled CPU
deformable-attention op when it loads, else the grid_sample path the graph computes) and onnxruntime's CPU provider
on the exported graph; the PyTorch run includes the post-processing when the graph does. --threads sets both
torch's and onnxruntime's intra-op threads (default: 1 per core).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.ops.functions.ms_deform_attn_func import use_compiled  # noqa: E402
from models.trained_model import trained_model  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from util.onnx_runtime import OnnxDetector  # noqa: E402


def benchmark_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are main.py's (python main.py --help lists them).")
    parser.add_argument("--onnx", required=True, help="the exported model (tools/export_onnx.py)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=[800, 1066])
    parser.add_argument("--num_iters", type=int, default=10, help="timed iterations, warm-up included")
    parser.add_argument("--warm_iters", type=int, default=2, help="first iterations left out of the timing")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--config", default=None, help="config script whose main.py flags build the model "
                                                       "(when the checkpoint carries no arguments)")
    return parser


def median_seconds(runs, num_iters, warm_iters):
    """Median seconds of each of `runs` over the timed iterations; every iteration runs each of them once, so that
    a change in the machine's load falls on all alike."""
    times = [[] for _ in runs]
    for i in range(num_iters):
        for run, series in zip(runs, times):
            start = time.perf_counter()
            run()
            if i >= warm_iters:
                series.append(time.perf_counter() - start)
    return [statistics.median(series) for series in times]


def main(argv=None):
    args, rest = benchmark_args_parser().parse_known_args(argv)
    if args.num_iters <= 0 or not 0 <= args.warm_iters < args.num_iters:
        raise ValueError(f"need 0 <= --warm_iters ({args.warm_iters}) < --num_iters ({args.num_iters})")
    if min(args.image_size) <= 0:
        raise ValueError(f"--image_size must be positive, got {args.image_size}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    model, postprocessors, _ = trained_model(
        rest, args.config, device="cpu",
        fp32_only="the ONNX graph and the PyTorch model it is timed against run in float32 here")
    detector = OnnxDetector(args.onnx, threads=threads)
    postprocess = postprocessors["bbox"] if detector.with_postprocess else None

    image = torch.randn(3, *args.image_size, generator=torch.Generator().manual_seed(0))
    samples = nested_tensor_from_tensor_list([image])
    images, mask = samples.tensors.numpy(), samples.mask.numpy()
    orig_sizes = [list(args.image_size)]

    def run_torch():
        with torch.no_grad():
            outputs = model(samples)
            if postprocess is not None:
                postprocess(outputs, torch.tensor(orig_sizes))

    timings = [
        ("PyTorch eager" + (" (compiled CPU op)" if use_compiled(image) else " (grid_sample path)"), run_torch),
        ("onnxruntime CPU", lambda: detector.run(images, mask, orig_sizes)),
    ]
    print(f"one {args.image_size[0]}x{args.image_size[1]} image, {threads} threads, median of "
          f"{args.num_iters - args.warm_iters} runs after {args.warm_iters} warm-up")
    medians = median_seconds([run for _, run in timings], args.num_iters, args.warm_iters)
    for (name, _), seconds in zip(timings, medians):
        print(f"  {name}: {seconds:.3f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, ImportError) as err:
        sys.exit(f"benchmark_onnx: {err}")
