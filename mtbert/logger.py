"""Experiment loggers (config group `logger`): sinks of the run directory's events.

metrics.jsonl and results.json are the record of a run whatever the logger; a logger only
mirrors them elsewhere. `logger=wandb` makes one W&B run per Hydra job, grouped by sweep,
and never lets the network stop or stall training: without an API key it logs offline
(`wandb sync` uploads later), and an online start that cannot reach the server falls
back to offline. A resumed or requeued job continues its W&B run: the run directory
keeps the W&B run id in `wandb_run_id`.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import wandb
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from wandb.sdk import wandb_setup
from wandb.sdk.lib import wbauth

log = logging.getLogger(__name__)

LOCAL_MODES = ("offline", "dryrun", "disabled")


class NoLogger:
    """logger=none: the run directory is the only record."""

    def start(self, cfg: DictConfig, run_dir: Path, job=None):
        pass

    def event(self, record: dict):
        pass

    def finish(self, results: dict):
        pass


def flatten(value, prefix: str = "") -> dict:
    """{"loss": {"sst": 1.0}} under "train" -> {"train/loss/sst": 1.0}: W&B's panel sections
    follow the slashes, and each metrics.jsonl field keeps its path."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    return {k: v for key, item in items
            for k, v in flatten(item, f"{prefix}/{key}" if prefix else str(key)).items()}


def api_key_configured() -> bool:
    """Whether wandb.init would find credentials (WANDB_API_KEY, netrc, settings), asked the
    way wandb asks itself but without its interactive prompt or any network call."""
    settings = wandb_setup.singleton().settings
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        return wbauth.authenticate_session(host=host, source="mtbert", prompt=False,
                                           update_session=False) is not None
    except wandb.errors.AuthenticationError as e:
        log.warning("W&B credentials unusable (%s)", e)
        return False


def resolve_mode(requested: str | None) -> str:
    """logger.mode, else W&B's own setting (WANDB_MODE, `wandb offline`, default online);
    online needs an API key, and without one wandb.init would prompt: offline instead."""
    mode = requested or wandb_setup.singleton().settings.mode
    if mode not in LOCAL_MODES and not api_key_configured():
        log.info("W&B: no API key configured (WANDB_API_KEY or `wandb login`): logging offline")
        return "offline"
    return mode


@dataclass
class RunIdentity:
    """What a W&B run is named and grouped by; `run.py` makes it from Hydra's record."""
    choices: dict[str, str] = field(default_factory=dict)  # each group's option, for W&B filters
    name: str = ""  # the job's overrides (Hydra's override_dirname); else the run directory's name
    sweep: str | None = None  # a multirun's sweep directory: its jobs' W&B group

    @classmethod
    def from_hydra(cls, hydra) -> RunIdentity:
        sweep = None
        if hydra.mode == RunMode.MULTIRUN:  # as configured, e.g. multirun/2025-01-31/12-00-00
            path, cwd = Path(hydra.sweep.dir), Path(hydra.runtime.cwd)
            sweep = str(path.relative_to(cwd) if path.is_relative_to(cwd) else path)
        return cls({k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")},
                   hydra.job.override_dirname, sweep)


class WandbLogger:
    """One W&B run per job: config, every event, results, plots and (optionally) checkpoints."""

    def __init__(self, project: str, entity: str | None = None, tags=(), group: str | None = None,
                 mode: str | None = None, log_checkpoints: bool = False, init_timeout: float = 10,
                 quiet: bool = True):
        self.project, self.entity, self.tags, self.group = project, entity, list(tags), group
        self.mode, self.log_checkpoints, self.init_timeout = mode, log_checkpoints, init_timeout
        self.quiet = quiet
        self.run = None

    def start(self, cfg: DictConfig, run_dir: Path, job: RunIdentity | None = None):
        job = job or RunIdentity()
        self.run_dir = Path(run_dir)
        config = {**OmegaConf.to_container(cfg, resolve=True), "choices": job.choices}
        init = dict(project=self.project, entity=self.entity, tags=self.tags,
                    group=self.group or job.sweep, job_type="train",
                    name=job.name or self.run_dir.name, config=config,
                    # WANDB_DIR, where set, is the user's choice; else the run keeps its W&B files
                    dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
                    reinit="finish_previous", id=self.run_id(), resume="allow")
        mode = resolve_mode(self.mode)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(
                init_timeout=self.init_timeout, quiet=self.quiet), **init)
        except wandb.Error as e:
            if mode in LOCAL_MODES:
                raise
            log.warning("W&B could not start online (%s): logging offline instead; upload "
                        "later with `wandb sync`", str(e).splitlines()[0])
            wandb.teardown()  # the failed start still holds the run id in wandb's service
            self.run = wandb.init(mode="offline", settings=wandb.Settings(quiet=self.quiet), **init)
        for split in ("validation", "dev"):  # the split that chooses the checkpoint: its best
            self.run.define_metric(f"eval/{split}/*", summary="max")

    def run_id(self) -> str:
        """The job's W&B run id, made at its first start and read back when it resumes."""
        path = self.run_dir / "wandb_run_id"
        if not path.is_file():
            path.write_text(secrets.token_hex(6) + "\n")  # W&B ids: letters and digits
        return path.read_text().strip()

    def event(self, record: dict):
        """Numbers only, at the optimizer step: metrics that are null (not evaluated) are
        left out rather than drawn as zero."""
        fields = {k: v for k, v in record.items() if k not in ("step", "event")}
        numbers = {k: v for k, v in flatten(fields, record["event"]).items()
                   if isinstance(v, (int, float))}
        self.run.log(numbers, step=record["step"])

    def finish(self, results: dict):
        """Results (table and summary), the run's plots and checkpoint; a run that did not
        complete ends with a non-zero exit code, so W&B marks it failed."""
        if self.run is None:
            return
        try:
            row = flatten(results)
            final = {"results_table": wandb.Table(columns=list(row), data=[list(row.values())])}
            final |= {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(self.run_dir.glob("*.png"))}
            self.run.log(final)
            self.run.summary["results"] = results
            best = self.run_dir / "checkpoints" / "best.safetensors"
            if self.log_checkpoints and best.exists():
                artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                          metadata={"dev": results.get("dev"), "seed": results.get("seed")})
                artifact.add_file(str(best))
                self.run.log_artifact(artifact, aliases=["best"])
        except Exception:
            log.exception("W&B: could not log the final results (results.json has them)")
        finally:
            self.run.finish(exit_code=0 if results.get("status") == "completed" else 1)
            self.run = None
