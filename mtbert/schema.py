"""Every key of a run's config is one that conf/ declares: a misspelt key stops the run.

Hydra refuses `optim.lr.encodr=1e-4` (not in struct), but `+` adds any key, and
`+optim.lr.encodr=1e-4` would train a whole run with the encoder at its default rate. So
after composition every key must be declared in conf/: by train.yaml or by an option file
of any group, at its package (a `# @package _global_` file such as a budget or an
experiment declares the keys it sets, at the root). A key declared nowhere is an error
naming it, the override it came from and the nearest declared keys.

The extension points stay open, each checked by its own rules:
- the task maps (TASK_MAPS): a new task in `data.tasks`, its entry held to a Task's fields;
  in the others, entries for the tasks of `data.tasks` (an objective's keys in
  `loss.objectives.NAME`);
- OPEN subtrees, whose contents are free: `model.random_init` (a transformers config),
  `hpo.space` (`mtbert.tune` checks each key), `hydra`;
- the arguments of a `_target_` that mtbert does not own (torch's AdamW, torchjd, optuna):
  the class itself refuses an argument it does not take. An mtbert class's arguments are
  the keys its option files write.

YAML and the standard library only: this runs before torch loads, so a typo costs a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
from pathlib import Path
from typing import Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtbert.data import Task

CONF = Path(__file__).resolve().parents[1] / "conf"
TASK_MAPS = ("data.tasks", "data.limit.train", "data.limit.dev", "data.validation", "sampler.targets",
             "optim.lr.heads", "loss.weights", "loss.objectives", "model.pair_encoding")
OPEN = ("hydra", "model.random_init", "hpo.space")
ANY = "*"  # a task name in a task map, or an item of a list
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UnknownKeyError(ValueError):
    pass


def pattern(path: Sequence) -> str:
    """The declared form of a key path: task names and list indices become `*`."""
    parts = []
    for key in path:
        parts.append(ANY if isinstance(key, int) or ".".join(parts) in TASK_MAPS else str(key))
    return ".".join(parts)


def package(text: str, group: str) -> tuple[str, ...]:
    """Where a group file's keys land: its `# @package` header, else the group's own path."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        found = re.match(r"\s*#\s*@package\s+(\S+)", line)
        if found:
            name = found.group(1).replace("_group_", group.replace("/", "."))
            name = re.sub(r"^_global_\.?", "", name)
            return tuple(name.split(".")) if name else ()
    return tuple(group.split("/"))


def walk(node, path=()):
    """(path, value) of every key under a plain dict, from `path`; list items count only as
    the dicts they hold (`schedule.phases.*.length`), not as keys of their own."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        sub = (*path, key)
        if isinstance(key, int):
            yield from walk(value, sub)
            continue
        yield sub, value
        if pattern(sub) not in OPEN:
            yield from walk(value, sub)


@functools.cache
def declared_keys(conf: Path = CONF) -> frozenset[str]:
    """Every key that conf/train.yaml or any option of any group sets, in `pattern` form."""
    keys = {f"{m}.{ANY}" for m in TASK_MAPS}
    keys.update(f"data.tasks.{ANY}.{f.name}" for f in dataclasses.fields(Task) if f.name != "name")
    for file in [conf / "train.yaml", *sorted(conf.glob("*/**/*.yaml"))]:
        group = file.parent.relative_to(conf).as_posix()
        if group.split("/")[0] == "hydra":
            continue  # Hydra's own (launchers): `hydra` is open
        text = file.read_text()
        data = yaml.load(text, Loader) or {}
        data.pop("defaults", None)
        prefix = () if file.parent == conf else package(text, group)
        keys.update(pattern(prefix[:i]) for i in range(1, len(prefix) + 1))
        keys.update(pattern(path) for path, _ in walk(data, prefix))
    return frozenset(keys)


def foreign(node) -> bool:
    """A `_target_` mtbert does not own: its arguments are the class's to check."""
    target = node.get("_target_") if isinstance(node, dict) else None
    return isinstance(target, str) and not target.startswith("mtbert.")


def unknown_keys(container: dict, declared: frozenset[str]) -> list[tuple]:
    """Paths of the keys declared nowhere, outermost only (`+x={a: 1}` is `x`, not `x.a`)."""
    found = []

    def visit(node, path):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            sub = (*path, key)
            if isinstance(key, int):
                visit(value, sub)
            elif foreign(node):
                continue
            elif pattern(sub) not in declared:
                found.append(sub)
            elif pattern(sub) not in OPEN:
                visit(value, sub)

    visit(container, ())
    return found


def render(declared: str, path: tuple) -> str:
    """A declared pattern with the `*`s of `path`'s own task names and indices filled in."""
    return ".".join(str(path[i]) if part == ANY and i < len(path) else part
                    for i, part in enumerate(declared.split(".")))


def nearest(path: tuple, declared: frozenset[str]) -> tuple[list[str], list[str]]:
    """The declared keys closest to `path`, and its siblings: a sibling of a close name
    first, else a key of a close name elsewhere (`optim.encoder`: `optim.lr.encoder`),
    those in the same group first."""
    parent, _, leaf = pattern(path).rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in declared if k.rpartition(".")[0] == parent}
    close = [siblings[k] for k in difflib.get_close_matches(leaf, siblings, n=3)]
    if not close:
        names = {k.rpartition(".")[2] for k in declared}
        near = difflib.get_close_matches(leaf, names, n=3, cutoff=0.8)
        close = sorted((k for k in declared if k.rpartition(".")[2] in near),
                       key=lambda k: (k.split(".")[0] != str(path[0]), near.index(k.rpartition(".")[2]), k))[:3]
    return [render(k, path) for k in close], sorted(siblings)


def source(path: tuple, overrides: Sequence[str], conf: Path = CONF) -> str | None:
    """The command-line override that set `path`, if one did: the most specific one (a
    group's choice, `sampler=adaptive`, sets no key of its own)."""
    key, found = ".".join(map(str, path)), []
    for override in overrides:
        name = override.lstrip("~+").split("=")[0]
        if (key == name or key.startswith(name + ".") or name.startswith(key + ".")) and \
                not (conf / name.replace(".", "/")).is_dir():
            found.append((len(name), override))
    if not found:
        return None
    override = max(found)[1]
    return override if len(override) <= 60 else override[:len(override.split("=")[0]) + 1] + "..."


def describe(path: tuple, overrides: Sequence[str], declared: frozenset[str]) -> str:
    """`key (from OVERRIDE; did you mean ...?)`, or the keys its parent takes."""
    notes = [f"from {where}"] if (where := source(path, overrides)) else []
    close, siblings = nearest(path, declared)
    parent = ".".join(map(str, path[:-1]))
    notes.append(f"did you mean {' or '.join(close)}?" if close else
                 f"{parent or 'the config'} takes {', '.join(siblings)}")
    return f"{'.'.join(map(str, path))} ({'; '.join(notes)})"


def unknown_tasks(container: dict, overrides: Sequence[str]) -> list[tuple]:
    """Entries of the task maps set on the command line that name no task of data.tasks
    (`+optim.lr.heads.sstt=1e-3` would be ignored). The files' own entries are build's to
    check: a task removed with `~data.tasks.NAME` leaves its entries there."""
    tasks = (container.get("data") or {}).get("tasks") or {}
    found = []
    for key in TASK_MAPS[1:]:
        node = container
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for name in node if isinstance(node, dict) else ():
            path = (*key.split("."), name)
            if name not in tasks and source(path, overrides):
                found.append(path)
    return found


def describe_task(path: tuple, overrides: Sequence[str], tasks) -> str:
    parent, name = ".".join(path[:-1]), path[-1]
    close = difflib.get_close_matches(name, list(tasks), n=3)
    hint = f"did you mean {' or '.join(f'{parent}.{t}' for t in close)}?" if close else \
        f"the tasks are {', '.join(tasks)}"
    return f"{'.'.join(path)} (from {source(path, overrides)}; no task {name} in data.tasks: {hint})"


def check_keys(cfg: DictConfig | dict, overrides: Sequence[str] = (), conf: Path = CONF):
    """Raise UnknownKeyError naming every key of `cfg` that no file of conf/ declares, and
    every task map entry of the command line that names no task. `overrides` (the command
    line's) say where each came from."""
    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    container = {k: v for k, v in container.items() if k != "hydra"}
    declared = declared_keys(conf)
    unknown = [describe(path, overrides, declared) for path in unknown_keys(container, declared)]
    tasks = (container.get("data") or {}).get("tasks") or {}
    unknown += [describe_task(path, overrides, tasks) for path in unknown_tasks(container, overrides)]
    if unknown:
        several = len(unknown) > 1
        raise UnknownKeyError(
            f"unknown config key{'s' if several else ''} {', '.join(unknown)}: no file of conf/ declares "
            f"{'them' if several else 'it'} (Hydra's `+` adds any key, read or not)")


class CheckKeys(Callback):
    """`hydra.callbacks` in conf/train.yaml: the keys checked before Hydra makes a run
    directory or launches a job (a SLURM sweep would otherwise submit every job to fail
    alike). A sweep's config holds no swept value, so each job checks its own as it starts
    (`mtbert.run.main`)."""

    def on_run_start(self, config: DictConfig, **kwargs):
        self.on_multirun_start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs):
        try:
            check_keys(config, config.hydra.overrides.task)
        except UnknownKeyError as e:
            sys.exit(f"error: {e}")
