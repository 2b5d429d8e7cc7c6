"""What stops a run: signals (pre-emption, Ctrl-C) and non-finite losses."""

from __future__ import annotations

import logging
import signal
import threading

import torch

from mtbert import distributed

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """The run stopped by a signal (after saving `checkpoints/last.pt`, once training has
    begun); `results` holds what it had reached. Like KeyboardInterrupt, not an Exception:
    a stop request raised inside a step that recovers from failures (`except Exception`:
    a damaged checkpoint moved aside, a broken cache rebuilt) is neither swallowed nor
    taken for damage. Catch it by name."""

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results or {}


class NonFiniteLoss(FloatingPointError):
    pass


NEVER = 2**62  # no non-finite loss yet: above any step, so the earliest over ranks is their minimum


class NonFiniteWatch:
    """Notes on the device, with no host sync, each task's first step with a non-finite
    loss; `check()`, called where the loop syncs anyway (logging, evaluation, saving),
    raises for the earliest. Between a bad step and the check the run trains on, but no
    evaluation or checkpoint is made from its weights."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.first = {t: torch.full((), NEVER, device=device) for t in tasks}

    def note(self, step: int, losses: dict[str, torch.Tensor]):
        for t, loss in losses.items():
            first = self.first[t]
            self.first[t] = torch.where((first == NEVER) & ~loss.isfinite(), step, first)

    def check(self):
        """Raises alike on every rank (the earliest bad step of any rank): a rank that
        stopped alone would leave the others waiting in a collective."""
        steps = dict(zip(self.first, distributed.least(torch.stack(list(self.first.values())).cpu()).tolist()))
        bad = {t: step for t, step in steps.items() if step != NEVER}
        if bad:
            step = min(bad.values())
            raise NonFiniteLoss(f"non-finite loss for task(s) {[t for t in bad if bad[t] == step]} at step "
                                f"{step}; lower the learning rates, or set trainer.on_nonfinite=skip")


def nonfinite_tasks(losses: dict[str, torch.Tensor]) -> list[str] | None:
    """For `trainer.on_nonfinite=skip`: the tasks whose loss is not finite, decided alike on
    every rank (all skip, or none); None when the step may go on. One host sync."""
    finite = torch.stack([loss.detach() for loss in losses.values()]).isfinite()
    if not distributed.any_(not bool(finite.all())):
        return None
    return [t for t, ok in zip(losses, finite.tolist()) if not ok] or ["another rank's batch"]


class StopSignals:
    """SIGTERM (SLURM pre-emption) and SIGINT (Ctrl-C), while in this context, stop the
    loop after the current step, which then saves `last.pt`; a second Ctrl-C stops at
    once. Under submitit, its requeue signal (USR2) is taken the same way, and submitit's
    own handler (which requeues the job and exits) runs in `after_save`, once `last.pt`
    is saved: nothing is trained twice."""

    def __init__(self):
        self.received = None  # the signal's name, once one came
        self.requeue = False  # submitit asked for a requeue
        self.previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows no other
            signals = [signal.SIGTERM, signal.SIGINT]
            if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's requeue handler
                signals.append(signal.SIGUSR2)
            self.previous = {sig: signal.signal(sig, self.handle) for sig in signals}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.requeue |= signum == signal.SIGUSR2
        log.warning("%s received: stopping after this step and saving checkpoints/last.pt", self.received)

    def after_save(self):
        if self.requeue and callable(self.previous.get(signal.SIGUSR2)):
            self.previous[signal.SIGUSR2](signal.SIGUSR2, None)
