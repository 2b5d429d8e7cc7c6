"""A run's lifecycle, owned in one place: the `running` record, the logger, training, the
status its end gives (completed, pruned, failed, interrupted), `train_seconds`, the last
results.json, `last.pt` dropped or kept, the logger finished, the run closed.

`mtbert.run` (one Hydra job), `mtbert.tune` (one trial) and the tests run a job through it;
what differs between them is a parameter: what happens after a failure (`on_failure`), the
stops a caller records (`stops`), whether `last.pt` always goes (`always_drop_last`).

Importing this module loads torch (through the trainer): `mtbert.run` imports it once the
config is checked."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from hydra.utils import instantiate
from omegaconf import DictConfig

from mtbert.errors import USER_ERRORS
from mtbert.guards import Interrupted
from mtbert.logger import NoLogger
from mtbert.rundir import ReadOnlyRunDir, RunDir, results_record
from mtbert.trainer import train

# on_failure(error, results): runs where the error was caught, after `results` has its status
# and error and before they are written. True: the job ends normally (a sweep goes on); False:
# the error goes on; or it raises its own (sys.exit with a message, another exception)
OnFailure = Callable[[BaseException, dict], bool]


class Lifecycle:
    """One run of `cfg` in the run directory `path`:

        with Lifecycle(cfg, path) as job:   # the clock starts; whatever ends the block is recorded
            ...                             # setup: a failure here is recorded too
            job.open()                      # the run directory and the logger; `running`
            job.train()                     # the logger started, then mtbert.trainer.train
        job.results                         # results.json as written

    `previous`: the record of the run a resume continues. It is kept (no `running` record
    over it; an interruption adds to it; a refused resume leaves it as it was, still
    resumable). `stops`: exceptions that end the run `interrupted` with the given error
    (run.py: submitit's requeue, Ctrl-C), re-raised. `label_interrupts`: an interruption's
    error starts `Interrupted: ` as other errors start with their type (mtbert.tune)."""

    def __init__(self, cfg: DictConfig, path: str | os.PathLike, *, experiment: str | None = None,
                 process: dict | None = None, previous: dict | None = None, always_drop_last: bool = False,
                 label_interrupts: bool = False, stops: dict[type[BaseException], str] | None = None,
                 on_failure: OnFailure | None = None):
        self.cfg, self.path, self.previous = cfg, Path(path), previous
        self.always_drop_last, self.label_interrupts = always_drop_last, label_interrupts
        self.stops, self.on_failure = stops or {}, on_failure
        self.results = results_record(experiment=experiment, seed=cfg.seed, process=process)
        self.run, self.logger, self.pruned, self.start = None, NoLogger(), False, None

    def __enter__(self) -> Lifecycle:
        self.start = time.perf_counter()
        return self

    def open(self, writes: bool = True):
        """The run directory: rank 0 (`writes`) records `running` (a killed run says so) and
        sends every event to the configured logger too; other ranks only read it."""
        if not writes:
            self.run = ReadOnlyRunDir(self.path)
            return
        self.run = RunDir(self.path)
        if self.previous is None:
            self.run.write_results({**self.results, "status": "running"})
        self.logger = instantiate(self.cfg.logger)
        self.run.sinks.append(self.logger)

    def train(self, job=None, on_eval: Callable[[int, dict], bool] | None = None, reads=None):
        """Start the logger (`job`: a mtbert.logger.RunIdentity) and train; an `on_eval` that stops
        the run (a pruner) makes it `pruned`; `reads`: the run's tasks and files (a
        mtbert.checks.Reads), where the caller has decided them."""
        def report(step: int, metrics: dict) -> bool:
            self.pruned = on_eval(step, metrics)
            return self.pruned

        self.logger.start(self.cfg, self.run.path, job)
        self.results.update(train(self.cfg, self.run, on_eval=report if on_eval else None, reads=reads),
                            status="pruned" if self.pruned else "completed")

    def __exit__(self, kind, error: BaseException | None, traceback) -> bool:
        try:
            return error is not None and self.record(error)
        finally:
            self.close()

    def record(self, error: BaseException) -> bool:
        """The status and error that `error` gives the run; then the caller's `on_failure`
        (for an interruption or an Exception), which decides whether the error goes on."""
        results = self.results
        stop = next((message for stop, message in self.stops.items() if isinstance(error, stop)), None)
        if isinstance(error, Interrupted):
            message = f"Interrupted: {error}" if self.label_interrupts else str(error)
            results.update(self.previous or {}, **error.results, status="interrupted", error=message)
        elif stop is not None:
            results.update(status="interrupted", error=stop)
            return False
        elif isinstance(error, USER_ERRORS) and self.previous is not None:
            # a refused resume leaves the run as it was: still resumable, not failed
            results.update(self.previous, error=f"resume refused: {type(error).__name__}: {error}")
        elif isinstance(error, Exception):
            results["error"] = f"{type(error).__name__}: {error}"
        else:  # another BaseException: recorded `failed` as it stands, and it goes on
            return False
        return bool(self.on_failure and self.on_failure(error, results))

    def close(self):
        """The last results.json, `last.pt` dropped (always, or once completed with
        `trainer.keep_last=false`), the logger finished, the run closed. A job that failed
        before it opened its run records in it all the same, from rank 0 (or a lone process)."""
        if self.run is None and os.environ.get("RANK", "0") == "0":
            self.run = RunDir(self.path)
        if self.run is None:
            return
        if not self.results["train_seconds"]:
            self.results["train_seconds"] = time.perf_counter() - self.start
        self.run.write_results(self.results)
        completed = self.results["status"] == "completed"
        if self.always_drop_last or (completed and not self.cfg.trainer.get("keep_last", True)):
            self.run.drop_checkpoint("last")
        self.logger.finish(self.results)
        self.run.close()


def run_job(cfg: DictConfig, path: str | os.PathLike, job=None, on_eval=None, **options) -> dict:
    """A whole job with nothing between its steps (a trial, a test): open the run, train,
    record; its results. The run is opened before the clock starts, so a run directory or a
    logger that cannot be made raises as it is (the record says `running`). `options`: the
    Lifecycle's."""
    lifecycle = Lifecycle(cfg, path, **options)
    lifecycle.open()
    with lifecycle:
        lifecycle.train(job, on_eval)
    return lifecycle.results
