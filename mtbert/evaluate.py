"""Dev metrics: accuracy, Pearson r (scipy), the paper's mean and the CS224N overall score."""

from __future__ import annotations

import logging
import math

import torch
from scipy.stats import pearsonr

from mtbert.batching import Encoded, eval_batches
from mtbert.data import Task
from mtbert.device import autocast
from mtbert.losses import Objective
from mtbert.memory import release_memory
from mtbert.meters import Progress
from mtbert.paper import PAPER_METRICS

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model, task: Task, objective: Objective, enc: Encoded, device, precision: str,
            max_tokens: int = 16384, output=None, label: str = "predicting",
            log_every: float | None = 20.0) -> torch.Tensor:
    """Predictions for every example of `enc`, in file order (batches run in length order);
    `output` (default `objective.predict`) turns the head's output into them. A progress
    line every `log_every` seconds (`label`, the task, examples done, ETA)."""
    output = output or objective.predict
    was_training = model.training
    model.eval()
    predictions, order = [], []
    progress = Progress(f"{label} {task.name}", float(enc.offsets[-1]), len(enc), log_every, log)  # in tokens
    for batch in eval_batches(enc, max_tokens):
        with autocast(device, precision):
            head = model(task.name, batch.to(device))
        predictions.append(output(head, task).float())
        order.append(batch.index)
        progress.advance(float(batch.attention_mask.sum()), len(batch.index))  # the host's copy: no device sync
        if torch.device(device).type == "cpu":  # each batch is wider than the last: glibc would keep the narrower ones' blocks
            release_memory()
    model.train(was_training)
    predictions = torch.cat(predictions).cpu()  # the one wait for the device
    out = torch.empty(len(enc), *predictions.shape[1:])
    out[torch.cat(order)] = predictions
    return out


def score(task: Task, predictions: torch.Tensor, labels: torch.Tensor) -> float | None:
    if task.metric == "acc":
        return (predictions == labels).float().mean().item()
    if len(predictions) < 2 or predictions.std() == 0:
        why = "fewer than 2 examples" if len(predictions) < 2 else "constant predictions"
        log.warning("%s: %s, Pearson r is undefined (recorded as null)", task.name, why)
        return None
    r = float(pearsonr(predictions.numpy(), labels.numpy()).statistic)
    if not math.isfinite(r):  # non-finite predictions
        log.warning("%s: Pearson r is not finite (recorded as null)", task.name)
        return None
    return r


def summarize(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Add `mean` (the paper's average of the three) and `overall` (CS224N's, with STS
    rescaled to [0, 1]); both null unless all three paper metrics are known."""
    values = [metrics.get(k) for k in PAPER_METRICS]
    if any(v is None or math.isnan(v) for v in values):
        return {**metrics, "mean": None, "overall": None}
    sst, para, sts = values
    return {**metrics, "mean": (sst + para + sts) / 3, "overall": (sst + para + (sts + 1) / 2) / 3}


def selection_score(metrics: dict[str, float | None]) -> float:
    """What picks a run's best evaluation (its `dev` in results.json, best.safetensors):
    the mean of every evaluated task's metric, the paper's `mean` for its three tasks,
    and defined for any set of tasks. An undefined Pearson r (constant predictions)
    counts as 0, not as absent."""
    scores = [v or 0.0 for k, v in metrics.items() if k not in ("mean", "overall")]
    return sum(scores) / len(scores)


def evaluate(model, dev: dict[str, tuple[Task, Encoded]], objectives: dict[str, Objective],
             device, precision: str, label: str = "evaluating", log_every: float | None = 20.0) -> dict[str, float | None]:
    metrics = {}
    for name, (task, enc) in dev.items():
        predictions = predict(model, task, objectives[name], enc, device, precision, label=label, log_every=log_every)
        metrics[task.metric_key] = score(task, predictions, enc.labels)
    return summarize(metrics)


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in metrics.items())


def format_table(metrics: dict | None) -> str:
    """The dev scores as a small aligned table for the terminal."""
    if not metrics:
        return "no dev scores (the run did not complete an evaluation)"
    width = max(len(k) for k in metrics)
    rows = [f"{'dev metric':<{width}}  score", f"{'-' * width}  -----"]
    rows += [f"{k:<{width}}  {v:.4f}" if v is not None else f"{k:<{width}}  n/a"
             for k, v in metrics.items()]
    return "\n".join(rows)
