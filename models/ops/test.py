"""Check the compiled MultiScaleDeformableAttention op against the PyTorch path on a GPU, or time both.

    python test.py               # forward in float64 and float32, gradcheck in float64
    python test.py --benchmark   # forward and backward times, decoder- and encoder-sized inputs
Run from models/ops (or as models/ops/test.py); builds the op on first use unless it is installed.
"""
import argparse
import sys

import torch
from functions import get_extension, ms_deform_attn_compiled, ms_deform_attn_core_pytorch

HEADS, CHANNELS, POINTS = 8, 32, 4
ENCODER_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]


def make_inputs(n, num_queries, heads, channels, levels_hw, points, dtype, seed=0):
    """(value, shapes, start_index, locations, weights) on the GPU; weights sum to 1 over levels and points."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(levels_hw, dtype=torch.long, device="cuda")
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.rand(n, int(sizes.sum()), heads, channels, device="cuda", dtype=dtype, generator=generator)
    locations = torch.rand(n, num_queries, heads, len(levels_hw), points, 2, device="cuda", dtype=dtype,
                           generator=generator)
    weights = torch.rand(n, num_queries, heads, len(levels_hw), points, device="cuda", dtype=dtype,
                         generator=generator) + 1e-5
    weights = weights / weights.sum((-2, -1), keepdim=True)
    return value, shapes, starts, locations, weights


def compiled(value, shapes, starts, locations, weights, im2col_step=64):
    return ms_deform_attn_compiled(value, shapes, starts, locations, weights, im2col_step)


def pytorch(value, shapes, starts, locations, weights, im2col_step=64):
    return ms_deform_attn_core_pytorch(value, shapes, locations, weights)


def check_forward(dtype, tolerance):
    value, shapes, starts, locations, weights = make_inputs(2, 300, HEADS, CHANNELS, ENCODER_LEVELS[1:], POINTS,
                                                            dtype)
    expected = pytorch(value, shapes, starts, locations, weights)
    out = compiled(value, shapes, starts, locations, weights)
    abs_err = (out - expected).abs().max().item()
    rel_err = ((out - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()
    ok = abs_err < tolerance
    print(f"* {ok} forward {dtype}: max abs err {abs_err:.2e}, max rel err {rel_err:.2e} (tolerance {tolerance:g})")
    return ok


def check_gradients(channels):
    value, shapes, starts, locations, weights = make_inputs(1, 2, 2, channels, [(6, 4), (3, 2)], 2, torch.float64)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    ok = torch.autograd.gradcheck(lambda v, loc, attn: compiled(v, shapes, starts, loc, attn), inputs,
                                  eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-10,
                                  raise_exception=False)
    print(f"* {ok} gradcheck float64, {channels} channels (value, sampling locations, attention weights)")
    return ok


def time_ms(function, iters):
    """Mean milliseconds of function() over iters runs after warm-up, with CUDA events."""
    for _ in range(3):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def benchmark(iters):
    cases = [("decoder", 1800), ("encoder", sum(h * w for h, w in ENCODER_LEVELS))]
    print(f"N=2 M={HEADS} D={CHANNELS} L={len(ENCODER_LEVELS)} P={POINTS} levels {ENCODER_LEVELS}, float32, "
          f"mean of {iters} runs")
    print(f"{'case':<10}{'Lq':>7}{'path':>10}{'forward ms':>13}{'backward ms':>13}{'peak MiB':>10}")
    for name, num_queries in cases:
        inputs = make_inputs(2, num_queries, HEADS, CHANNELS, ENCODER_LEVELS, POINTS, torch.float32)
        for path, op in (("compiled", compiled), ("pytorch", pytorch)):
            leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
            args = (leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
            grad_out = torch.rand(2, num_queries, HEADS * CHANNELS, device="cuda")
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                forward_ms = time_ms(lambda: op(*args), iters)
            both_ms = time_ms(lambda: op(*args).backward(grad_out), iters)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            print(f"{name:<10}{num_queries:>7}{path:>10}{forward_ms:>13.3f}{both_ms - forward_ms:>13.3f}{peak:>10.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", help="time the op instead of checking it")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("test.py needs a CUDA GPU; the CPU tests are tests/test_ms_deform_attn*.py")
    if get_extension() is None:
        sys.exit("the compiled op is not available (see the warning above)")
    if args.benchmark:
        benchmark(args.iters)
        return
    results = [check_forward(torch.float64, 1e-12), check_forward(torch.float32, 1e-5)]
    results += [check_gradients(channels) for channels in (1, 30, 32, 64, 71)]
    print("all checks passed" if all(results) else "SOME CHECKS FAILED")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
