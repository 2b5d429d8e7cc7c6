"""One Hydra job: train, and write results.json whatever happens (completed, failed,
interrupted), so a sweep never loses track of a job.

Importing this module is light (Hydra and OmegaConf): torch, transformers and W&B load in
`main` once the config's keys are known to be declared (`mtbert.schema`), so `--help` and a
mistyped key answer in about a second instead of after seconds of imports."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtbert.schema import UnknownKeyError, check_keys

log = logging.getLogger(__name__)


def refuse(e: Exception) -> NoReturn:
    """A user's mistake ends the run with its message alone: a traceback would bury it."""
    sys.exit(f"error: {type(e).__name__}: {e}")


def resumed_config(cfg: DictConfig, hydra) -> tuple[DictConfig, str | None]:
    """With `resume=RUN_DIR`, the run's own config and experiment name: a resumed run
    continues exactly the run it was, so other overrides are refused."""
    from mtbert.compat import current_terms
    from mtbert.errors import ConfigError

    run_dir = Path(cfg.resume)
    original = run_dir / ".hydra" / "config.yaml"
    if not original.is_file():
        raise ConfigError(f"resume={run_dir}: {original} not found; give the directory "
                          "of an mtbert run (it holds .hydra/ and checkpoints/)")
    extra = [o for o in hydra.overrides.task if not o.startswith(("resume=", "data.root="))]
    if extra:
        raise ConfigError(f"resume continues {run_dir} with its own config ({original}); "
                          f"drop the other overrides {extra} (data.root= alone may point at the run's "
                          "data in another folder)")
    saved = current_terms(OmegaConf.load(original))
    saved.resume = cfg.resume
    if any(o.startswith("data.root=") for o in hydra.overrides.task):
        saved.data.root = cfg.data.root
    choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
    return saved, choices.get("experiment")


def stop_outside_training(signum, frame):
    """SIGTERM before the loop has begun (or after it ended): stop at once, with a record.
    Inside the loop the trainer's own handler stops after the current step and saves."""
    from mtbert.guards import Interrupted  # loaded: main installs this handler once it has imported it

    raise Interrupted(f"stopped by {signal.Signals(signum).name} outside the training loop "
                      "(during setup or the last writes)")


def check_not_running(previous: dict, output_dir: str):
    """A run whose results.json says `running`: refused while its process lives (two
    processes would train one run), else continued, saying that the earlier one died."""
    from mtbert.rundir import process_alive

    process = previous.get("process") or {}
    if process_alive(process):
        sys.exit(f"error: {output_dir} is being trained now by process {process['pid']} on this host "
                 "(its results.json says running): wait for it to end, or stop it first")
    last = Path(output_dir) / "checkpoints" / "last.pt"
    log.warning("%s says running, but its process (%s) is gone: it was killed without a record; %s",
                output_dir, f"pid {process['pid']} on {process['host']}" if process else "not recorded",
                "continuing from its last checkpoint" if last.exists() else "training it from the start")


def earlier_record(output_dir: str) -> dict | None:
    """The run directory's results.json, if an earlier process wrote one; a `running` one
    passes `check_not_running` first."""
    path = Path(output_dir) / "results.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous and previous["status"] == "running":
        check_not_running(previous, output_dir)
    return previous


def quiet_rank():
    """Ranks other than 0 log warnings only, and never into rank 0's train.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


# stops that end a job `interrupted` besides mtbert.guards.Interrupted; both go on once recorded
STOPS = {SystemExit: "requeued by submitit; it resumes from checkpoints/last.pt",  # after last.pt was saved
         KeyboardInterrupt: "interrupted (SIGINT) without a checkpoint"}


def main(cfg: DictConfig) -> dict:
    hydra = HydraConfig.get()
    held = []  # a SIGTERM while the heavy modules import: held until the run can record it
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:  # a mistyped key is the command's, in every job of a sweep: it stops the sweep too
        check_keys(cfg, hydra.overrides.task)
    except UnknownKeyError as e:
        sys.exit(f"error: {e}")
    from mtbert import distributed  # the heavy part (torch, transformers, W&B): the config is valid
    from mtbert.errors import ConfigError
    from mtbert.evaluate import format_table
    from mtbert.job import Lifecycle
    from mtbert.rundir import this_process

    experiment = hydra.runtime.choices.get("experiment")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_outside_training)
    output_dir = hydra.runtime.output_dir
    previous = earlier_record(output_dir)
    if previous and previous["status"] == "completed" and not cfg.resume:  # a sweep run again resumes what is left
        log.info("%s completed earlier (its results.json); nothing to train. Delete that file to "
                 "train it again", output_dir)
        print(format_table(previous["dev"]))
        return previous
    previous = previous if cfg.resume else None  # a resumed run keeps its record; another starts one
    if cfg.resume:
        try:
            cfg, experiment = resumed_config(cfg, hydra)
        except ConfigError as e:
            refuse(e)
    with Lifecycle(cfg, output_dir, experiment=experiment, process=this_process(), previous=previous,
                   stops=STOPS, on_failure=lambda e, results: failed(e, hydra, output_dir)) as job:
        if held:
            stop_outside_training(held[0], None)
        train_rank(job, hydra, output_dir)
    if distributed.rank() == 0:
        print(format_table(job.results["dev"]))
        print(f"run directory: {Path(output_dir).resolve()}")
    return job.results


def train_rank(job, hydra, output_dir: str):
    """This process's part of the job: join the ranks, decide the tasks and files it reads
    (checked here, and handed on to the run's Setup), open the run (rank 0 writes it; the
    others read it and log warnings only), train."""
    from mtbert import distributed
    from mtbert.checks import run_reads
    from mtbert.device import resolve_device
    from mtbert.logger import RunIdentity

    distributed.adopt_submitit_tasks()
    rank, _ = distributed.setup(resolve_device(job.cfg.trainer.device))
    if distributed.broadcast_object(output_dir) != output_dir:
        raise ValueError(f"rank {rank} got another run directory than rank 0 ({output_dir}); "
                         "with torchrun pass hydra.run.dir=... so that all ranks share one")
    reads = run_reads(job.cfg)  # a missing data file is reported before W&B and the model load
    job.open(writes=rank == 0)
    if rank != 0:
        quiet_rank()
    job.train(RunIdentity.from_hydra(hydra), reads=reads)


def failed(e: BaseException, hydra, output_dir: str) -> bool:
    """After a failure is recorded: an interruption ends the process (`interrupted: ...`);
    in a sweep, a failed job is logged and the sweep goes on; a single run ends with the
    user's mistake in one line (`error: ...`), or with any other error's traceback."""
    from mtbert.errors import USER_ERRORS
    from mtbert.guards import Interrupted

    if isinstance(e, Interrupted):
        sys.exit(f"interrupted: {e}")
    if hydra.mode != RunMode.MULTIRUN:
        if isinstance(e, USER_ERRORS):
            refuse(e)
        return False
    log.exception("job failed; the sweep goes on (see %s/results.json)", output_dir, exc_info=e)
    return True
