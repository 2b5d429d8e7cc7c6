"""Config subtrees to objects, each error naming its key: a component built from a group
(`build`), the tasks `data.tasks` declares and their objectives, and the values that
select from them (`trainer.eval_tasks`, `data.limit`). Everything that reads the config
builds through here, so a bad value fails the same way, naming the key, wherever it is read."""

from __future__ import annotations

import re
from contextlib import contextmanager

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtbert.data import Task
from mtbert.errors import ConfigError
from mtbert.losses import default_objective


@contextmanager
def config_key(key: str, node=None):
    """A component built from config subtree `key` raises a plain ValueError ("sigma must
    be > 0"); here it becomes a ConfigError naming the key ("sampler.sigma must be > 0",
    or "sampler: ..." when the message does not start with one of the subtree's keys)."""
    try:
        yield
    except (ValueError, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if isinstance(cause, ConfigError) or not isinstance(cause, ValueError):
            raise
        message = str(cause)
        first = re.match(r"[A-Za-z_]\w*", message)
        known = first and isinstance(node, (dict, DictConfig)) and first.group() in node
        raise ConfigError(f"{key}.{message}" if known else f"{key}: {message}") from None


def build(cfg: DictConfig, key: str, **runtime):
    """Instantiate the config subtree at `key`, its errors naming the key."""
    node = OmegaConf.select(cfg, key)
    with config_key(key, node):
        return instantiate(node, _convert_="all", **runtime)


def declared_tasks(cfg: DictConfig) -> dict[str, Task]:
    tasks = {}
    for name, spec in cfg.data.tasks.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        if spec.get("score_range") is not None:
            spec["score_range"] = tuple(spec["score_range"])
        try:
            tasks[name] = Task(name=name, **spec)
        except TypeError as e:
            raise ConfigError(f"data.tasks.{name}: {e}") from None
    return tasks


def check_task_names(names, tasks: dict[str, Task], key: str):
    unknown = sorted(set(names) - set(tasks))
    if unknown:
        raise ConfigError(f"{key} names unknown task(s) {unknown}; declared tasks (data.tasks): "
                          f"{sorted(tasks)}")


def build_objectives(cfg: DictConfig, tasks: dict[str, Task]) -> dict:
    configured = cfg.loss.get("objectives") or {}
    check_task_names(configured, tasks, "loss.objectives")
    objectives = {}
    for name, task in tasks.items():
        key = f"loss.objectives.{name}"
        with config_key(key, configured.get(name)):
            objectives[name] = build(cfg, key) if name in configured else default_objective(task)
            objectives[name].check(task)
    return objectives


def evaluated_tasks(cfg: DictConfig, tasks: dict[str, Task]) -> list[str]:
    """The tasks evaluated on dev, whose mean picks the best checkpoint (`trainer.eval_tasks`):
    every declared task (`tasks`) by default. A single-task baseline names its own task, since
    an untrained head's score is noise that would sway the choice."""
    names = cfg.trainer.eval_tasks
    if names is None:
        return list(tasks)
    check_task_names(names, tasks, "trainer.eval_tasks")
    return [t for t in tasks if t in names]


def row_limit(limit, task: str) -> int | None:
    """`data.limit.<split>` is null, one number for every task, or {task: number}."""
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(task)
