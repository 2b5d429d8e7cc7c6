"""The training loop: sampler -> task batches -> losses -> gradient method -> optimizer step.

Everything a run needs is built, and checked, by `mtbert.build.Setup` before the first
step; this module runs the steps and keeps the loop's state for resuming.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtbert import distributed
from mtbert.batching import Batch
from mtbert.build import Setup
from mtbert.compat import current_state
from mtbert.device import autocast
from mtbert.diagnostics import conflict_summary, plot_grad_conflict
from mtbert.evaluate import evaluate, format_metrics, selection_score
from mtbert.guards import Interrupted, NonFiniteLoss, NonFiniteWatch, StopSignals, nonfinite_tasks
from mtbert.memory import release_memory
from mtbert.meters import Clock, Every, LossMeter, duration
from mtbert.resume import check_resumable, rank_generators, restore_rank_generators
from mtbert.scaling import scaled_step, step_gradients
from mtbert.rundir import RunDir, checkpoint_exists, load_checkpoint, load_model_weights

log = logging.getLogger(__name__)


class Trainer:
    """The loop of one run and all of its state; `state_dict()` is what resuming needs.

    Steps are planned per epoch by the sampler; every stream is reshuffled at each epoch
    start. A resumed run restores the streams, the epoch's draw generator (replaying the
    plan up to the step it stopped at) and every RNG, so it continues exactly.
    """

    def __init__(self, cfg: DictConfig, run: RunDir, reads=None):
        self.cfg, self.run, self.tcfg = cfg, run, cfg.trainer
        s = self.setup = Setup(cfg, run, reads)
        self.streams = s.streams
        self.draws = torch.Generator().manual_seed(cfg.seed)  # for samplers that draw tasks
        self.sizes, self.steps_per_epoch, self.total_steps = s.sizes, s.steps_per_epoch, s.total_steps
        self.eval_every_steps, self.eval_every = s.eval_every_steps, s.eval_every
        # what chooses the checkpoint: the held-out rows of the training files, or the dev sets themselves
        self.selected_on = "validation" if s.validation else "dev"
        self.scheduler = s.schedule.lr_scheduler(s.optimizer, self.total_steps)
        # what more than one task reaches goes to the gradient method; a task's own (its head, and
        # its own layers, adapter or gate with `sharing`) gets that task's gradient alone
        self.shared = s.model.shared_parameters()
        self.own = s.model.task_parameters()
        self.heads = [p for params in self.own.values() for p in params]
        self.grad_every = cfg.diagnostics.grad_every  # log task-gradient conflict every N steps
        # the loop's state
        self.step, self.epoch, self.epoch_start = 0, 1, 0
        self.epoch_draws = self.draws.get_state()
        self.seen = {t: 0 for t in s.train_tasks}
        self.skipped = 0  # batches skipped for a non-finite loss
        self.overflows = 0  # fp16 steps the loss scaler skipped (a gradient overflowed; the scale backed off)
        self.sentences = 0
        self.best = {"score": -math.inf, "metrics": None, "epoch": None, "step": None}
        self.last_eval = None
        self.eval_seconds = None  # how long the last evaluation took (for the ETA)
        self.latest = None  # the last evaluation's metrics
        self.dev, self.dev_last = None, None  # the dev scores of the chosen and the last checkpoint
        self.elapsed = 0.0  # training seconds, those before a resume included
        self.encoder_on = None  # the schedule's phase the model is in; set at the first step
        self.nonfinite = NonFiniteWatch(s.train_tasks, s.device)
        self.on_eval = None  # (step, dev metrics) -> stop now?, after each evaluation but the last

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
        diagnose = bool(self.grad_every) and self.step % self.grad_every == 0
        shared = [p for p in self.shared if p.requires_grad]
        if self.tcfg.accumulate == 1 and s.weighting.reweights:  # weights from every task's loss: all graphs at once
            losses = self.task_losses(batches)
            if not self.finite(losses):
                return {}
            grads = s.gradient.collect(self.scaled(s.weighting.weigh(losses)), shared, self.heads, diagnose)
        else:
            step = self.accumulated if self.tcfg.accumulate > 1 else self.by_task
            losses, grads = step(batches, shared, diagnose)
            if not self.finite(losses):
                return {}
        self.update(grads, shared, diagnose, batches)
        return {t: loss.detach() for t, loss in losses.items()}

    def finite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether the step goes on: the losses are noted for the non-finite check (with
        `on_nonfinite=error`, made at the next check without waiting for the device), or, with
        `skip`, a step with a non-finite loss is skipped and counted here."""
        if self.tcfg.on_nonfinite == "error":
            self.nonfinite.note(self.step, {t: loss.detach() for t, loss in losses.items()})
            return True
        if bad := nonfinite_tasks(losses):
            self.setup.optimizer.zero_grad(set_to_none=True)
            self.skip(bad)
            return False
        return True

    def by_task(self, batches: dict[str, Batch], shared: list, diagnose: bool):
        """The step's task losses and gradients, each task's backward run before the next
        task's forward (`GradientMethod.collect_by_task`): one task's activations in memory at
        a time, the same gradients. For weightings whose weights are all 1."""
        losses = {}

        def each_task():
            for n, (t, batch) in enumerate(batches.items()):
                if n and self.setup.device.type == "cpu":  # glibc would keep the task before's activations' pages
                    release_memory()
                losses.update(self.task_losses({t: batch}))
                yield self.scaled({t: losses[t]})

        grads = self.setup.gradient.collect_by_task(each_task(), list(batches), shared, self.heads, diagnose)
        return losses, grads

    def scaled(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fp16: the losses times the loss scale, so that small gradients survive in fp16."""
        scaler = self.setup.scaler
        return losses if scaler is None else {t: scaler.scale(loss) for t, loss in losses.items()}

    def accumulated(self, batches: dict[str, Batch], shared: list, diagnose: bool):
        """The step's whole-batch task losses and gradients, from `trainer.accumulate`
        micro-batches of each task's batch (less memory, the same update). Where the gradient
        method combines task gradients or the weighting scales them, each task's gradient is
        accumulated apart, and the weights come from the whole batch's losses."""
        s = self.setup
        parts = {t: batch.split(self.tcfg.accumulate) for t, batch in batches.items()}
        totals = {}

        def micro_losses():
            for m in range(max(map(len, parts.values()))):
                losses = self.task_losses({t: p[m] for t, p in parts.items() if m < len(p)})
                for t, loss in losses.items():
                    totals[t] = totals[t] + loss.detach() if t in totals else loss.detach()
                yield self.scaled(losses)

        per_task = diagnose or s.weighting.reweights or not s.gradient.sums(batches)
        grads = s.gradient.accumulate(micro_losses(), list(batches), shared, self.heads, per_task)
        weights = s.weighting.weigh_accumulated(totals, grads)
        if weights is not None:
            grads.scale(weights)
            for t, w in zip(batches, weights):
                for p in self.own[t]:
                    if p.grad is not None:
                        p.grad.mul_(w)
        return totals, grads

    def update(self, grads, shared: list, diagnose: bool, batches: dict[str, Batch]):
        """Combine the task gradients and step the optimizer (under fp16, only if the scaler
        finds the gradients finite), then the LR schedule and the loss weighting."""
        s = self.setup
        diagnostics = None

        def apply():
            nonlocal diagnostics
            diagnostics = s.gradient.apply(grads, diagnose)
            s.optimizer.step()

        taken = True
        if s.scaler is None:
            apply()
        else:
            taken = scaled_step(s.scaler, step_gradients(grads, shared, self.heads), apply)
        if diagnostics:
            self.run.event("grad", self.step, **diagnostics, loss_weights=s.weighting.logged())
        with warnings.catch_warnings():  # an overflow skipped the optimizer step: the schedule keeps to the count
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        if taken:
            s.regularizer.after_step()
            s.weighting.after_step(lambda: self.task_losses(batches))
        else:
            self.overflows += 1

    def skip(self, bad: list[str]):
        """Skip the step (on_nonfinite=skip): counted, and the LR schedule keeps to the step count."""
        log.warning("step %d: non-finite loss for %s, batch skipped", self.step, bad)
        self.skipped += 1
        limit = self.tcfg.get("max_skipped", 0.1)
        if self.skipped > limit * self.total_steps:
            raise NonFiniteLoss(f"{self.skipped} steps skipped for non-finite losses, more than "
                                f"trainer.max_skipped={limit} of the run's {self.total_steps}; lower the learning rates")
        with warnings.catch_warnings():  # torch warns if no optimizer step came yet: none is meant
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()

    def task_losses(self, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch with the regularizer's term, times its lambda_t
        (eq. 1) and its share of the global batch (1 in a single process)."""
        s = self.setup
        losses = {}
        for t, batch in batches.items():
            with autocast(s.device, s.precision):
                output = s.model(t, batch)
            loss = s.objectives[t].loss(output, batch.labels, s.tasks[t])
            loss = s.regularizer.regularize(loss, t, batch, output, s.objectives[t], self.step)
            share = len(batch.index) * distributed.world_size() / batch.global_size
            losses[t] = s.weights[t] * share * loss
        return losses

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Steps until the plan ends, `trainer.max_seconds` passes or a signal comes. What a
        rank's clock or signals decide (log, save, stop, time up) is agreed by every rank in
        one all-reduce per step, since each of them leads to a collective (a gather of the
        ranks' generators, an evaluation's broadcast). Longer than 40 lines on purpose: a
        step's decisions and the run's end are read top to bottom, in the order they happen."""
        s = self.setup
        log.info("training %s on %s (%s): %d steps, %d per epoch; batches per pass %s; checkpoint chosen on %s",
                 "+".join(s.train_tasks), s.device, s.precision, self.total_steps,
                 self.steps_per_epoch, self.sizes, self.selection_name())
        meter, clock = LossMeter(s.train_tasks, s.device), Clock(self.elapsed, self.step)
        log_every, save_every = Every(self.tcfg.log_every_seconds), Every(self.tcfg.checkpoint_every_seconds)
        s.model.train()
        with StopSignals() as stop:
            for step_tasks in self.planned_steps():
                self.set_phase()
                batches = self.next_batches(step_tasks)
                meter.add(self.training_step(batches))
                if s.device.type == "cpu":  # glibc keeps the step's activations: 150 MiB off fp32's peak for 2% of a step
                    release_memory()
                self.count(batches)
                self.elapsed = clock.elapsed()
                due = distributed.agree(log=log_every.due(), save=save_every.due(), stop=stop.received is not None,
                                        time_up=self.time_up())
                done = self.step == self.total_steps or due["time_up"]
                if due["time_up"]:
                    log.info("trainer.max_seconds=%s reached at step %d", self.tcfg.max_seconds, self.step)
                if due["log"] or done:
                    log_every.restart()
                    self.log_progress(meter, clock.step_seconds(self.step))
                if self.eval_due() or done:
                    done = self.evaluate(last=done) or done
                if due["stop"] or due["save"]:
                    save_every.restart()
                    self.save_last()
                if due["stop"]:
                    stop.after_save()
                    raise Interrupted(f"stopped by {stop.received or 'another rank'} at step {self.step}; "
                                      f"resume with: {distributed.launch_command()} resume={self.run.path}",
                                      self.results())
                if done:
                    break
            if self.last_eval != self.step:  # a signal now waits for the final save
                self.evaluate(last=True)
            self.elapsed = clock.elapsed()
            self.save_last()
            if distributed.agree(stop=stop.received is not None)["stop"]:  # the dev report is left to a resume
                stop.after_save()
                raise Interrupted(f"stopped by {stop.received or 'another rank'} after the last step, before the dev "
                                  f"report; resume with: {distributed.launch_command()} resume={self.run.path}",
                                  self.results())
        self.report_dev()  # a signal here stops at once (run.py's handler): last.pt holds the whole run
        if self.grad_every:
            plot_grad_conflict(self.run.path)
            conflict_summary(self.run.path)
        return self.results()

    def planned_steps(self):
        """The tasks of each step, as the sampler plans them epoch by epoch: every stream
        is reshuffled at an epoch's start; a run resumed mid-epoch replays the epoch's
        draws up to the step it stopped at. The caller advances `self.step`."""
        while self.step < self.total_steps:
            if self.step == self.epoch_start:  # a fresh epoch
                for stream in self.streams.values():
                    stream.restart()
                self.epoch_draws = self.draws.get_state()
            else:  # resumed mid-epoch
                self.draws.set_state(self.epoch_draws)
            plan = self.setup.sampler.epoch(self.sizes, self.draws, self.epoch_start, self.total_steps)
            yield from itertools.islice(plan, self.step - self.epoch_start, None)
            self.setup.weighting.end_epoch()
            self.epoch += 1
            self.epoch_start = self.step

    def set_phase(self):
        """The schedule's phase at this step: encoder and heads trained, or heads alone."""
        trains_encoder = self.setup.schedule.trains_encoder(self.step, self.total_steps)
        if trains_encoder != self.encoder_on:
            self.setup.model.set_encoder_trainable(trains_encoder)
            self.encoder_on = trains_encoder
            log.info("step %d: %s", self.step, "training encoder and heads" if trains_encoder
                     else f"{self.setup.model.sharing.frozen}, training heads")

    def count(self, batches: dict[str, Batch]):
        """One step done: its examples and sentences, over all processes."""
        self.step += 1
        for t, batch in batches.items():
            self.seen[t] += batch.global_size
            self.sentences += batch.num_sequences * distributed.world_size()

    def time_up(self) -> bool:
        """`trainer.max_seconds` of training reached (on this rank's clock: `fit` agrees it)."""
        return self.tcfg.max_seconds is not None and self.elapsed >= self.tcfg.max_seconds

    def results(self) -> dict:
        """The results.json fields the loop owns, as far as it has come."""
        s = self.setup
        on_dev = self.selected_on == "dev"
        return {"dev": self.best["metrics"] if on_dev else self.dev,
                "dev_last": self.latest if on_dev else self.dev_last,
                "validation": None if on_dev else self.best["metrics"], "selected_on": self.selected_on,
                "best_epoch": self.best["epoch"],
                "best_step": self.best["step"], "steps": self.step, "examples_seen": dict(self.seen),
                "skipped_steps": self.skipped, "overflow_steps": self.overflows, "train_seconds": self.elapsed,
                "device": s.device.type, "precision": s.precision, "provenance": s.provenance, "data": s.files,
                "tokenizer": s.tokenizer_digest, "parameters": s.parameter_counts}

    def eval_due(self) -> bool:
        """Every `trainer.eval_every_steps` steps when set (the same points for every
        sampler), else `evals_per_epoch` times in each epoch, the last at its end."""
        if self.eval_every_steps:
            return self.step % self.eval_every_steps == 0
        in_epoch = self.step - self.epoch_start
        return in_epoch % self.eval_every == 0 or in_epoch == self.steps_per_epoch

    def log_progress(self, meter: LossMeter, step_seconds: float):
        """One progress line and one `train` event; the only host sync of the loop."""
        self.nonfinite.check()
        train_loss = meter.read()
        lr = {g["name"]: g["lr"] for g in self.setup.optimizer.param_groups}
        rate = self.sentences / max(self.elapsed, 1e-9)
        terms = self.setup.regularizer.logged()  # {term: {task: mean}}, e.g. SMART's
        self.run.event("train", self.step, epoch=self.epoch, loss=train_loss, lr=lr,
                       examples_seen=dict(self.seen), sentences_per_s=rate,
                       step_seconds=step_seconds, overflow_steps=self.overflows, **terms)
        eta = step_seconds * (self.total_steps - self.step) + self.evaluations_left()
        log.info("epoch %d/%d step %d/%d | loss %s | %.1f sent/s | elapsed %s | ETA %s",
                 self.epoch, math.ceil(self.total_steps / self.steps_per_epoch), self.step, self.total_steps,
                 " ".join(f"{t} {v:.3f}" for t, v in train_loss.items())
                 + "".join(f" | {name} " + " ".join(f"{t} {v:.3g}" for t, v in means.items())
                           for name, means in terms.items())
                 + (f" | {self.overflows} fp16 overflow(s) skipped" if self.overflows else ""), rate,
                 duration(self.elapsed), duration(eta))

    def selection_name(self) -> str:
        return "the held-out validation rows (data.validation)" if self.selected_on == "validation" \
            else "the dev sets (data.validation=null)"

    def scores(self, split: dict, label: str) -> dict:
        """Metrics on `split` (task -> (task, encoded rows)), computed by rank 0 for all: the
        ranks hold the same model."""
        s = self.setup
        return distributed.broadcast_object(
            evaluate(s.model, split, s.objectives, s.device, s.precision, label=f"evaluating {label}",
                     log_every=self.tcfg.log_every_seconds) if distributed.rank() == 0 else None)

    def evaluations_left(self) -> float:
        """Seconds the evaluations still to come will take, from the last one's time: those
        of the loop, and the dev report at the end (the dev sets' size over the held-out
        rows', twice). Unknown before the first evaluation: 0."""
        if self.eval_seconds is None:
            return 0.0
        due = self.eval_every_steps or self.eval_every
        points = math.ceil((self.total_steps - self.step) / due)
        report = 0.0
        if self.selected_on == "validation":
            size = lambda split: sum(len(enc) for _, enc in split.values())  # noqa: E731
            report = 2 * self.eval_seconds * size(self.setup.dev) / size(self.setup.validation)
        return points * self.eval_seconds + report

    def evaluate(self, last: bool = False) -> bool:
        """Evaluate on the split that chooses the checkpoint (the held-out rows, or dev with
        `data.validation=null`), keep the best; True if `on_eval` asks to stop (a pruned trial
        of `mtbert.tune`). The run's last evaluation does not ask: there is nothing left to
        stop, and a run that reached its end is complete."""
        s = self.setup
        self.nonfinite.check()
        self.last_eval = self.step
        t0 = time.perf_counter()
        metrics = self.latest = self.scores(s.validation or s.dev, self.selected_on)
        self.eval_seconds = time.perf_counter() - t0
        self.run.event("eval", self.step, epoch=self.epoch, **{self.selected_on: metrics},
                       examples_seen=dict(self.seen), eval_seconds=self.eval_seconds)
        log.info("%s at step %d (epoch %d): %s", self.selected_on, self.step, self.epoch, format_metrics(metrics))
        s.sampler.observe({t: metrics[s.tasks[t].metric_key] for t in s.train_tasks})
        score = selection_score(metrics)
        if score > self.best["score"]:
            self.best = {"score": score, "metrics": metrics, "epoch": self.epoch, "step": self.step}
            self.run.save_model(s.model, "best", {"epoch": self.epoch, "step": self.step, self.selected_on: metrics})
        self.run.update_results(self.results())  # the best so far, while the run is still running
        return bool(self.on_eval and not last and self.on_eval(self.step, metrics))

    def report_dev(self):
        """The dev scores of the last and of the chosen checkpoint, once training is over:
        with a held-out split, the only time the dev sets are read."""
        if self.selected_on == "dev":
            return
        s = self.setup
        self.dev_last = self.scores(s.dev, "dev (last checkpoint)")
        if self.best["step"] == self.step:
            self.dev = self.dev_last
        else:
            if distributed.rank() == 0:
                load_model_weights(s.model, self.run.checkpoints / "best.safetensors")
            self.dev = self.scores(s.dev, "dev (chosen checkpoint)")
        self.run.event("dev", self.step, best_step=self.best["step"], dev=self.dev, dev_last=self.dev_last)
        log.info("dev at the chosen step %d: %s", self.best["step"], format_metrics(self.dev))
        log.info("dev at the last step %d: %s", self.step, format_metrics(self.dev_last))

    # -- resuming -------------------------------------------------------------------------
    LOOP_STATE = ("step", "epoch", "epoch_start", "seen", "skipped", "overflows", "sentences", "best",
                  "last_eval", "latest", "elapsed")

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
            "weighting": s.weighting.state_dict(),
            "regularizer": s.regularizer.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "data": {t: {split: {k: f[k] for k in ("path", "sha256")} for split, f in splits.items()}
                     for t, splits in s.files.items()},
            "tokenizer": s.tokenizer_digest,
            "rng": {"draws": self.draws.get_state(), "epoch_draws": self.epoch_draws, **rank_generators()},
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
        s.weighting.load_state_dict(state["weighting"])
        s.regularizer.load_state_dict(state["regularizer"])
        if s.scaler is not None:
            s.scaler.load_state_dict(state["scaler"])
        self.draws.set_state(state["rng"]["draws"])
        self.epoch_draws = state["rng"]["epoch_draws"]
        restore_rank_generators(state["rng"])

    def restate(self, state: dict) -> dict:
        """A checkpoint of an earlier mtbert in today's format (`mtbert.compat.current_state`)."""
        s = self.setup
        return current_state(state, {"gradient": s.gradient, "weighting": s.weighting, "regularizer": s.regularizer},
                             s.tokenizer_digest)

    def save_last(self):
        self.nonfinite.check()
        self.run.save_checkpoint(self.state_dict(), "last")

    def resume(self, path: Path):
        s = self.setup
        state = self.restate(load_checkpoint(path))
        check_resumable(state, path, self.cfg, s.files, s.tokenizer_digest)
        self.load_state_dict(state)
        log.info("resumed at step %d of %d", self.step, self.total_steps)


def train(cfg: DictConfig, run: RunDir, on_eval=None, reads=None) -> dict:
    """Train one run, continuing from `checkpoints/last.pt` when the run directory has one
    (a resumed or requeued run); returns the results.json fields it owns. `on_eval(step,
    metrics)` is called after each evaluation but the last; a true return ends the run there.
    `reads`: the run's tasks and files (a mtbert.checks.Reads), where the caller has decided them."""
    trainer = Trainer(cfg, run, reads)
    trainer.on_eval = on_eval
    last = run.checkpoints / "last.pt"
    if checkpoint_exists(last) or cfg.resume:  # an explicit resume without one is an error
        trainer.resume(last)
    run.rewind(trainer.step if trainer.step else -1)
    return trainer.fit()
