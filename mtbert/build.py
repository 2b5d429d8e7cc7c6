"""A run's components from its config: the network (tasks, objectives, pair encodings,
model, tokenizer), the optimizer groups, the data and its streams (`Setup`).

Training, prediction, analysis and the benchmark all build through here, so a component
is made one way. The config is read through `mtbert.config` (errors naming the key),
checked against itself by `mtbert.checks` before anything loads, and an older run's is
restated by `mtbert.compat`: a bad choice fails in seconds, naming its key.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from typing import NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtbert import distributed
from mtbert.batching import TaskStream, encode, tokenizer_digest
from mtbert.checks import Reads, check_every_task, check_pair_encodings, check_trainer, run_reads
from mtbert.config import build, build_objectives, check_task_names, config_key, declared_tasks, row_limit
from mtbert.data import RejectedRows, Task, read_split
from mtbert.data.holdout import held_out_size, hold_out
from mtbert.device import resolve_device, resolve_precision
from mtbert.errors import ConfigError
from mtbert.model import MultitaskBert, load_tokenizer
from mtbert.provenance import provenance
from mtbert.rundir import RunDir

log = logging.getLogger(__name__)


def pair_encodings(cfg: DictConfig, tasks: dict[str, Task], objectives: dict) -> dict[str, str]:
    """How each task's examples are encoded, decided once for the model and the data:
    'single', 'cross' (s1 [SEP] s2 in one sequence) or 'siamese' (each sentence alone,
    section 3.6). A cosine objective compares two embeddings, so its pairs are siamese
    (`check_pair_encodings` refuses an explicit 'cross' for it)."""
    configured = cfg.model.get("pair_encoding") or {}
    encodings = {}
    for name, task in tasks.items():
        encoding = "single" if not task.is_pair else "siamese" if objectives[name].compares_embeddings \
            else configured.get(name) or "cross"
        if encoding not in ("single", "cross", "siamese"):
            raise ConfigError(f"model.pair_encoding.{name} must be 'cross' or 'siamese', got {encoding!r}")
        encodings[name] = encoding
    return encodings


class Network(NamedTuple):
    """What training, prediction, analysis and the benchmark share: the tasks, their
    objectives, how each task's examples are encoded (`pair_encodings`: the model's heads
    and the data path both read them here), the model and its tokenizer."""

    tasks: dict[str, Task]
    objectives: dict
    encodings: dict[str, str]
    model: MultitaskBert
    tokenizer: object

    def siamese(self, task: str) -> bool:
        """Whether the task's pairs are encoded one sentence at a time."""
        return self.encodings[task] == "siamese"


def build_network(cfg: DictConfig, tasks: dict[str, Task] | None = None) -> Network:
    """The run's network, the model with what its tasks share (`sharing`); `tasks`: the
    declared tasks, where the caller has decided them (a run's `Reads`)."""
    tasks = declared_tasks(cfg) if tasks is None else tasks
    objectives = build_objectives(cfg, tasks)
    check_pair_encodings(cfg, objectives)
    encodings = pair_encodings(cfg, tasks, objectives)
    sharing = build(cfg, "sharing")
    with config_key("model", cfg.model):
        model = instantiate(cfg.model, _partial_=True, _convert_="all")(
            tasks=tasks, objectives=objectives, pair_encoding=encodings)
    with config_key("sharing", cfg.sharing):
        sharing.attach(model)
    return Network(tasks, objectives, encodings, model, load_tokenizer(cfg.model.source))


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


def loss_weights(cfg: DictConfig, tasks: dict[str, Task], train_tasks: list[str]) -> dict[str, float]:
    """Each training task's lambda_t (eq. 1, `loss.weights`; 1 where unset)."""
    weights = dict(cfg.loss.get("weights") or {})
    check_task_names(weights, tasks, "loss.weights")
    weights = {t: float(weights.get(t, 1.0)) for t in train_tasks}
    bad = {t: w for t, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ConfigError(f"loss.weights must be finite and >= 0, got {bad}")
    return weights


class Setup:
    """The run's components, all validated before the first step: its methods, network,
    device, optimizer, data and plan (its length in steps and its evaluation points).
    `reads`: the run's tasks and files where the caller has decided them already (train.py's
    job checks its files before W&B starts); else they are decided here."""

    def __init__(self, cfg: DictConfig, run: RunDir, reads: Reads | None = None):
        self.cfg, self.run = cfg, run
        check_trainer(cfg.trainer)
        self.files = {}  # task -> split -> the file read: path, rows read, kept, skipped, sha256
        self.reads = reads or run_reads(cfg)  # every file it reads is there before the model loads
        self._build_methods(cfg)
        torch.manual_seed(cfg.seed)
        self.network = build_network(cfg, self.reads.tasks)
        self.tasks, self.objectives, _, self.model, self.tokenizer = self.network
        self.tokenizer_digest = tokenizer_digest(self.tokenizer)
        self.parameter_counts = counts = self.model.parameter_counts()
        log.info("parameters: %d, %d trainable, %d shared, own per task %s (sharing=%s)", counts["total"],
                 counts["trainable"], counts["shared"], counts["tasks"], type(self.model.sharing).__name__)
        self.weights = loss_weights(cfg, self.tasks, self.train_tasks)
        self._place(cfg)
        self.optimizer = self._optimizer(cfg)
        self.train, self.validation, self.dev = self._load_data()
        self.streams = {  # each task's batches, in this rank's share, from its own generator
            t: TaskStream(self.train[t], cfg.data.batch_size,
                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(t.encode())),
                          cfg.trainer.bucket_batches, self.tokenizer.pad_token_id,
                          distributed.rank(), distributed.world_size())
            for t in self.train_tasks}
        self._plan(cfg)

    def _plan(self, cfg: DictConfig):
        """The run's length in optimizer steps (`trainer.epochs` of the sampler's plan, cut by
        `max_steps` or `max_examples`) and its evaluation points, and the checks that need
        them: a run with no step, a weighting that needs more (`weighting.check`)."""
        tcfg = cfg.trainer
        self.sizes = {t: len(self.streams[t]) for t in self.train_tasks}
        self.steps_per_epoch = self.sampler.steps_per_epoch(self.sizes)
        self.total_steps = tcfg.epochs * self.steps_per_epoch
        if tcfg.max_steps is not None:
            self.total_steps = min(self.total_steps, tcfg.max_steps)
        # a step holds one batch of every training task, or of one: examples as steps, alike for every sampler
        step_examples = cfg.data.batch_size * (len(self.train_tasks) if self.sampler.every_task else 1)
        if tcfg.max_examples is not None:
            self.total_steps = min(self.total_steps, math.ceil(tcfg.max_examples / step_examples))
        if self.total_steps < 1:
            raise ConfigError("the run has no optimizer steps: check trainer.epochs and trainer.max_steps")
        with config_key("weighting", cfg.weighting):
            self.weighting.check(self.total_steps, self.steps_per_epoch)
        self.eval_every_steps = tcfg.eval_every_steps
        if tcfg.eval_every_examples is not None:
            self.eval_every_steps = math.ceil(tcfg.eval_every_examples / step_examples)
        self.eval_every = math.ceil(self.steps_per_epoch / tcfg.evals_per_epoch)

    def _build_methods(self, cfg: DictConfig):
        """The study's choices, built and checked before the model loads: the sampler (against
        the training tasks, `Reads`), the schedule, the gradient method, the loss weighting and
        the regularizer."""
        self.sampler = build(cfg, "sampler")
        self.train_tasks = self.reads.train_tasks
        with config_key("sampler", cfg.sampler):
            self.sampler.check(self.train_tasks)
        self.schedule = build(cfg, "schedule")
        self.gradient = build(cfg, "optim.gradient", seed=cfg.seed, tasks=self.train_tasks)
        self.weighting = build(cfg, "weighting", tasks=self.train_tasks)
        self.regularizer = build(cfg, "regularizer", tasks=self.train_tasks, seed=cfg.seed)
        check_every_task(self.sampler, self.train_tasks, {"optim": self.gradient, "weighting": self.weighting})

    def _place(self, cfg: DictConfig):
        """The device and precision (logged with the reason, and kept as provenance), fp16's
        loss scaler, and the model and the methods that hold tensors moved there."""
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

    def _optimizer(self, cfg: DictConfig):
        """AdamW (`optim.optimizer`) over the model's groups, and a learnt weighting's own."""
        groups = param_groups(self.model, cfg.optim.lr, self.tasks)
        if self.weighting.parameters():
            groups.append({"name": "weighting", "params": self.weighting.parameters(), "lr": self.weighting.lr})
        return instantiate(cfg.optim.optimizer)(groups)

    def _load_data(self):
        """Each trained task's training rows, the held-out validation rows of every evaluated
        task (`data.validation`; none when null) and the evaluated tasks' dev sets."""
        cfg = self.cfg.data
        rejected = RejectedRows(cfg.bad_rows)
        train, validation, dev = {}, {}, {}
        try:
            for split, task, path in self.reads.files:
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
                siamese = self.network.siamese(task.name)
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
