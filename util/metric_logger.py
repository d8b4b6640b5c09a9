"""Smoothed metrics and a progress log with ETA, iterations per second and memory."""
import datetime
import resource
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from .misc import is_dist_avail_and_initialized


class SmoothedValue:
    """A series of values: median/avg over a recent window, and the global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


def _memory_mb():
    """Peak memory of this process in MB: CUDA allocations when on GPU, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__} has no attribute {attr!r}")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header="", total=None, summary=None):
        """Yield from iterable, printing one progress line every print_freq iterations and at the end: the header,
        [i/total] (iterable may start later than 0, e.g. range(start, total) in a resumed epoch), the ETA,
        summary(self) (default: every meter), seconds per iteration and the peak memory."""
        items = list(iterable) if total is not None and not hasattr(iterable, "__len__") else iterable
        total = len(items) if total is None else total
        digits = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        done = 0
        for i, obj in enumerate(items):
            position = obj if isinstance(items, range) else i
            yield obj
            iter_time.update(time.time() - end)
            done += 1
            if position % print_freq == 0 or position == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - position - 1)))
                text = summary(self) if summary is not None else str(self)
                print(self.delimiter.join([
                    f"{header} [{position:{digits}d}/{total}]", f"eta {eta}", text,
                    f"{iter_time.avg:.2f} s/it", f"mem {_memory_mb():.0f} MB"]), flush=True)
            end = time.time()
        total_time = time.time() - start
        print(f"{header}: {done} iterations in {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(done, 1):.4f} s / it)", flush=True)

    def state(self):
        """Every meter's total, count and recent window (what a resumed epoch needs to go on averaging)."""
        return {name: {"total": meter.total, "count": meter.count, "window": list(meter.deque)}
                for name, meter in self.meters.items()}

    def load_state(self, state):
        for name, saved in state.items():
            meter = self.meters[name]
            meter.total, meter.count = saved["total"], saved["count"]
            meter.deque.clear()
            meter.deque.extend(saved["window"])
