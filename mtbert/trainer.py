"""The training loop: sampler -> task batches -> losses -> gradient method -> optimizer step.

Everything a run needs is built (and every config value checked) in `Setup` before the
first step, so a bad choice fails in seconds, naming its key.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import threading
import time
import warnings
import zlib
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtbert import distributed
from mtbert.batching import Batch, TaskStream, encode, tokenizer_digest
from mtbert.data import DATA_HELP, DataError, RejectedRows, Task, read_split, read_text
from mtbert.device import autocast, resolve_device, resolve_precision
from mtbert.diagnostics import conflict_summary, plot_grad_conflict
from mtbert.evaluate import evaluate, format_metrics
from mtbert.losses import default_objective
from mtbert.model import MultitaskBert, load_tokenizer
from mtbert.rundir import RunDir, checkpoint_exists, load_checkpoint

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


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
        objectives[name] = instantiate(configured[name]) if name in configured else default_objective(task)
        try:
            objectives[name].check(task)
        except ValueError as e:
            raise ConfigError(f"loss.objectives.{name}: {e}") from None
    return objectives


def build_network(cfg: DictConfig):
    """Tasks, their objectives, the model and its tokenizer: what training and prediction share."""
    tasks = declared_tasks(cfg)
    objectives = build_objectives(cfg, tasks)
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(tasks=tasks, objectives=objectives)
    return tasks, objectives, model, load_tokenizer(cfg.model.source)


def row_limit(limit, task: str) -> int | None:
    """`data.limit.<split>` is null, one number for every task, or {task: number}."""
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(task)


def param_groups(model: MultitaskBert, lr: DictConfig, tasks) -> list[dict]:
    """Separate learning rates for the encoder, the shared layer and each head (section 4.3)."""
    heads = lr.heads
    head_lr = {t: heads for t in tasks} if isinstance(heads, (int, float)) else dict(heads)
    missing = sorted(set(tasks) - set(head_lr))
    if missing:
        raise ConfigError(f"optim.lr.heads has no learning rate for task(s) {missing}")
    groups = [("encoder", model.encoder, lr.encoder), ("shared", model.shared, lr.shared)]
    groups += [(f"head_{t}", model.heads[t], head_lr[t]) for t in tasks]
    for name, _, value in groups:
        if not value > 0:
            raise ConfigError(f"optim.lr for {name} must be > 0, got {value}")
    return [{"name": name, "params": list(m.parameters()), "lr": value} for name, m, value in groups]


class Setup:
    """Data, model, optimizer and schedule of one run, all validated."""

    def __init__(self, cfg: DictConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.files = {}  # task -> split -> the file read: path, rows read, kept, skipped, sha256
        data_files(cfg)  # every file there, before the model loads
        self.sampler = instantiate(cfg.sampler, _convert_="all")
        self.train_tasks = self.sampler.tasks or list(cfg.data.tasks)
        try:
            self.sampler.check(self.train_tasks)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        torch.manual_seed(cfg.seed)
        self.tasks, self.objectives, self.model, self.tokenizer = build_network(cfg)
        self.tokenizer_digest = tokenizer_digest(self.tokenizer)
        weights = dict(cfg.loss.get("weights") or {})
        check_task_names(weights, self.tasks, "loss.weights")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.train_tasks}
        bad = {t: w for t, w in self.weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"loss.weights must be finite and >= 0, got {bad}")
        self.schedule = instantiate(cfg.schedule, _convert_="all")
        self.gradient = instantiate(cfg.optim.gradient, _convert_="all", seed=cfg.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.precision = resolve_precision(cfg.trainer.precision, self.device)
        self.model.to(self.device)
        if cfg.trainer.compile:
            self.model.compile_encoder()
        self.optimizer = instantiate(cfg.optim.optimizer)(
            param_groups(self.model, cfg.optim.lr, self.tasks))
        self.train, self.dev = self._load_data()

    def _load_data(self):
        cfg = self.cfg.data
        rejected = RejectedRows(cfg.bad_rows)
        train, dev = {}, {}
        try:
            for split, task, path in data_files(self.cfg, self.train_tasks):
                rows = read_split(task, path, rejected, labelled=True,
                                  limit=row_limit(cfg.limit[split], task.name))
                self.files.setdefault(task.name, {})[split] = {"path": str(path.resolve()), **rows.counts}
                log.info("%s: %d rows, %d kept, %d skipped", path, rows.counts["rows"],
                         rows.counts["kept"], rows.counts["skipped"])
                (train if split == "train" else dev)[task.name] = encode(
                    rows, self.tokenizer, cfg.max_length, self.model.encodings[task.name] == "siamese",
                    cfg.cache_dir)
        finally:
            self.run.write_rejected(rejected)
            if rejected.rows:
                log.warning("%d bad row(s) skipped in all, listed in %s/rejected_rows.tsv",
                            len(rejected.rows), self.run.path)
        return train, dev


def data_files(cfg: DictConfig, train_tasks: list[str] | None = None) -> list[tuple[str, Task, Path]]:
    """(split, task, path) of every file a run reads: the training tasks' train files and
    every task's dev file. Checks, before anything heavy loads, that each is there."""
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "is not a directory"
        raise DataError(f"data.root={root} {what}. {DATA_HELP}")
    tasks = declared_tasks(cfg)
    train_tasks = train_tasks or OmegaConf.select(cfg, "sampler.tasks") or list(tasks)
    check_task_names(train_tasks, tasks, "sampler.tasks")
    files = []
    for split, names in (("train", train_tasks), ("dev", list(tasks))):
        for name in names:
            if split not in tasks[name].files:
                raise ConfigError(f"data.tasks.{name}.files has no {split} file; a task needs "
                                  "train (when trained) and dev files, test is optional")
            path = root / tasks[name].files[split]
            if not path.is_file():
                read_text(path)  # says what the path is instead (missing, a folder, a loop)
            files.append((split, tasks[name], path))
    return files


class Interrupted(Exception):
    """The run stopped by a signal (after saving `checkpoints/last.pt`, once training has
    begun); `results` holds what it had reached."""

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results or {}


class NonFiniteLoss(FloatingPointError):
    pass


class NonFiniteWatch:
    """Notes on the device, with no host sync, each task's first step with a non-finite
    loss; `check()`, called where the loop syncs anyway (logging, evaluation, saving),
    raises for the earliest. Between a bad step and the check the run trains on, but no
    evaluation or checkpoint is made from its weights."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.first = {t: torch.full((), -1, device=device) for t in tasks}

    def note(self, step: int, losses: dict[str, torch.Tensor]):
        for t, loss in losses.items():
            first = self.first[t]
            self.first[t] = torch.where((first < 0) & ~loss.isfinite(), step, first)

    def check(self):
        steps = {t: int(step) for t, step in self.first.items()}
        bad = {t: step for t, step in steps.items() if step >= 0}
        if bad:
            step = min(bad.values())
            raise NonFiniteLoss(f"non-finite loss for task(s) {[t for t in bad if bad[t] == step]} at step "
                                f"{step}; lower the learning rates, or set trainer.on_nonfinite=skip")


class Trainer:
    """The loop of one run and all of its state; `state_dict()` is what resuming needs.

    Steps are planned per epoch by the sampler; every stream is reshuffled at each epoch
    start. A resumed run restores the streams, the epoch's draw generator (replaying the
    plan up to the step it stopped at) and every RNG, so it continues exactly.
    """

    def __init__(self, cfg: DictConfig, run: RunDir):
        self.cfg, self.run, self.tcfg = cfg, run, cfg.trainer
        s = self.setup = Setup(cfg, run)
        self.streams = {
            t: TaskStream(s.train[t], cfg.data.batch_size,
                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(t.encode())),
                          self.tcfg.bucket_batches, s.tokenizer.pad_token_id,
                          distributed.rank(), distributed.world_size())
            for t in s.train_tasks
        }
        self.draws = torch.Generator().manual_seed(cfg.seed)  # for samplers that draw tasks
        self.sizes = {t: len(self.streams[t]) for t in s.train_tasks}
        self.steps_per_epoch = s.sampler.steps_per_epoch(self.sizes)
        self.total_steps = self.tcfg.epochs * self.steps_per_epoch
        if self.tcfg.max_steps is not None:
            self.total_steps = min(self.total_steps, self.tcfg.max_steps)
        if self.total_steps < 1:
            raise ConfigError("the run has no optimizer steps: check trainer.epochs and trainer.max_steps")
        if self.tcfg.on_nonfinite not in ("error", "skip"):
            raise ConfigError(f"trainer.on_nonfinite must be 'error' or 'skip', got {self.tcfg.on_nonfinite!r}")
        self.eval_every_steps = self.tcfg.get("eval_every_steps")  # absent from older runs' configs
        for key, value in (("evals_per_epoch", self.tcfg.evals_per_epoch), ("eval_every_steps", self.eval_every_steps)):
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{key} must be at least 1, got {value}")
        self.eval_every = math.ceil(self.steps_per_epoch / self.tcfg.evals_per_epoch)
        self.scheduler = s.schedule.lr_scheduler(s.optimizer, self.total_steps)
        self.shared = list(s.model.encoder.parameters()) + list(s.model.shared.parameters())
        self.heads = list(s.model.heads.parameters())
        self.grad_every = cfg.diagnostics.grad_every  # log task-gradient conflict every N steps
        # the loop's state
        self.step, self.epoch, self.epoch_start = 0, 1, 0
        self.epoch_draws = self.draws.get_state()
        self.seen = {t: 0 for t in s.train_tasks}
        self.skipped = 0  # batches skipped for a non-finite loss
        self.sentences = 0
        self.best = {"score": -math.inf, "metrics": None, "epoch": None, "step": None}
        self.last_eval = None
        self.elapsed = 0.0  # training seconds before this process (resumed runs)
        self.signal = None
        self.after_save = lambda: None  # a requeue handler to run once last.pt is saved
        self.nonfinite = NonFiniteWatch(s.train_tasks, s.device)

    # -- one step ---------------------------------------------------------------------
    def next_batches(self, step_tasks) -> dict[str, Batch]:
        return {t: self.streams[t].next().to(self.setup.device) for t in step_tasks}

    def training_step(self, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """Forward each task's batch, combine the losses with the gradient method, step.

        Returns the detached weighted losses, still on the device: the step never waits
        for the GPU. A non-finite loss stops the run at the next check, naming task and
        step; with `trainer.on_nonfinite=skip` the step is skipped and counted, which needs
        the verdict before the optimizer step (one host sync per step, in that mode only).
        """
        s = self.setup
        losses = {}
        for t, batch in batches.items():
            with autocast(s.device, s.precision):
                output = s.model(t, batch)
            loss = s.objectives[t].loss(output, batch.labels, s.tasks[t])
            share = len(batch.index) * distributed.world_size() / batch.global_size  # 1 alone
            losses[t] = s.weights[t] * share * loss
        if self.tcfg.on_nonfinite == "error":
            self.nonfinite.note(self.step, {t: loss.detach() for t, loss in losses.items()})
        else:
            finite = torch.stack([loss.detach() for loss in losses.values()]).isfinite()
            if distributed.any_(not bool(finite.all())):  # all ranks skip, or none
                bad = [t for t, ok in zip(losses, finite.tolist()) if not ok] or "another rank's batch"
                log.warning("step %d: non-finite loss for %s, batch skipped", self.step, bad)
                self.skipped += 1
                if self.skipped > self.tcfg.get("max_skipped", 0.1) * self.total_steps:
                    raise NonFiniteLoss(f"{self.skipped} steps skipped for non-finite losses, more than "
                                        f"trainer.max_skipped={self.tcfg.get('max_skipped', 0.1)} of the run's "
                                        f"{self.total_steps}; lower the learning rates")
                with warnings.catch_warnings():  # torch warns if no optimizer step came yet: none is meant
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    self.scheduler.step()  # the step is spent: the LR schedule keeps to the step count
                return {}
        diagnose = bool(self.grad_every) and self.step % self.grad_every == 0
        diagnostics = s.gradient.backward(losses, [p for p in self.shared if p.requires_grad],
                                          diagnose=diagnose)
        distributed.average_([p.grad for p in self.heads if p.grad is not None])
        if diagnostics:
            self.run.event("grad", self.step, **diagnostics)
        s.optimizer.step()
        self.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return {t: loss.detach() for t, loss in losses.items()}

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        s, tcfg = self.setup, self.tcfg
        log.info("training %s on %s (%s): %d steps, %d per epoch; batches per pass %s",
                 "+".join(s.train_tasks), s.device, s.precision, self.total_steps,
                 self.steps_per_epoch, self.sizes)
        loss_sums = {t: torch.zeros((), device=s.device) for t in s.train_tasks}
        loss_counts = {t: 0 for t in s.train_tasks}
        start, first_step = time.perf_counter(), self.step
        last_log = last_save = start
        encoder_on = None
        s.model.train()
        with stop_signals(self):
            while self.step < self.total_steps:
                if self.step == self.epoch_start:  # a fresh epoch
                    for stream in self.streams.values():
                        stream.restart()
                    self.epoch_draws = self.draws.get_state()
                else:  # resumed mid-epoch: replay the epoch's plan up to this step
                    self.draws.set_state(self.epoch_draws)
                plan = s.sampler.epoch(self.sizes, self.draws, self.epoch_start, self.total_steps)
                for step_tasks in itertools.islice(plan, self.step - self.epoch_start, None):
                    trains_encoder = s.schedule.trains_encoder(self.step, self.total_steps)
                    if trains_encoder != encoder_on:
                        s.model.set_encoder_trainable(trains_encoder)
                        encoder_on = trains_encoder
                        log.info("step %d: %s", self.step, "training encoder and heads"
                                 if trains_encoder else "encoder frozen, training heads")
                    batches = self.next_batches(step_tasks)
                    losses = self.training_step(batches)
                    self.step += 1
                    for t, batch in batches.items():
                        self.seen[t] += batch.global_size
                        self.sentences += batch.num_sequences * distributed.world_size()
                    for t, loss in losses.items():
                        loss_sums[t] += loss
                        loss_counts[t] += 1

                    now = time.perf_counter()
                    elapsed = self.elapsed + now - start
                    timed_out = tcfg.max_seconds is not None and elapsed >= tcfg.max_seconds
                    done = self.step == self.total_steps or timed_out
                    if now - last_log >= tcfg.log_every_seconds or done:
                        self.log_progress(loss_sums, loss_counts, (now - start) / (self.step - first_step), elapsed)
                        last_log = now
                    if self.eval_due() or done:
                        self.evaluate()
                    stopping = distributed.any_(self.signal is not None)
                    if stopping or now - last_save >= tcfg.checkpoint_every_seconds:
                        self.elapsed, start, first_step = elapsed, now, self.step
                        self.save_last()
                        last_save = time.perf_counter()
                    if stopping:
                        self.after_save()
                        raise Interrupted(f"stopped by {self.signal or 'another rank'} at step {self.step}; "
                                          f"resume with: python train.py resume={self.run.path}",
                                          self.results())
                    if timed_out and not done:
                        log.info("trainer.max_seconds=%s reached at step %d", tcfg.max_seconds, self.step)
                    if done:
                        break
                else:
                    self.epoch += 1
                    self.epoch_start = self.step
                    continue
                break
            if self.last_eval != self.step:  # a signal now waits for the final save
                self.evaluate()
            self.elapsed += time.perf_counter() - start
            self.save_last()
        if self.grad_every:
            plot_grad_conflict(self.run.path)
            conflict_summary(self.run.path)
        return self.results()

    def results(self) -> dict:
        """The results.json fields the loop owns, as far as it has come."""
        s = self.setup
        return {"dev": self.best["metrics"], "best_epoch": self.best["epoch"],
                "best_step": self.best["step"], "steps": self.step, "examples_seen": dict(self.seen),
                "skipped_steps": self.skipped, "train_seconds": self.elapsed,
                "device": s.device.type, "precision": s.precision, "data": s.files,
                "tokenizer": s.tokenizer_digest}

    def eval_due(self) -> bool:
        """Every `trainer.eval_every_steps` steps when set (the same points for every
        sampler), else `evals_per_epoch` times in each epoch, the last at its end."""
        if self.eval_every_steps:
            return self.step % self.eval_every_steps == 0
        in_epoch = self.step - self.epoch_start
        return in_epoch % self.eval_every == 0 or in_epoch == self.steps_per_epoch

    def log_progress(self, loss_sums, loss_counts, step_seconds: float, elapsed: float):
        """One progress line and one `train` event; the only host sync of the loop."""
        self.nonfinite.check()
        train_loss = {t: (loss_sums[t] / loss_counts[t]).item()
                      for t in loss_sums if loss_counts[t]}
        lr = {g["name"]: g["lr"] for g in self.setup.optimizer.param_groups}
        rate = self.sentences / max(elapsed, 1e-9)
        self.run.event("train", self.step, epoch=self.epoch, loss=train_loss, lr=lr,
                       examples_seen=dict(self.seen), sentences_per_s=rate,
                       step_seconds=step_seconds)
        eta = step_seconds * (self.total_steps - self.step)
        log.info("epoch %d/%d step %d/%d | loss %s | %.1f sent/s | elapsed %s | ETA %s",
                 self.epoch, math.ceil(self.total_steps / self.steps_per_epoch), self.step, self.total_steps,
                 " ".join(f"{t} {v:.3f}" for t, v in train_loss.items()), rate,
                 duration(elapsed), duration(eta))
        for t in loss_sums:
            loss_sums[t].zero_()
            loss_counts[t] = 0

    def evaluate(self):
        s = self.setup
        self.nonfinite.check()
        self.last_eval = self.step
        t0 = time.perf_counter()
        metrics = distributed.broadcast_object(  # the ranks hold the same model: rank 0 evaluates
            evaluate(s.model, {n: (s.tasks[n], s.dev[n]) for n in s.tasks}, s.objectives, s.device,
                     s.precision) if distributed.rank() == 0 else None)
        self.run.event("eval", self.step, epoch=self.epoch, dev=metrics, examples_seen=dict(self.seen),
                       eval_seconds=time.perf_counter() - t0)
        log.info("eval at step %d (epoch %d): %s", self.step, self.epoch, format_metrics(metrics))
        s.sampler.observe({t: metrics[s.tasks[t].metric_key] for t in s.train_tasks})
        # the tasks' mean; an undefined Pearson r (constant predictions) counts as 0, not as absent
        scores = [v or 0.0 for k, v in metrics.items() if k not in ("mean", "overall")]
        score = sum(scores) / len(scores)
        if score > self.best["score"]:
            self.best = {"score": score, "metrics": metrics, "epoch": self.epoch, "step": self.step}
            self.run.save_model(s.model, "best", {"epoch": self.epoch, "step": self.step, "dev": metrics})

    # -- resuming -------------------------------------------------------------------------
    LOOP_STATE = ("step", "epoch", "epoch_start", "seen", "skipped", "sentences", "best",
                  "last_eval", "elapsed")

    def state_dict(self) -> dict:
        s = self.setup
        return {
            "config": OmegaConf.to_yaml(self.cfg),
            "loop": {k: getattr(self, k) for k in self.LOOP_STATE},
            "model": s.model.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "streams": {t: stream.state_dict() for t, stream in self.streams.items()},
            "sampler": s.sampler.state_dict(),
            "gradient": s.gradient.state_dict(),
            "data": {t: {split: {k: f[k] for k in ("path", "sha256")} for split, f in splits.items()}
                     for t, splits in s.files.items()},
            "tokenizer": s.tokenizer_digest,
            # every rank's generators: each draws its own dropout masks
            "rng": {"draws": self.draws.get_state(), "epoch_draws": self.epoch_draws,
                    "torch": distributed.gather_object(torch.get_rng_state()),
                    "cuda": distributed.gather_object(
                        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])},
        }

    def load_state_dict(self, state: dict):
        s = self.setup
        for k, v in state["loop"].items():
            setattr(self, k, v)
        if self.best["score"] is None:  # -inf was stored as null
            self.best["score"] = -math.inf
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for t, stream in self.streams.items():
            stream.load_state_dict(state["streams"][t])
        s.sampler.load_state_dict(state["sampler"])
        s.gradient.load_state_dict(state["gradient"])
        self.draws.set_state(state["rng"]["draws"])
        self.epoch_draws = state["rng"]["epoch_draws"]
        torch_rng, cuda_rng = state["rng"]["torch"], state["rng"]["cuda"]
        if isinstance(torch_rng, torch.Tensor):  # saved before every rank's state was kept
            torch_rng, cuda_rng = [torch_rng] * distributed.world_size(), [cuda_rng] * distributed.world_size()
        if len(torch_rng) != distributed.world_size():
            raise ConfigError(f"the run was saved with {len(torch_rng)} process(es); resume it with as many "
                              f"(now {distributed.world_size()})")
        torch.set_rng_state(torch_rng[distributed.rank()])
        if cuda_rng[distributed.rank()]:
            torch.cuda.set_rng_state_all(cuda_rng[distributed.rank()])

    def save_last(self):
        self.nonfinite.check()
        self.run.save_checkpoint(self.state_dict(), "last")

    def resume(self, path: Path):
        state = load_checkpoint(path)
        saved = OmegaConf.create(state["config"])
        changed = sorted(k for k in config_diff(saved, self.cfg) if k not in ("resume", "data.root"))
        if changed:
            raise ConfigError(f"{path} was written with another config (differs at {changed}); "
                              "resume with the original run's overrides")
        self.check_same_data(state.get("data", {}))  # older checkpoints did not record it
        if state.get("tokenizer", self.setup.tokenizer_digest) != self.setup.tokenizer_digest:
            raise ConfigError(f"{path} was trained with another tokenizer than {self.cfg.model.source} "
                              "gives now (its vocabulary or settings changed): resume with the same one")
        self.load_state_dict(state)
        log.info("resumed at step %d of %d", self.step, self.total_steps)

    def check_same_data(self, saved: dict):
        """A resumed run trains on the files it started with: same contents (SHA-256), or it
        refuses, naming the files; the same contents in another folder are fine, and logged."""
        now = self.setup.files
        changed = []
        for task, splits in saved.items():
            for split, before in splits.items():
                after = now.get(task, {}).get(split)
                if after is None or after["sha256"] != before["sha256"]:
                    changed.append(f"{task} {split} was {before['path']} (SHA-256 {before['sha256'][:12]}), now "
                                   + (f"{after['path']} ({after['sha256'][:12]})" if after else "not read"))
        if changed:
            raise DataError("the run would resume on other data than it started on: " + "; ".join(changed)
                            + ". Resume with the data it was trained on: python train.py resume=RUN_DIR "
                            "data.root=FOLDER")
        moved = sorted({str(Path(f["path"]).parent) for splits in saved.values() for f in splits.values()}
                       - {str(Path(f["path"]).parent) for splits in now.values() for f in splits.values()})
        if moved:
            log.warning("resuming on the same files (same SHA-256) in another folder: %s, was %s",
                        self.cfg.data.root, ", ".join(moved))


@contextlib.contextmanager
def stop_signals(trainer: Trainer):
    """SIGTERM (SLURM pre-emption) and SIGINT (Ctrl-C) stop the loop after the current
    step, which then saves `last.pt`; a second Ctrl-C stops at once. Under submitit, its
    requeue signal (USR2) is taken the same way, and submitit's own handler (which
    requeues the job and exits) runs once `last.pt` is saved: nothing is trained twice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if trainer.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.signal = signal.Signals(signum).name
        if callable(previous.get(signum)) and signum == signal.SIGUSR2:
            trainer.after_save = lambda: previous[signum](signum, None)
        log.warning("%s received: stopping after this step and saving checkpoints/last.pt",
                    trainer.signal)

    signals = [signal.SIGTERM, signal.SIGINT]
    if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's requeue handler
        signals.append(signal.SIGUSR2)
    previous = {}
    previous.update({sig: signal.signal(sig, handle) for sig in signals})
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def config_diff(a: DictConfig, b: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose (unresolved) values differ between two configs."""
    a = OmegaConf.to_container(a) if isinstance(a, DictConfig) else a
    b = OmegaConf.to_container(b) if isinstance(b, DictConfig) else b
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in config_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if a != b else []


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: DictConfig, run: RunDir) -> dict:
    """Train one run, continuing from `checkpoints/last.pt` when the run directory has one
    (a resumed or requeued run); returns the results.json fields it owns."""
    trainer = Trainer(cfg, run)
    last = run.checkpoints / "last.pt"
    if checkpoint_exists(last) or cfg.resume:  # an explicit resume without one is an error
        trainer.resume(last)
    run.rewind(trainer.step if trainer.step else -1)
    return trainer.fit()
