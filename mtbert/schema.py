"""Every key of a run's config is one that conf/ declares: a misspelt key stops the run.

Hydra refuses `optim.lr.encodr=1e-4` (not in struct), but `+` adds any key, and
`+optim.lr.encodr=1e-4` would train a whole run with the encoder at its default rate. So
after composition every key must be declared in conf/: by train.yaml or by an option file
the run chose, at its package (a `# @package _global_` file such as a budget or an
experiment declares the keys it sets, at the root), with the configs its defaults list
takes in (`model/tiny.yaml` takes `minilm`'s keys). A key declared nowhere is an error
naming it, the override it came from and the nearest declared keys; a key that only an
option the run did not choose declares (`sampler=rr_under +sampler.sigma=3`: `sigma` is
`rr_over`'s) is an error naming the chosen option and those that take it. The choices are
Hydra's (`hydra.runtime.choices`); a caller that cannot give them gets every option's keys.

The extension points stay open, each checked by its own rules:
- the task maps (TASK_MAPS): a new task in `data.tasks`, its entry held to a Task's fields;
  in the others, entries for the tasks of `data.tasks` (an objective's keys in
  `loss.objectives.NAME`, whichever `loss` option writes them);
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
import itertools
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

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
def base_keys(conf: Path = CONF) -> frozenset[str]:
    """The keys every run declares: train.yaml's, the task maps' entries, a Task's fields."""
    keys = {f"{m}.{ANY}" for m in TASK_MAPS}
    keys.update(f"data.tasks.{ANY}.{f.name}" for f in dataclasses.fields(Task) if f.name != "name")
    data = yaml.load((conf / "train.yaml").read_text(), Loader) or {}
    data.pop("defaults", None)
    keys.update(pattern(path) for path, _ in walk(data))
    return frozenset(keys)


@functools.cache
def file_keys(conf: Path, group: str, option: str) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """The keys one option file sets, at its package, and the configs its defaults list takes
    in (`minilm` in conf/model/tiny.yaml; `rro_hp_cs` in an experiment): (group, option)
    pairs. An `override /group: option` entry or a group entry of its own takes nothing in:
    it changes a choice, and the choices are checked one by one."""
    text = (conf / group / f"{option}.yaml").read_text()
    data = yaml.load(text, Loader) or {}
    defaults = data.pop("defaults", None) or []
    prefix = package(text, group)
    keys = {pattern(prefix[:i]) for i in range(1, len(prefix) + 1)}
    keys.update(pattern(path) for path, _ in walk(data, prefix))
    takes = []
    for entry in defaults:
        name = re.sub(r"^optional\s+", "", entry.strip()) if isinstance(entry, str) else "_self_"
        if name != "_self_":
            where, _, stem = (name[1:] if name.startswith("/") else f"{group}/{name}").rpartition("/")
            takes.append((where, stem))
    return frozenset(keys), tuple(takes)


@functools.cache
def option_keys(conf: Path, group: str, option: str) -> frozenset[str]:
    """The keys that choosing `group=option` declares: its file's and those of the configs
    its defaults list takes in, and theirs."""
    keys, todo, seen = set(), [(group, option)], set()
    while todo:
        config = todo.pop()
        if config in seen or not (conf / config[0] / f"{config[1]}.yaml").is_file():
            continue
        seen.add(config)
        own, takes = file_keys(conf, *config)
        keys |= own
        todo.extend(takes)
    return frozenset(keys)


@functools.cache
def options(conf: Path = CONF) -> dict[str, list[str]]:
    """Every group of conf/ (`model`, or a nested `a/b`) and its options, Hydra's own left out."""
    found: dict[str, list[str]] = {}
    for file in sorted(conf.glob("*/**/*.yaml")):
        group = file.parent.relative_to(conf).as_posix()
        if group.split("/")[0] != "hydra":
            found.setdefault(group, []).append(file.stem)
    return found


@functools.cache
def declared_keys(conf: Path = CONF) -> frozenset[str]:
    """Every key that conf/train.yaml or any option of any group sets, in `pattern` form."""
    keys = set(base_keys(conf))
    for group, names in options(conf).items():
        for option in names:
            keys |= option_keys(conf, group, option)
    return frozenset(keys)


def chosen_keys(choices: dict, conf: Path = CONF) -> frozenset[str]:
    """The keys a run with these choices (Hydra's `hydra.runtime.choices`: group -> option,
    None for a group left out) declares: train.yaml's and its chosen options'. A group whose
    chosen option conf/ lacks (a search path's) declares every option's keys, as without
    choices. Inside a task map's entry any option's keys count: an entry is an extension
    point, and its keys are its class's (`loss=baseline` with a CosineEmbedding objective)."""
    keys = set(base_keys(conf))
    for group, option in choices.items():
        if group.split("/")[0] == "hydra" or option is None:
            continue
        names = [option] if (conf / group / f"{option}.yaml").is_file() else options(conf).get(group, ())
        for name in names:
            keys |= option_keys(conf, group, name)
    entries = tuple(f"{m}.{ANY}." for m in TASK_MAPS)
    keys.update(k for k in declared_keys(conf) if k.startswith(entries))
    return frozenset(keys)


def takers(key: str, conf: Path = CONF) -> list[tuple[str, str]]:
    """The (group, option) pairs whose choice declares `key`, a `pattern`."""
    return [(group, option) for group, names in options(conf).items() for option in names
            if key in option_keys(conf, group, option)]


def foreign(node) -> bool:
    """A `_target_` mtbert does not own: its arguments are the class's to check."""
    target = node.get("_target_") if isinstance(node, dict) else None
    return isinstance(target, str) and not target.startswith("mtbert.")


def unknown_keys(container: dict, declared: frozenset[str]) -> list[tuple]:
    """Paths of the keys `declared` lacks, outermost only (`+x={a: 1}` is `x`, not `x.a`)."""
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


def nearest(path: tuple, declared: frozenset[str], anywhere: frozenset[str] | None = None
            ) -> tuple[list[str], list[str]]:
    """The declared keys closest to `path`, and its siblings: a sibling of a close name
    first (one the chosen options declare, else one another option does: `anywhere`), else
    a key of a close name elsewhere (`optim.encoder`: `optim.lr.encoder`), those in the same
    group first."""
    anywhere = declared if anywhere is None else anywhere
    parent, _, leaf = pattern(path).rpartition(".")
    close = []
    for keys in (declared, anywhere):
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        close = close or [siblings[k] for k in difflib.get_close_matches(leaf, siblings, n=3)]
    if not close:
        names = {k.rpartition(".")[2] for k in anywhere}
        near = difflib.get_close_matches(leaf, names, n=3, cutoff=0.8)
        close = sorted((k for k in anywhere if k.rpartition(".")[2] in near),
                       key=lambda k: (k.split(".")[0] != str(path[0]), near.index(k.rpartition(".")[2]), k))[:3]
    siblings = [k.rpartition(".")[2] for k in declared if k.rpartition(".")[0] == parent]
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


def describe(path: tuple, overrides: Sequence[str], declared: frozenset[str],
             anywhere: frozenset[str] | None = None, conf: Path = CONF) -> str:
    """`key (from OVERRIDE; did you mean ...?)`, or the keys its parent takes."""
    notes = [f"from {where}"] if (where := source(path, overrides, conf)) else []
    close, siblings = nearest(path, declared, anywhere)
    parent = ".".join(map(str, path[:-1]))
    notes.append(f"did you mean {' or '.join(close)}?" if close else
                 f"{parent or 'the config'} takes {', '.join(siblings)}")
    return f"{'.'.join(map(str, path))} ({'; '.join(notes)})"


def describe_choice(path: tuple, overrides: Sequence[str], choices: dict, conf: Path = CONF) -> str:
    """`key (from OVERRIDE) is a key of GROUP=OPTION, not of the chosen GROUP=OPTION`."""
    by_group: dict[str, list[str]] = {}
    for group, option in takers(pattern(path), conf):
        by_group.setdefault(group, []).append(option)
    options_of = [f"{g}={', '.join(o[:-1]) + ' or ' + o[-1] if len(o) > 1 else o[0]}" for g, o in by_group.items()]
    chosen = [f"{g}={choices.get(g) or 'null'}" for g in by_group]
    where = f" (from {where})" if (where := source(path, overrides, conf)) else ""
    return (f"{'.'.join(map(str, path))}{where} is a key of {' or '.join(options_of)}, "
            f"not of the chosen {' or '.join(chosen)}")


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


FROM_HYDRA = "from Hydra"  # check_keys's default choices: Hydra's, where they can be found


def hydra_choices(container: dict, overrides: Sequence[str]) -> dict | None:
    """The choices of the run `container` is the config of: its own `hydra.runtime.choices`
    (the callback's config, `compose(..., return_hydra_config=True)`), else the running
    job's (HydraConfig, in `mtbert.run.main`) when its overrides are `overrides`; else none."""
    found = ((container.get("hydra") or {}).get("runtime") or {}).get("choices")
    if isinstance(found, dict):
        return found
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized() and list(HydraConfig.get().overrides.task) == list(overrides):
        return OmegaConf.to_container(HydraConfig.get().runtime.choices)
    return None


def check_keys(cfg: DictConfig | dict, overrides: Sequence[str] = (), conf: Path = CONF, choices=FROM_HYDRA):
    """Raise UnknownKeyError naming every key of `cfg` that no file of conf/ declares, every
    key that only options the run did not choose declare, and every task map entry of the
    command line that names no task. `overrides` (the command line's) say where each came
    from; `choices` are Hydra's `hydra.runtime.choices` (by default found by
    `hydra_choices`), None for every option's keys (a caller without them)."""
    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    if choices is FROM_HYDRA:
        choices = hydra_choices(container, overrides)
    container = {k: v for k, v in container.items() if k != "hydra"}
    anywhere = declared_keys(conf)
    declared = anywhere if choices is None else chosen_keys(dict(choices), conf)
    unknown, elsewhere = [], []
    for path in unknown_keys(container, declared):
        if pattern(path) in anywhere:
            elsewhere.append(describe_choice(path, overrides, dict(choices), conf))
        else:
            unknown.append(describe(path, overrides, declared, anywhere, conf))
    tasks = (container.get("data") or {}).get("tasks") or {}
    unknown += [describe_task(path, overrides, tasks) for path in unknown_tasks(container, overrides)]
    if unknown:
        several = len(unknown) > 1
        elsewhere.insert(0, f"unknown config key{'s' if several else ''} {', '.join(unknown)}: no file of conf/ "
                            f"declares {'them' if several else 'it'} (Hydra's `+` adds any key, read or not)")
    if elsewhere:
        raise UnknownKeyError("; ".join(elsewhere))


SWEPT_JOBS = 24  # a sweep over more combinations of groups than this is checked against every option


def swept_jobs(overrides: Sequence[str], conf: Path = CONF) -> list[list[str]] | None:
    """A sweep's groups' combinations (`-m sampler=rr_under,rr_over seed=0,1`: two), each
    as the overrides of a job holding it; its swept values left out, as in the sweep's own
    config. [] without a swept group; None with more combinations than SWEPT_JOBS or a
    sweep that cannot be listed (an interval)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([str(o) for o in overrides])
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    groups = [o for o in parsed if o.is_sweep_override() and (conf / o.key_or_group).is_dir()]
    if not groups:
        return []
    if not all(o.is_discrete_sweep() for o in groups):
        return None
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in groups]
    if math.prod(map(len, values)) > SWEPT_JOBS:
        return None
    return [[*fixed, *combination] for combination in itertools.product(*values)]


def compose(overrides: Sequence[str] = (), conf: Path = CONF, job_name: str = "train") -> DictConfig:
    """The config `python train.py OVERRIDES` runs, its keys checked against the options
    chosen (UnknownKeyError), without its hydra node: for callers of Hydra's compose API."""
    from hydra import compose as compose_config, initialize_config_dir
    with initialize_config_dir(str(conf), version_base="1.3", job_name=job_name):
        cfg = compose_config("train", overrides=list(overrides), return_hydra_config=True)
    check_keys(cfg, overrides, conf)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class CheckKeys(Callback):
    """`hydra.callbacks` in conf/train.yaml: the keys checked before Hydra makes a run
    directory or launches a job (a SLURM sweep would otherwise submit every job to fail
    alike). A sweep's config holds no swept value, so each job checks its own as it starts
    (`mtbert.run.main`)."""

    def on_run_start(self, config: DictConfig, **kwargs):
        self.on_multirun_start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs):
        """A sweep over groups (`-m sampler=rr_under,rr_over`) holds the default's choices:
        each combination of its groups' options is composed and checked as its jobs will be
        (every option's keys count beyond SWEPT_JOBS of them)."""
        from hydra.core.global_hydra import GlobalHydra
        from hydra.errors import HydraException
        from hydra.types import RunMode
        overrides = list(config.hydra.overrides.task)
        try:
            jobs = swept_jobs(overrides)
            check_keys(config, overrides, choices=FROM_HYDRA if jobs == [] else None)
            for job in jobs or ():
                try:
                    composed = GlobalHydra.instance().hydra.compose_config(
                        config.hydra.job.config_name, job, run_mode=RunMode.RUN)
                except HydraException:
                    continue  # Hydra's to report, when the sweep composes that job
                check_keys(composed, job)
        except UnknownKeyError as e:
            sys.exit(f"error: {e}")
