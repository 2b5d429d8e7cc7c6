"""The loop's pacing and running averages: when to log and save, the run's clock, the
task losses between two log lines."""

from __future__ import annotations

import time

import torch


class Every:
    """Due once every `seconds` of the clock (drqv2's `Every`): when to log, when to save.
    Whether it is due and when it starts again are separate, so that several processes
    can agree on one decision before acting on it."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.seconds

    def restart(self):
        self.last = time.perf_counter()


class LossMeter:
    """Each task's running loss, summed on the device; read (a host sync) when logged."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.sums = {t: torch.zeros((), device=device) for t in tasks}
        self.counts = dict.fromkeys(tasks, 0)

    def add(self, losses: dict[str, torch.Tensor]):
        for t, loss in losses.items():
            self.sums[t] += loss
            self.counts[t] += 1

    def read(self) -> dict[str, float]:
        """The means since the last read, of the tasks that had steps; then starts afresh."""
        means = {t: (self.sums[t] / n).item() for t, n in self.counts.items() if n}
        for t in self.sums:
            self.sums[t].zero_()
            self.counts[t] = 0
        return means


class Clock:
    """The run's training seconds, counting those before a resume, and this process's pace."""

    def __init__(self, before: float, step: int):
        self.before, self.start, self.first_step = before, time.perf_counter(), step

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def step_seconds(self, step: int) -> float:
        return (time.perf_counter() - self.start) / max(step - self.first_step, 1)


class Progress:
    """A log line at most every `seconds` through long work (an evaluation, predictions),
    with an ETA from the share of its tokens done, so no stretch of a run is silent."""

    def __init__(self, what: str, total: float, unit_total: int, seconds: float | None, log=None):
        self.what, self.total, self.unit_total, self.seconds = what, max(total, 1), unit_total, seconds
        self.log, self.start = log, time.perf_counter()
        self.last, self.done, self.units = self.start, 0.0, 0

    def advance(self, amount: float, units: int):
        self.done += amount
        self.units += units
        now = time.perf_counter()
        if self.seconds is None or self.log is None or now - self.last < self.seconds or self.units >= self.unit_total:
            return
        self.last = now
        elapsed = now - self.start
        self.log.info("%s: %d/%d examples | elapsed %s | ETA %s", self.what, self.units, self.unit_total,
                      duration(elapsed), duration(elapsed * (self.total - self.done) / max(self.done, 1e-9)))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
