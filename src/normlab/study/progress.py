"""A dependency-free progress bar with an ETA, written to stderr.

On a terminal the bar redraws itself in place; otherwise (a log file, a CI job) one line is printed per
finished run. The ETA weighs runs by their number of training steps (a batch of 2 takes 16x the steps of
a batch of 32) and converts steps to seconds with the rate measured on the runs finished so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

OVERHEAD_STEPS = 50  # per-run cost outside the training steps (building, evaluating), in steps


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    def __init__(self, total_runs: int, total_steps: int, workers: int, stream: TextIO | None = None):
        self.total_runs = total_runs
        self.remaining_steps = total_steps + OVERHEAD_STEPS * total_runs
        self.workers = max(1, workers)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.done = 0
        self.measured_steps = 0
        self.measured_seconds = 0.0
        self.last = ""
        self.closed = False

    def finished(self, steps: int, seconds: float, note: str) -> None:
        """One run finished after ``steps`` steps and ``seconds`` of its worker's time."""
        self.done += 1
        self.remaining_steps -= steps + OVERHEAD_STEPS
        self.measured_steps += steps + OVERHEAD_STEPS
        self.measured_seconds += seconds
        self.last = note
        self.draw(newline=not self.tty)

    def failed(self, steps: int, note: str) -> None:
        self.done += 1
        self.remaining_steps -= steps + OVERHEAD_STEPS
        self.last = note
        self.draw(newline=not self.tty)

    def eta(self) -> float | None:
        if not self.measured_steps:
            return None
        rate = self.measured_seconds / self.measured_steps  # seconds per step, for one worker
        return rate * max(self.remaining_steps, 0) / self.workers

    def line(self) -> str:
        width = 24
        frac = self.done / self.total_runs if self.total_runs else 1.0
        bar = "#" * int(round(width * frac))
        eta = self.eta()
        parts = [
            f"study [{bar:.<{width}}] {self.done}/{self.total_runs} runs",
            f"elapsed {format_seconds(time.monotonic() - self.start)}",
            "ETA " + (format_seconds(eta) if eta is not None and self.done < self.total_runs else "--"),
        ]
        if self.last:
            parts.append(self.last)
        return " | ".join(parts)

    def draw(self, newline: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            if newline:
                self.stream.write("\n")
        elif newline:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal (once)."""
        if self.tty and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True
