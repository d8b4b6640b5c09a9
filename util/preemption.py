"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends a job before it kills it) ask the training run to save and stop
after the current iteration."""
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .misc import is_dist_avail_and_initialized

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a signal after saving; the message says where and how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class Preemption:
    """Remembers a stop signal received while `handling()`; `requested()` tells every process whether any got one."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.signum = 0

    def _handler(self, signum, frame):
        self.signum = signum

    @contextmanager
    def handling(self):
        """Catch the stop signals in the block (only the main thread can), the previous handlers restored after."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    previous[number] = signal.signal(number, self._handler)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def requested(self):
        """True when this or any other process received a stop signal (a collective in a distributed run: every
        process gets the same answer, so all stop after the same iteration)."""
        if not is_dist_avail_and_initialized():
            return self.signum != 0
        flag = torch.tensor([self.signum], dtype=torch.int64,
                            device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reduced = int(flag.item())
        # a signal that came during the collective is kept for the next call, not overwritten by the 0 reduced
        self.signum = self.signum or reduced
        return reduced != 0

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""
