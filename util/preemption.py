"""Preemption: Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (what SLURM sends a job before it kills it) ask the training
run to save and stop after the current iteration; a second Ctrl-C before that save begins stops at once."""
import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .misc import is_dist_avail_and_initialized, is_main_process

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


class Preempted(BaseException):
    """The run stopped on a signal; the message says what was saved and how to resume. A BaseException, as
    KeyboardInterrupt: no `except Exception` on the way up swallows a stop."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def _notify(text):
    """One line on stderr from a signal handler: os.write, as print() may be mid-write on the same stream."""
    try:
        os.write(sys.stderr.fileno(), (text + "\n").encode())
    except (OSError, ValueError, AttributeError):
        pass


class Preemption:
    """Remembers a stop signal received while `handling()`; `requested()` tells every process whether any got one.

    Once requested() has said yes the run is saving and stopping: further signals are only remembered, so a
    second Ctrl-C cannot cut that save short. A second Ctrl-C before it stops the run at once (Preempted, nothing
    saved; checkpoint saves are atomic, an interrupted one leaves the previous file).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.signum = 0
        self.stopping = False
        self._owner = None  # the pid of the process whose handlers these are (not its forked DataLoader workers)

    def _handler(self, signum, frame):
        if os.getpid() != self._owner:
            return  # a DataLoader worker forked inside the block: the main process stops it
        if signum == signal.SIGINT and self.signum == signal.SIGINT and not self.stopping:
            raise Preempted("received SIGINT twice: stopped at once, nothing saved (the last checkpoint saved, if "
                            "any, is unchanged: resume with --auto_resume)", signum)
        first = not self.signum
        self.signum = self.signum or signum
        if first and is_main_process():
            again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
            _notify(f"received {signal.Signals(signum).name}: saving a checkpoint after this iteration, then "
                    f"stopping{again}")

    @contextmanager
    def handling(self):
        """Catch the stop signals in the block (only the main thread can), the previous handlers restored after."""
        previous = {}
        self._owner = os.getpid()
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
            reduced = self.signum
        else:
            flag = torch.tensor([self.signum], dtype=torch.int64,
                                device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reduced = int(flag.item())
            # a signal that came during the collective is kept for the next call, not overwritten by the 0 reduced
            self.signum = self.signum or reduced
        self.stopping = self.stopping or reduced != 0
        return reduced != 0

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""
