"""What a config must agree with, checked before anything heavy loads: the loop's own
settings, the methods against the sampler, the pair encodings against the losses, and the
files a run will read. Each failure names the keys and the way out."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from mtbert.config import check_task_names, declared_tasks, evaluated_tasks
from mtbert.data import DATA_HELP, Task, read_text
from mtbert.errors import ConfigError, DataError


def check_trainer(tcfg: DictConfig):
    """The loop's own settings, checked before anything loads."""
    if tcfg.on_nonfinite not in ("error", "skip"):
        raise ConfigError(f"trainer.on_nonfinite must be 'error' or 'skip', got {tcfg.on_nonfinite!r}")
    if tcfg.eval_every_steps is not None and tcfg.eval_every_examples is not None:
        raise ConfigError("trainer.eval_every_steps and trainer.eval_every_examples both set: keep one, "
                          "set the other to null")
    required = ("evals_per_epoch", "epochs", "accumulate")
    for key in (*required, "eval_every_steps", "eval_every_examples", "max_steps", "max_examples"):
        value = tcfg[key]
        if (value is not None or key in required) and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"trainer.{key} must be a whole number >= 1"
                              f"{'' if key in required else ' or null'}, got {value!r}")


def check_every_task(sampler, tasks: list[str], methods: dict):
    """A method that combines the tasks of a step (a gradient aggregator, a loss weighting
    other than equal) does nothing where each step holds one task: refused, not run."""
    for key, method in methods.items():
        if not method.every_task:
            continue
        name, other = method.name, "optim=adam" if key == "optim" else "weighting=equal"
        if len(tasks) < 2:
            raise ConfigError(f"{key} ({name}) combines the tasks of each step, but only {tasks} trains "
                              f"(sampler.tasks); train two tasks or more, or use {other}")
        if not sampler.every_task:
            one = "per_task=true" if getattr(sampler, "per_task", False) else "one task per step"
            raise ConfigError(
                f"{key} ({name}) combines the tasks of each step, but sampler ({type(sampler).__name__}, "
                f"{one}) puts a single task in each step, so it would do nothing. Use sampler=rr_over or "
                f"sampler=rr_under (with sampler.per_task=false), or {other}")


def check_pair_encodings(cfg: DictConfig, objectives: dict):
    """A config that contradicts itself is an error naming both keys."""
    configured = cfg.model.get("pair_encoding") or {}
    for name, objective in objectives.items():
        if objective.compares_embeddings and configured.get(name) == "cross":
            raise ConfigError(f"model.pair_encoding.{name}=cross contradicts loss.objectives.{name} "
                              f"({type(objective).__name__}), which compares two sentence embeddings and so "
                              f"encodes siamese: drop the override (null lets the loss decide) or choose "
                              f"a loss without a cosine head (loss=baseline)")


class Reads(NamedTuple):
    """What a run reads, decided once from its config (`run_reads`) and handed on to its
    `Setup`: the declared tasks (`data.tasks`), the tasks it trains (`sampler.tasks`, or
    every declared one) and every file it reads, (split, task, path)."""

    tasks: dict[str, Task]
    train_tasks: list[str]
    files: list[tuple[str, Task, Path]]


def run_reads(cfg: DictConfig) -> Reads:
    """The tasks and files a run reads: the training tasks' train files (and, with
    `data.validation`, those of the evaluated tasks, whose held-out rows choose the
    checkpoint) and the evaluated tasks' dev files. Checks, before anything heavy loads, that each is there."""
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "is not a directory"
        raise DataError(f"data.root={root} {what}. {DATA_HELP}")
    tasks = declared_tasks(cfg)
    train_tasks = list(OmegaConf.select(cfg, "sampler.tasks") or tasks)
    check_task_names(train_tasks, tasks, "sampler.tasks")
    evaluated = evaluated_tasks(cfg, tasks)
    left_out = [t for t in train_tasks if t not in evaluated]
    if left_out:
        raise ConfigError(f"trainer.eval_tasks={evaluated} leaves out trained task(s) {left_out} "
                          "(sampler.tasks), so the best checkpoint would be picked without them: add "
                          "them, or set trainer.eval_tasks=null to evaluate every declared task")
    held_out = [t for t in evaluated if t not in train_tasks] if cfg.data.get("validation") else []
    return Reads(tasks, train_tasks, data_files(root, tasks, {"train": train_tasks + held_out, "dev": evaluated}))


def data_files(root: Path, tasks: dict[str, Task], wanted: dict[str, list[str]]) -> list[tuple[str, Task, Path]]:
    """(split, task, path) of each split's wanted tasks' files, each checked to be there."""
    files = []
    for split, names in wanted.items():
        for name in names:
            if split not in tasks[name].files:
                raise ConfigError(f"data.tasks.{name}.files has no {split} file; a task needs "
                                  "train (when trained) and dev files, test is optional")
            path = root / tasks[name].files[split]
            if not path.is_file():
                read_text(path)  # says what the path is instead (missing, a folder, a loop)
            files.append((split, tasks[name], path))
    return files
