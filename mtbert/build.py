"""Config to components: the tasks, objectives, model, optimizer groups and data of a run.

Training, prediction, analysis and the benchmark all build through here, so a component
is made one way, and every config value is checked before the first step: a bad choice
fails in seconds, naming its key.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtbert import distributed
from mtbert.batching import TaskStream, encode, tokenizer_digest
from mtbert.data import DATA_HELP, DataError, RejectedRows, Task, read_split, read_text
from mtbert.data.holdout import held_out_size, hold_out
from mtbert.device import resolve_device, resolve_precision
from mtbert.losses import default_objective
from mtbert.model import MultitaskBert, load_tokenizer
from mtbert.provenance import provenance
from mtbert.rundir import CheckpointError, RunDir

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


USER_ERRORS = (ConfigError, DataError, CheckpointError)  # the user's to mend: one message, not a traceback


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


def pair_encodings(cfg: DictConfig, tasks: dict[str, Task], objectives: dict) -> dict[str, str]:
    """How each task's examples are encoded, decided once for the model and the data:
    'single', 'cross' (s1 [SEP] s2 in one sequence) or 'siamese' (each sentence alone,
    section 3.6). A cosine objective compares two embeddings, so its pairs are siamese
    (`check_pair_encodings` refuses an explicit 'cross' for it)."""
    configured = cfg.model.get("pair_encoding") or {}
    encodings = {}
    for name, task in tasks.items():
        encoding = "single" if not task.is_pair else "siamese" if objectives[name].head == "cosine" \
            else configured.get(name) or "cross"
        if encoding not in ("single", "cross", "siamese"):
            raise ConfigError(f"model.pair_encoding.{name} must be 'cross' or 'siamese', got {encoding!r}")
        encodings[name] = encoding
    return encodings


def check_pair_encodings(cfg: DictConfig, objectives: dict):
    """A config that contradicts itself is an error naming both keys."""
    configured = cfg.model.get("pair_encoding") or {}
    for name, objective in objectives.items():
        if objective.head == "cosine" and configured.get(name) == "cross":
            raise ConfigError(f"model.pair_encoding.{name}=cross contradicts loss.objectives.{name} "
                              f"({type(objective).__name__}), which compares two sentence embeddings and so "
                              f"encodes siamese: drop the override (null lets the loss decide) or choose "
                              f"a loss without a cosine head (loss=baseline)")


# Keys added since runs were first saved, with the value that keeps an older run's meaning.
ADDED_KEYS = {
    "weighting": {"_target_": "mtbert.weighting.Equal"},  # the losses were summed with equal weights
    "data.validation": None,  # the dev sets chose the checkpoint
    "trainer.eval_every_steps": None,
    "trainer.eval_tasks": None,  # every declared task was evaluated
    "trainer.max_examples": None,
    "trainer.eval_every_examples": None,
    "trainer.grad_scaler": {"init_scale": 65536.0, "growth_interval": 2000},  # no run used fp16
    "model.gradient_checkpointing": False,
    "trainer.accumulate": 1,
    "sharing": {"_target_": "mtbert.sharing.HardSharing"},  # every task shared the encoder and the shared layer
    "regularizer": {"_target_": "mtbert.regularizer.Regularizer"},  # no regularizer
}


def current_terms(saved: DictConfig) -> DictConfig:
    """A config saved by an earlier mtbert, restated in today's keys with the meaning it had,
    so that its runs still resume and predict: each key added since (`ADDED_KEYS`) with the
    value that meant what the run did; and before `check_pair_encodings`, a 'cross' pair
    encoding under a cosine loss was encoded siamese (the loss decided, as `null` says now)."""
    for key, value in ADDED_KEYS.items():
        if OmegaConf.select(saved, key, default=KeyError) is KeyError:
            OmegaConf.update(saved, key, value, force_add=True)
    encodings = saved.model.get("pair_encoding") or {}
    for name, objective in build_objectives(saved, declared_tasks(saved)).items():
        if objective.head == "cosine" and encodings.get(name) == "cross":
            encodings[name] = None
    return saved


def build_network(cfg: DictConfig):
    """Tasks, their objectives, the model (with what its tasks share: `sharing`) and its
    tokenizer: what training and prediction share."""
    tasks = declared_tasks(cfg)
    objectives = build_objectives(cfg, tasks)
    sharing = build(cfg, "sharing")
    with config_key("model", cfg.model):
        model = instantiate(cfg.model, _partial_=True, _convert_="all")(
            tasks=tasks, objectives=objectives, pair_encoding=pair_encodings(cfg, tasks, objectives))
    with config_key("sharing", cfg.sharing):
        sharing.attach(model)
    return tasks, objectives, model, load_tokenizer(cfg.model.source)


def row_limit(limit, task: str) -> int | None:
    """`data.limit.<split>` is null, one number for every task, or {task: number}."""
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(task)


def param_groups(model: MultitaskBert, lr: DictConfig, tasks) -> list[dict]:
    """Separate learning rates for the encoder, the shared layer and each head (section 4.3),
    and for each task's own parameters below its head (`sharing`: layers and adapters at
    the encoder's rate or `sharing.lr`, MMoE's gates at the shared layer's)."""
    heads = lr.heads
    head_lr = {t: heads for t in tasks} if isinstance(heads, (int, float)) else dict(heads)
    missing = sorted(set(tasks) - set(head_lr))
    if missing:
        raise ConfigError(f"optim.lr.heads has no learning rate for task(s) {missing}")
    own = {id(p) for params in model.task_parameters().values() for p in params}
    groups = [(name, [p for p in m.parameters() if id(p) not in own], value)
              for name, m, value in (("encoder", model.encoder, lr.encoder), ("shared", model.shared, lr.shared))]
    groups += model.sharing.groups(model, lr)
    groups += [(f"head_{t}", list(model.heads[t].parameters()), head_lr[t]) for t in tasks]
    for name, _, value in groups:
        if not value > 0:
            raise ConfigError(f"optim.lr for {name} must be > 0, got {value}")
    return [{"name": name, "params": params, "lr": value} for name, params, value in groups]


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


class Setup:
    """Data, model, optimizer and schedule of one run, all validated."""

    def __init__(self, cfg: DictConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        check_trainer(cfg.trainer)
        self.files = {}  # task -> split -> the file read: path, rows read, kept, skipped, sha256
        data_files(cfg)  # every file there, before the model loads
        self.sampler = build(cfg, "sampler")
        self.train_tasks = self.sampler.tasks or list(cfg.data.tasks)
        with config_key("sampler", cfg.sampler):
            self.sampler.check(self.train_tasks)
        self.schedule = build(cfg, "schedule")
        self.gradient = build(cfg, "optim.gradient", seed=cfg.seed, tasks=len(self.train_tasks))
        self.weighting = build(cfg, "weighting", tasks=self.train_tasks)
        self.regularizer = build(cfg, "regularizer", tasks=self.train_tasks, seed=cfg.seed)
        check_every_task(self.sampler, self.train_tasks, {"optim": self.gradient, "weighting": self.weighting})
        check_pair_encodings(cfg, build_objectives(cfg, declared_tasks(cfg)))
        torch.manual_seed(cfg.seed)
        self.tasks, self.objectives, self.model, self.tokenizer = build_network(cfg)
        self.tokenizer_digest = tokenizer_digest(self.tokenizer)
        self.parameter_counts = self.model.parameter_counts()
        log.info("parameters: %d, %d trainable, %d shared, own per task %s (sharing=%s)",
                 self.parameter_counts["total"], self.parameter_counts["trainable"], self.parameter_counts["shared"],
                 self.parameter_counts["tasks"], type(self.model.sharing).__name__)
        weights = dict(cfg.loss.get("weights") or {})
        check_task_names(weights, self.tasks, "loss.weights")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.train_tasks}
        bad = {t: w for t, w in self.weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"loss.weights must be finite and >= 0, got {bad}")
        self.device = resolve_device(cfg.trainer.device)
        self.precision, why = resolve_precision(cfg.trainer.precision, self.device)
        log.info("precision %s (%s)", self.precision, why)
        self.provenance = provenance(self.device, self.precision, why)
        # fp16 trains only with loss scaling; its state is in last.pt
        self.scaler = (torch.amp.GradScaler(self.device.type, **cfg.trainer.grad_scaler)
                       if self.precision == "fp16" else None)
        if self.device.type == "cpu":  # mtbert.threads chose the policy as the process started
            log.info("%d CPU threads, OMP_WAIT_POLICY %s", torch.get_num_threads(),
                     os.environ.get("OMP_WAIT_POLICY", "unset: torch's default, spinning"))
        self.model.to(self.device)
        with config_key("weighting", cfg.get("weighting")):
            self.weighting.bind(self.model)
        self.weighting.to(self.device)
        with config_key("regularizer", cfg.regularizer):
            self.regularizer.bind(self.model, self.objectives, self.device, self.precision)
        if cfg.trainer.compile:
            with config_key("trainer", cfg.trainer):  # not every sharing option compiles
                self.model.compile_encoder()
        groups = param_groups(self.model, cfg.optim.lr, self.tasks)
        if self.weighting.parameters():
            groups.append({"name": "weighting", "params": self.weighting.parameters(), "lr": self.weighting.lr})
        self.optimizer = instantiate(cfg.optim.optimizer)(groups)
        self.train, self.validation, self.dev = self._load_data()
        self.streams = {  # each task's batches, in this rank's share, from its own generator
            t: TaskStream(self.train[t], cfg.data.batch_size,
                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(t.encode())),
                          cfg.trainer.bucket_batches, self.tokenizer.pad_token_id,
                          distributed.rank(), distributed.world_size())
            for t in self.train_tasks}

    def _load_data(self):
        """Each trained task's training rows, the held-out validation rows of every evaluated
        task (`data.validation`; none when null) and the evaluated tasks' dev sets."""
        cfg = self.cfg.data
        rejected = RejectedRows(cfg.bad_rows)
        train, validation, dev = {}, {}, {}
        try:
            for split, task, path in data_files(self.cfg, self.train_tasks):
                held = None
                if split == "train":
                    rows = read_split(task, path, rejected, labelled=True)
                    with config_key("data", cfg):
                        size = held_out_size(cfg.get("validation"), task.name, len(rows))
                    rows, held = hold_out(rows, size, row_limit(cfg.limit.train, task.name))
                else:
                    rows = read_split(task, path, rejected, labelled=True, limit=row_limit(cfg.limit.dev, task.name))
                self.files.setdefault(task.name, {})[split] = {"path": str(path.resolve()), **rows.counts}
                log.info("%s: %s%s", path, rows.summary(), f", {len(held)} held out for validation" if held else "")
                siamese = self.model.encodings[task.name] == "siamese"
                if held:
                    validation[task.name] = (task, encode(held, self.tokenizer, cfg.max_length, siamese,
                                                          cfg.cache_dir))
                if split == "dev":
                    dev[task.name] = (task, encode(rows, self.tokenizer, cfg.max_length, siamese, cfg.cache_dir))
                elif task.name in self.train_tasks:
                    train[task.name] = encode(rows, self.tokenizer, cfg.max_length, siamese, cfg.cache_dir)
        finally:
            self.run.write_rejected(rejected)
            if rejected.rows:
                log.warning("%d bad row(s) skipped in all, listed in %s/rejected_rows.tsv",
                            len(rejected.rows), self.run.path)
        return train, validation or None, dev


def evaluated_tasks(cfg: DictConfig) -> list[str]:
    """The tasks evaluated on dev, whose mean picks the best checkpoint (`trainer.eval_tasks`):
    every declared task by default. A single-task baseline names its own task, since an
    untrained head's score is noise that would sway the choice."""
    tasks = declared_tasks(cfg)
    names = cfg.trainer.eval_tasks
    if names is None:
        return list(tasks)
    check_task_names(names, tasks, "trainer.eval_tasks")
    return [t for t in tasks if t in names]


def data_files(cfg: DictConfig, train_tasks: list[str] | None = None) -> list[tuple[str, Task, Path]]:
    """(split, task, path) of every file a run reads: the training tasks' train files (and,
    with `data.validation`, those of the evaluated tasks, whose held-out rows choose the
    checkpoint) and the evaluated tasks' dev files. Checks, before anything heavy loads, that each is there."""
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "is not a directory"
        raise DataError(f"data.root={root} {what}. {DATA_HELP}")
    tasks = declared_tasks(cfg)
    train_tasks = train_tasks or OmegaConf.select(cfg, "sampler.tasks") or list(tasks)
    check_task_names(train_tasks, tasks, "sampler.tasks")
    evaluated = evaluated_tasks(cfg)
    left_out = [t for t in train_tasks if t not in evaluated]
    if left_out:
        raise ConfigError(f"trainer.eval_tasks={evaluated} leaves out trained task(s) {left_out} "
                          "(sampler.tasks), so the best checkpoint would be picked without them: add "
                          "them, or set trainer.eval_tasks=null to evaluate every declared task")
    files = []
    held_out = [t for t in evaluated if t not in train_tasks] if cfg.data.get("validation") else []
    for split, names in (("train", train_tasks + held_out), ("dev", evaluated)):
        for name in names:
            if split not in tasks[name].files:
                raise ConfigError(f"data.tasks.{name}.files has no {split} file; a task needs "
                                  "train (when trained) and dev files, test is optional")
            path = root / tasks[name].files[split]
            if not path.is_file():
                read_text(path)  # says what the path is instead (missing, a folder, a loop)
            files.append((split, tasks[name], path))
    return files
