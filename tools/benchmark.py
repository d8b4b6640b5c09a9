#!/usr/bin/env python3
"""Speed of a model: inference (images per second) as evaluation runs it, or with --train the training step.

    python tools/benchmark.py [--num_iters 300] [--warm_iters 5] [--batch_size 1] [--resume CKPT]
                              [--image_size H W [--image_size H W ...]] [--threads N] [--config configs/...sh]
                              [--train [--boxes 10]] [--amp fp32|bf16|fp16] [--profile N] [--json FILE]
                              [--compare fp32 bf16 [fp16] [--rounds 3]] [main.py flags]

Inference times the model in eval mode (one-to-one queries) on the first validation image of --coco_path (as
upstream's benchmark.py), or with --image_size a random image of that size, which needs no dataset. Upstream's
script timed all queries, one-to-many included; evaluation uses only the one-to-one ones.

--train times training steps instead: forward, losses (matching included) and backward, each separately, and the
peak memory (CUDA: allocated by torch; CPU: the process's resident set) during the timed steps. The batch is
the first --batch_size training images with their boxes, or random images of the --image_size sizes (image i of
the batch takes the i-th size, cycling) with --boxes random boxes each. Other arguments are main.py's (--device,
--amp / --use_fp16, model flags); --threads sets torch's CPU threads (the process CPU time printed beside the
times is the fairer figure on a CPU shared with other work, at 1 thread). --amp bf16|fp16 runs the model under
autocast as training and evaluation do (util.amp: losses in float32, fp16's loss scaled). --profile N then runs N more
iterations under torch.profiler and prints the operators taking the most CPU time (self time) and how much of it
went to casts and copies (aten::copy_, aten::to). The first line names the CPU capability and whether bf16 and fp16
are native on this CPU.

--compare fp32 bf16 [fp16] times the same run (same weights, inputs and flags) in each precision, each run a fresh
process, the precisions alternated for --rounds rounds, and prints each one's median time, peak memory and their
ratios to the first precision's. --json FILE writes a run's figures as JSON.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datasets import build_dataset  # noqa: E402
from main import num_classes_of  # noqa: E402
from models import build_model  # noqa: E402
from models.criterion import weighted_losses  # noqa: E402
from util import amp as mixed_precision  # noqa: E402
from util.arguments import AMP_MODES, check_args, check_device, get_args_parser  # noqa: E402
from util.checkpoint import evaluation_weights, load_checkpoint, load_model_state  # noqa: E402
from util.config_script import main_arguments  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

# options read only with another one (tool_options): None on the command line, these defaults once checked
OPTION_DEFAULTS = {"rounds": 3, "profile_rows": 15, "boxes": 10}


def benchmark_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are main.py's (python main.py --help lists them).")
    parser.add_argument("--num_iters", type=int, default=300, help="timed iterations, warm-up included")
    parser.add_argument("--warm_iters", type=int, default=5, help="first iterations left out of the timing")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per iteration (default: 1, or the number of --image_size sizes)")
    parser.add_argument("--resume", default=None, help="checkpoint whose model is timed (default: random weights)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), action="append", default=None,
                        help="time random H x W images instead of dataset images; give it several times for a "
                             "batch of several sizes")
    parser.add_argument("--config", default=None,
                        help="config script (configs/**/*.sh) whose main.py flags build the model; flags given "
                             "here as well override them")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (forward, losses, backward) and their peak memory")
    parser.add_argument("--boxes", type=int, default=None, help="random boxes per random image with --train and "
                        f"--image_size (default {OPTION_DEFAULTS['boxes']})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timing, profile N more iterations (torch.profiler) and print the top "
                             "operators by self CPU time, with the share of casts and copies")
    parser.add_argument("--profile_rows", type=int, default=None,
                        help=f"operators listed by --profile (default {OPTION_DEFAULTS['profile_rows']})")
    parser.add_argument("--compare", nargs="+", choices=AMP_MODES, default=None, metavar="PRECISION",
                        help="time the run in each of these precisions (fp32, bf16, fp16), each a fresh process, "
                             "alternated for --rounds rounds; print the medians and their ratios to the first's")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of --compare (default {OPTION_DEFAULTS['rounds']})")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the run's figures to FILE as JSON")
    return parser


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, inputs, device, num_iters, warm_iters, amp="fp32", cpu_times=None):
    """Seconds per forward pass of each timed iteration (after warm_iters), in eval mode (one-to-one queries),
    in precision `amp` (util.amp, as evaluation runs it); the model's train/eval mode is restored afterwards.
    `cpu_times` (a list) receives the process CPU seconds of each timed pass."""
    times = []
    training = model.training
    model.eval()
    try:
        for i in range(num_iters):
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            mixed_precision.forward(model, inputs, device, amp)
            _synchronize(device)
            if i >= warm_iters:
                times.append(time.perf_counter() - start)
                if cpu_times is not None:
                    cpu_times.append(time.process_time() - cpu_start)
    finally:
        model.train(training)
    return times


class PeakMemory:
    """Peak memory in bytes between reset() and read(): allocated by torch on CUDA, resident set on the CPU
    (Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere the process's lifetime peak)."""

    def __init__(self, device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def read(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            return kib * 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_training(model, criterion, images, targets, device, num_iters, warm_iters, amp="fp32"):
    """Seconds of forward, losses and backward of each timed training step (after warm_iters) in precision `amp`
    (as engine.train_one_epoch: the forward under autocast, the losses in float32, fp16's loss scaled), with the
    process CPU seconds of each step ("cpu"), and the peak memory in bytes of the timed steps. Gradients are
    computed (and dropped); the parameters never change (the BatchNorm statistics of a backbone trained from
    scratch do, as in any training-mode forward)."""
    model.train()
    criterion.train()
    scaler = mixed_precision.grad_scaler(device, amp)
    samples = nested_tensor_from_tensor_list(images)
    times = {"forward": [], "loss": [], "backward": [], "cpu": []}
    peak = PeakMemory(device)
    for i in range(num_iters):
        if i == warm_iters:
            peak.reset()
        model.zero_grad(set_to_none=True)
        _synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = mixed_precision.forward(model, samples, device, amp)
        _synchronize(device)
        forward_done = time.perf_counter()
        total = weighted_losses(criterion(outputs, targets), criterion.weight_dict)[1]
        _synchronize(device)
        loss_done = time.perf_counter()
        scaler.scale(total).backward()
        _synchronize(device)
        backward_done = time.perf_counter()
        del outputs, total
        if i >= warm_iters:
            times["forward"].append(forward_done - start)
            times["loss"].append(loss_done - forward_done)
            times["backward"].append(backward_done - loss_done)
            times["cpu"].append(time.process_time() - cpu_start)
    model.zero_grad(set_to_none=True)
    return times, peak.read()


def random_batch(sizes, batch_size, boxes, num_classes, device, seed=0):
    """Random images (image i of size sizes[i % len(sizes)]) with `boxes` random boxes each (normalised cxcywh)."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(batch_size):
        images.append(torch.randn(3, *sizes[i % len(sizes)], generator=gen).to(device))
        centres = 0.2 + 0.6 * torch.rand(boxes, 2, generator=gen)
        extents = 0.05 + 0.3 * torch.rand(boxes, 2, generator=gen)
        targets.append({"labels": torch.randint(0, num_classes, (boxes,), generator=gen).to(device),
                        "boxes": torch.cat([centres, extents], 1).to(device)})
    return images, targets


def dataset_batch(split, batch_size, model_args, device):
    """The first batch_size images of a split with their targets (the split's transforms applied once)."""
    dataset = build_dataset(split, model_args)
    if len(dataset) < batch_size:
        raise ValueError(f"--batch_size {batch_size} needs at least that many {split} images; "
                         f"{model_args.coco_path} has {len(dataset)}")
    pairs = [dataset[i] for i in range(batch_size)]
    return ([image.to(device) for image, _ in pairs],
            [{k: v.to(device) for k, v in target.items()} for _, target in pairs])


def _ms(seconds):
    return f"{1000 * statistics.median(seconds):.1f}"


# what a cast or a layout change costs: the copy kernel (aten::to / aten::_to_copy hand their work to it)
COPY_OPERATORS = ("aten::copy_", "aten::to", "aten::_to_copy")


def print_profile(run, iterations, rows, device):
    """Profile `iterations` calls of run() (torch.profiler); print the `rows` operators with the most self CPU
    time per iteration, and the calls and share of the copy operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            run()
        _synchronize(device)
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print(f"profile of {iterations} iterations: {total / 1e3 / iterations:.1f} ms self CPU time per iteration; "
          "top operators by self CPU time:")
    print(f"  {'operator':<58} {'ms/iter':>9} {'share':>6} {'calls/iter':>10}")
    for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"  {event.key[:58]:<58} {event.self_cpu_time_total / 1e3 / iterations:9.1f} "
              f"{100 * event.self_cpu_time_total / total:5.1f}% {event.count / iterations:10.0f}")
    copies = {event.key: event for event in events if event.key in COPY_OPERATORS}
    calls = ", ".join(f"{name} {copies[name].count / iterations:.0f}" for name in COPY_OPERATORS if name in copies)
    share = sum(event.self_cpu_time_total for event in copies.values()) / max(total, 1)
    print(f"casts and copies per iteration: {calls or 'none'} calls; {100 * share:.1f}% of the self CPU time")


def _run_options(args):
    """The command-line options of this tool that define a run (what --compare gives each of its runs)."""
    options = ["--num_iters", str(args.num_iters), "--warm_iters", str(args.warm_iters)]
    if args.train and args.image_size:
        options += ["--boxes", str(args.boxes)]
    for name in ("batch_size", "resume", "config", "threads"):
        if getattr(args, name) is not None:
            options += [f"--{name}", str(getattr(args, name))]
    for height, width in args.image_size or []:
        options += ["--image_size", str(height), str(width)]
    return options + (["--train"] if args.train else [])


def _run_in_process(argv, json_path, label):
    """Run this tool with argv in a fresh Python process; its figures (read from json_path) and stderr lines."""
    Path(json_path).unlink(missing_ok=True)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--json", str(json_path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"the {label} run failed (exit status {done.returncode}): {last}")
    return json.loads(Path(json_path).read_text()), done.stderr.splitlines()


def compare_precisions(args, rest, model_args, run=_run_in_process):
    """Time the run of `args` / `rest` (main.py's flags, parsed and checked: `model_args`) in each precision of
    args.compare, one fresh process per run (the same seed, hence the same weights and inputs), the precisions
    alternated for args.rounds rounds. Prints each run's median, then per precision the median of the rounds'
    medians, the largest peak memory, and both as a ratio of the first precision's. Returns {precision: median
    ms}."""
    precisions = args.compare
    if len(set(precisions)) != len(precisions):
        raise ValueError(f"--compare lists a precision twice: {' '.join(precisions)}")
    if args.rounds <= 0:
        raise ValueError(f"--rounds must be positive, got {args.rounds}")
    if args.profile or args.json:
        raise ValueError("--compare runs several processes: profile (--profile) or write --json one run at a time")
    if model_args.use_fp16 or model_args.amp is not None:
        raise ValueError("--compare sets each run's precision: leave out --amp / --use_fp16")
    what = "training step" if args.train else "inference pass"
    print(f"benchmark: {what} in {', '.join(precisions)}, {args.rounds} rounds, each run a fresh process; "
          f"{mixed_precision.cpu_precision_summary()}", flush=True)
    for amp in precisions:
        mixed_precision.warn_if_slow(torch.device(model_args.device), amp, training=args.train)
    medians = {amp: [] for amp in precisions}
    peaks = {amp: [] for amp in precisions}
    warned = set()
    options = [*_run_options(args), *rest]
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(1, args.rounds + 1):
            for amp in precisions:
                label = f"round {round_index} {amp}"
                figures, stderr = run([*options, "--amp", amp], Path(folder) / "run.json", label)
                for line in stderr:
                    if line.strip() and line not in warned:
                        warned.add(line)
                        print(line, file=sys.stderr)
                medians[amp].append(statistics.median(figures["times_ms"]))
                peaks[amp].append(figures["peak_mib"])
                print(f"{label}: {medians[amp][-1]:.1f} ms (process CPU time "
                      f"{statistics.median(figures['cpu_ms']):.1f} ms), peak memory {figures['peak_mib']:.0f} MiB",
                      flush=True)
    first = precisions[0]
    summary = {amp: statistics.median(medians[amp]) for amp in precisions}
    print(f"{what}, median of each run's timed iterations (ms); peak memory the largest of the rounds (MiB):")
    print(f"  {'':9}" + "".join(f"{f'round {r}':>10}" for r in range(1, args.rounds + 1))
          + f"{'median':>10}{f'x {first}':>9}{'peak':>8}{f'x {first}':>9}")
    for amp in precisions:
        print(f"  {amp:9}" + "".join(f"{ms:10.1f}" for ms in medians[amp])
              + f"{summary[amp]:10.1f}{summary[amp] / summary[first]:9.2f}"
              + f"{max(peaks[amp]):8.0f}{max(peaks[amp]) / max(peaks[first]):9.2f}")
    for amp in precisions[1:]:
        ratios = ", ".join(f"{ms / base:.2f}" for ms, base in zip(medians[amp], medians[first]))
        print(f"{amp} / {first} per round: {ratios}")
    return summary


def _write_json(path, amp, device, times, cpu_times, peak):
    """A run's figures for --json: each timed iteration and its process CPU time (ms), the peak memory (MiB)."""
    figures = {"amp": amp, "device": str(device), "threads": torch.get_num_threads(),
               "times_ms": [1000 * t for t in times], "cpu_ms": [1000 * t for t in cpu_times],
               "peak_mib": peak / 2 ** 20}
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def tool_options(args):
    """args with OPTION_DEFAULTS filled in; an option given without the one that reads it is an error, not
    ignored."""
    readers = {"rounds": ("--compare", args.compare), "profile_rows": ("--profile", args.profile),
               "boxes": ("--train with --image_size (the random images it places boxes on)",
                         args.train and args.image_size)}
    for name, (needed, present) in readers.items():
        value = getattr(args, name)
        if value is not None and not present:
            raise ValueError(f"--{name} needs {needed}: without it nothing reads --{name}")
        setattr(args, name, OPTION_DEFAULTS[name] if value is None else value)
    return args


def check_batch_options(batch_size, boxes, image_sizes, threads):
    """The random batch's options (shared with tools/benchmark_compile.py): a ValueError naming a bad one."""
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    if boxes < 0:
        raise ValueError(f"--boxes must be >= 0, got {boxes}")
    if image_sizes and min(min(size) for size in image_sizes) <= 0:
        raise ValueError(f"--image_size must be positive, got {image_sizes}")
    if threads is not None and threads <= 0:
        raise ValueError(f"--threads must be positive, got {threads}")


def refuse_untimed_flags(model_args, tool):
    """main.py flags whose work `tool` does not time: an error rather than a figure of something else."""
    if model_args.tta:
        raise ValueError(f"--tta: {tool} times one forward pass at one scale, not test-time augmentation (time "
                         "main.py --eval --tta instead)")
    if model_args.compile and tool == "benchmark":
        raise ValueError("--compile: benchmark times the eager model; tools/benchmark_compile.py times compiled "
                         "against eager")


def main(argv=None):
    args, rest = benchmark_args_parser().parse_known_args(argv)
    args = tool_options(args)
    if args.num_iters <= 0 or not 0 <= args.warm_iters < args.num_iters:
        raise ValueError(f"need 0 <= --warm_iters ({args.warm_iters}) < --num_iters ({args.num_iters})")
    batch_size = args.batch_size if args.batch_size is not None else len(args.image_size or [None])
    check_batch_options(batch_size, args.boxes, args.image_size, args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.profile < 0 or args.profile_rows <= 0:
        raise ValueError(f"need --profile >= 0 and --profile_rows > 0, got {args.profile} and {args.profile_rows}")
    model_args = main_arguments(get_args_parser(), rest, args.config)
    check_args(model_args)
    check_device(model_args)
    refuse_untimed_flags(model_args, "benchmark")
    if args.compare:
        return compare_precisions(args, rest, model_args)
    device = torch.device(model_args.device)
    amp = mixed_precision.amp_mode(model_args)
    print(f"benchmark: {'training step' if args.train else 'inference'} in {amp} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; {mixed_precision.cpu_precision_summary()}", flush=True)
    mixed_precision.warn_if_slow(device, amp, training=args.train)

    model_args.eval = not args.train  # the class count comes from the annotation file of that split
    model_args.eval_in_training_set = False
    if args.image_size is None:
        model_args.num_classes = num_classes_of(model_args)
        if args.train:
            images, targets = dataset_batch("train", batch_size, model_args, device)
        else:
            images = [build_dataset("val", model_args)[0][0].to(device)] * batch_size
    else:
        num_classes = model_args.num_classes or 91
        images, targets = random_batch(args.image_size, batch_size, args.boxes, num_classes, device)
    torch.manual_seed(model_args.seed)  # the same random weights in every run (of --compare too)
    model, criterion, _ = build_model(model_args)
    if args.resume:
        load_model_state(model, evaluation_weights(load_checkpoint(args.resume))[0], args.resume, model_args)
    model.to(device)
    shapes = ", ".join(sorted({"x".join(map(str, image.shape[1:])) for image in images}))
    where = f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")

    if args.train:
        criterion.to(device)
        times, peak = measure_training(model, criterion, images, targets, device, args.num_iters, args.warm_iters,
                                       amp)
        steps = [f + lo + b for f, lo, b in zip(times["forward"], times["loss"], times["backward"])]
        print(f"training step, batch {batch_size} ({shapes}) on {where}, {amp}, median of {len(steps)} timed steps: "
              f"forward {_ms(times['forward'])} ms, loss {_ms(times['loss'])} ms, backward "
              f"{_ms(times['backward'])} ms, step {_ms(steps)} ms (process CPU time {_ms(times['cpu'])} ms); "
              f"peak memory {peak / 2 ** 20:.0f} MiB")
        if args.json:
            _write_json(args.json, amp, device, steps, times["cpu"], peak)
        if args.profile:
            print_profile(lambda: measure_training(model, criterion, images, targets, device, 1, 0, amp),
                          args.profile, args.profile_rows, device)
        return statistics.median(steps)

    inputs = nested_tensor_from_tensor_list(images)
    peak = PeakMemory(device)
    peak.reset()
    cpu_times = []
    times = measure(model, inputs, device, args.num_iters, args.warm_iters, amp, cpu_times)
    peak_bytes = peak.read()
    mean = statistics.fmean(times)
    print(f"input {batch_size} x {tuple(images[0].shape)} on {where}, {amp}, {len(times)} timed passes: "
          f"{1000 * mean:.1f} ms per pass (median {1000 * statistics.median(times):.1f} ms, process CPU time "
          f"{_ms(cpu_times)} ms); peak memory {peak_bytes / 2 ** 20:.0f} MiB")
    if args.json:
        _write_json(args.json, amp, device, times, cpu_times, peak_bytes)
    fps = batch_size / mean
    print(f"Inference Speed: {fps:.1f} FPS")
    if args.profile:
        print_profile(lambda: measure(model, inputs, device, 1, 0, amp), args.profile, args.profile_rows, device)
    return fps


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        sys.exit(f"benchmark: {err}")
