"""The training loop: sampler -> task batches -> losses -> gradient method -> optimizer step.

Everything a run needs is built (and every config value checked) in `Setup` before the
first step, so a bad choice fails in seconds, naming its key.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtbert.batching import TaskStream, encode
from mtbert.data import DATA_HELP, DataError, RejectedRows, Task, read_split
from mtbert.device import autocast, resolve_device, resolve_precision
from mtbert.diagnostics import plot_grad_conflict
from mtbert.evaluate import evaluate, format_metrics
from mtbert.losses import default_objective
from mtbert.model import MultitaskBert, load_tokenizer
from mtbert.rundir import RunDir

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
        torch.manual_seed(cfg.seed)
        self.tasks, self.objectives, self.model, self.tokenizer = build_network(cfg)
        self.sampler = instantiate(cfg.sampler, _convert_="all")
        self.train_tasks = self.sampler.tasks or list(self.tasks)
        check_task_names(self.train_tasks, self.tasks, "sampler.tasks")
        weights = dict(cfg.loss.get("weights") or {})
        check_task_names(weights, self.tasks, "loss.weights")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.train_tasks}
        self.schedule = instantiate(cfg.schedule, _convert_="all")
        self.gradient = instantiate(cfg.optim.gradient, _convert_="all", seed=cfg.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.precision = resolve_precision(cfg.trainer.precision, self.device)
        self.model.to(self.device)
        self.optimizer = instantiate(cfg.optim.optimizer)(
            param_groups(self.model, cfg.optim.lr, self.tasks))
        self.train, self.dev = self._load_data()

    def _load_data(self):
        cfg = self.cfg.data
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root={root} is not a directory. {DATA_HELP}")
        rejected = RejectedRows(cfg.bad_rows)
        train, dev = {}, {}
        try:
            for split, labelled_splits, names in (("train", train, self.train_tasks),
                                                   ("dev", dev, list(self.tasks))):
                for name in names:
                    task = self.tasks[name]
                    rows = read_split(task, root / task.files[split], rejected, labelled=True,
                                      limit=row_limit(cfg.limit[split], name))
                    labelled_splits[name] = encode(rows, self.tokenizer, cfg.max_length,
                                                   self.model.encodings[name] == "siamese", cfg.cache_dir)
        finally:
            if rejected.rows:
                rejected.write(self.run.path / "rejected_rows.tsv")
        return train, dev


def train(cfg: DictConfig, run: RunDir) -> dict:
    """Train one run; returns the results.json fields it owns."""
    s = Setup(cfg, run)
    tcfg = cfg.trainer
    model, optimizer, tasks = s.model, s.optimizer, s.tasks
    streams = {
        t: TaskStream(s.train[t], cfg.data.batch_size,
                      torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(t.encode())),
                      tcfg.bucket_batches, s.tokenizer.pad_token_id)
        for t in s.train_tasks
    }
    draws = torch.Generator().manual_seed(cfg.seed)  # for samplers that draw tasks
    sizes = {t: len(streams[t]) for t in s.train_tasks}
    steps_per_epoch = s.sampler.steps_per_epoch(sizes)
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    if total_steps < 1:
        raise ConfigError("the run has no optimizer steps: check trainer.epochs and trainer.max_steps")
    eval_every = max(1, math.ceil(steps_per_epoch / tcfg.evals_per_epoch))
    scheduler = s.schedule.lr_scheduler(optimizer, total_steps)
    shared = list(model.encoder.parameters()) + list(model.shared.parameters())
    grad_every = cfg.diagnostics.grad_every  # log the task gradients' conflict every that many steps
    log.info("training %s on %s (%s): %d steps, %d per epoch; batches per pass %s",
             "+".join(s.train_tasks), s.device, s.precision, total_steps, steps_per_epoch, sizes)

    seen = Counter({t: 0 for t in s.train_tasks})
    best = {"score": -math.inf, "metrics": None, "epoch": None, "step": None}
    loss_sums = {t: torch.zeros((), device=s.device) for t in s.train_tasks}
    loss_counts = Counter()
    sentences = 0
    step, start = 0, time.perf_counter()
    last_log = start
    model.train()

    last_eval = None

    def run_eval(epoch: int):
        nonlocal best, last_eval
        last_eval = step
        t0 = time.perf_counter()
        metrics = evaluate(model, {n: (tasks[n], s.dev[n]) for n in tasks}, s.objectives,
                           s.device, s.precision)
        run.event("eval", step, epoch=epoch, dev=metrics, examples_seen=dict(seen),
                  eval_seconds=time.perf_counter() - t0)
        log.info("eval at step %d (epoch %d): %s", step, epoch, format_metrics(metrics))
        s.sampler.observe({t: metrics[tasks[t].metric_key] for t in s.train_tasks})
        known = [v for k, v in metrics.items() if k not in ("mean", "overall") and v is not None]
        score = sum(known) / len(known) if known else -math.inf
        if score > best["score"]:
            best = {"score": score, "metrics": metrics, "epoch": epoch, "step": step}
            run.save_model(model, "best", {"epoch": epoch, "step": step, "dev": metrics})

    encoder_on = None
    stop = False
    for epoch in range(1, tcfg.epochs + 1):
        for stream in streams.values():
            stream.restart()
        for step_tasks in s.sampler.epoch(sizes, draws, step, total_steps):
            trains_encoder = s.schedule.trains_encoder(step, total_steps)
            if trains_encoder != encoder_on:
                model.set_encoder_trainable(trains_encoder)
                encoder_on = trains_encoder
                log.info("step %d: %s", step, "training encoder and heads" if trains_encoder
                         else "encoder frozen, training heads")
            losses = {}
            for t in step_tasks:
                batch = streams[t].next().to(s.device, non_blocking=True)
                with autocast(s.device, s.precision):
                    output = model(t, batch)
                losses[t] = s.weights[t] * s.objectives[t].loss(output, batch.labels, tasks[t])
                seen[t] += len(batch.index)
                sentences += batch.num_sequences
            diagnostics = s.gradient.backward(losses, [p for p in shared if p.requires_grad],
                                              diagnose=bool(grad_every) and step % grad_every == 0)
            if diagnostics:
                run.event("grad", step, **diagnostics)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for t, loss in losses.items():
                loss_sums[t] += loss.detach()
                loss_counts[t] += 1

            now = time.perf_counter()
            timed_out = tcfg.max_seconds is not None and now - start >= tcfg.max_seconds
            if now - last_log >= tcfg.log_every_seconds or step == total_steps or timed_out:
                rate = sentences / (now - start)
                eta = (now - start) / step * (total_steps - step)
                train_loss = {t: (loss_sums[t] / loss_counts[t]).item()
                              for t in s.train_tasks if loss_counts[t]}
                run.event("train", step, epoch=epoch, loss=train_loss,
                          lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                          examples_seen=dict(seen), sentences_per_s=rate,
                          step_seconds=(now - start) / step)
                log.info("epoch %d/%d step %d/%d | loss %s | %.1f sent/s | elapsed %s | ETA %s",
                         epoch, tcfg.epochs, step, total_steps,
                         " ".join(f"{t} {v:.3f}" for t, v in train_loss.items()), rate,
                         duration(now - start), duration(eta))
                for t in loss_sums:
                    loss_sums[t].zero_()
                loss_counts.clear()
                last_log = now
            if step % eval_every == 0 or step == total_steps:
                run_eval(epoch)
            if timed_out and step < total_steps:
                log.info("trainer.max_seconds=%s reached at step %d", tcfg.max_seconds, step)
                stop = True
            if step >= total_steps or stop:
                break
        if step >= total_steps or stop:
            break
    if last_eval != step:
        run_eval(epoch)
    if grad_every:
        plot_grad_conflict(run.path)

    return {"dev": best["metrics"], "best_epoch": best["epoch"], "best_step": best["step"],
            "steps": step, "examples_seen": dict(seen),
            "train_seconds": time.perf_counter() - start}


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
