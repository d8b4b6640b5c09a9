"""A progress bar for a loop over a known number of items: one line redrawn on a terminal, else (a log file, a pipe)
a line at every tenth of the way."""
import sys
import time

WIDTH = 30  # characters of the bar


class Progress:
    """Call ``step(note)`` after each of ``total`` items and ``close()`` at the end; ``note`` (e.g. a rate) is shown
    after the count."""

    def __init__(self, total, label, stream=None):
        self.total, self.label = int(total), label
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_tenth = 0

    def line(self, note=""):
        """The bar, the count, the elapsed seconds and ``note``."""
        filled = WIDTH * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        text = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} {self.label} {elapsed:.0f} s"
        return text + (f", {note}" if note else "")

    def step(self, note=""):
        self.done += 1
        if self.terminal:
            print("\r" + self.line(note), end="", file=self.stream, flush=True)
            return
        tenth = 10 * self.done // max(self.total, 1)
        if tenth > self._last_tenth or self.done == self.total:
            self._last_tenth = tenth
            print(self.line(note), file=self.stream, flush=True)

    def close(self):
        if self.terminal and self.done:
            print(file=self.stream, flush=True)
