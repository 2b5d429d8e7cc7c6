"""What the model gets wrong (paper section 5.3), from a run's best checkpoint.

    python -m mtbert.analyze RUN_DIR [--top 10] [--device auto] [--data-root DIR]

Runs the best checkpoint over the dev rows the run evaluated and writes to `RUN_DIR/analysis/`:
per classification task the confusion matrix (`<task>_confusion.csv`/`.png`) and
per-class precision and recall (`<task>_per_class.csv`); per regression task the scatter
of prediction against gold (`<task>_scatter.png`) and the residual by gold bin
(`<task>_residuals.csv`); for every task the most confident errors with their sentences
(`<task>_errors.csv`: the largest predicted-class probability among wrong predictions, or
the largest absolute error), the metric by sentence-length bin (`<task>_by_length.csv`),
and `summary.md` with all of it in short. The paper picked its three examples by hand;
here the rule picks them, for every task the run evaluated (`trainer.eval_tasks`), of
either kind. The model's modules (torch, transformers, scipy, matplotlib) load where they
are used, so that `--help` and a wrong folder answer at once.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from mtbert import console_logging
from mtbert.data import RejectedRows, Split, Task, read_split
from mtbert.errors import DataError
from mtbert.predict import load_best

LENGTH_BINS = 5  # sentence-length bins, by quantile of the dev set's lengths


def analyze(run_dir: Path, top: int = 10, device: str = "auto", data_root: str | None = None) -> Path:
    cfg, tasks, objectives, encodings, model, tokenizer, dev, precision = load_best(run_dir, device, data_root)
    from mtbert.batching import encode
    from mtbert.config import evaluated_tasks, row_limit
    from mtbert.evaluate import predict

    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    summary = [f"# Error analysis of {run_dir}", "", "From `checkpoints/best.safetensors` on the dev files.", ""]
    for name in evaluated_tasks(cfg, tasks):
        task = tasks[name]
        rows = read_split(task, Path(cfg.data.root).expanduser() / task.files["dev"], RejectedRows("skip"),
                          labelled=True, limit=row_limit(cfg.data.limit.dev, name))  # the run's dev rows
        enc = encode(rows, tokenizer, cfg.data.max_length, encodings[name] == "siamese",
                     cfg.data.cache_dir)
        gold = np.asarray(rows.labels)
        if task.classes:
            probs = predict(model, task, objectives[name], enc, dev, precision,
                            output=objectives[name].probabilities).numpy()
            summary += classification(task, rows, gold, probs, top, out)
        else:
            pred = predict(model, task, objectives[name], enc, dev, precision).numpy()
            summary += regression(task, rows, gold, pred, top, out)
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    return out


def classification(task: Task, rows: Split, gold: np.ndarray, probs: np.ndarray, top: int,
                   out: Path) -> list[str]:
    gold = gold.astype(int)
    pred = probs.argmax(1)
    classes = range(task.classes)
    confusion = np.zeros((task.classes, task.classes), dtype=int)
    np.add.at(confusion, (gold, pred), 1)
    write_csv(out / f"{task.name}_confusion.csv", ["gold \\ predicted", *classes],
              [[c, *confusion[c]] for c in classes])
    plot_confusion(task, confusion, out / f"{task.name}_confusion.png")
    per_class = []
    for c in classes:
        predicted, actual, right = confusion[:, c].sum(), confusion[c].sum(), confusion[c, c]
        per_class.append([c, actual, predicted, ratio(right, predicted), ratio(right, actual)])
    write_csv(out / f"{task.name}_per_class.csv", ["class", "gold", "predicted", "precision", "recall"],
              per_class)
    wrong = np.flatnonzero(pred != gold)
    confidence = probs[np.arange(len(pred)), pred]
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:top]
    errors = [[rows.ids[i], *(t[i] for t in rows.texts), gold[i], pred[i], f"{confidence[i]:.3f}"]
              for i in worst]
    write_csv(out / f"{task.name}_errors.csv", ["id", *task.sentences, "gold", "predicted", "confidence"],
              errors)
    by_length = length_bins(rows, pred == gold, lambda ok: ok.mean())
    write_csv(out / f"{task.name}_by_length.csv", ["words", "examples", "accuracy"], by_length)
    lines = [f"## {task.name}: accuracy {np.mean(pred == gold):.4f} ({len(gold)} examples, "
             f"{len(wrong)} wrong)", "", "Confusion (rows gold, columns predicted):", "",
             "| gold \\ predicted | " + " | ".join(map(str, classes)) + " | recall |",
             "|---|" + "---|" * (task.classes + 1)]
    lines += [f"| {c} | " + " | ".join(map(str, confusion[c])) + f" | {fmt(per_class[c][4])} |"
              for c in classes]
    lines += ["| precision | " + " | ".join(fmt(p[3]) for p in per_class) + " | |", ""]
    lines += [f"Most confident errors (of {top} in {task.name}_errors.csv):", ""]
    lines += [f"- {quote(e[1:1 + len(task.sentences)])}: gold {e[-3]}, predicted {e[-2]} "
              f"with probability {e[-1]}" for e in errors[:3]]
    return lines + ["", length_table(by_length, "accuracy"), ""]


def regression(task: Task, rows: Split, gold: np.ndarray, pred: np.ndarray, top: int,
               out: Path) -> list[str]:
    from scipy import stats

    residual = pred - gold
    r = stats.pearsonr(pred, gold).statistic if np.ptp(pred) > 0 else float("nan")
    plot_scatter(task, gold, pred, r, out / f"{task.name}_scatter.png")
    low, high = task.score_range
    edges = np.linspace(low, high, 6)
    bins = np.clip(np.digitize(gold, edges[1:-1]), 0, len(edges) - 2)
    residuals = [[f"{edges[b]:g}-{edges[b + 1]:g}", int((bins == b).sum()),
                  *(f"{f(residual[bins == b]):+.3f}" if (bins == b).any() else "-" for f in (np.mean, np.median)),
                  f"{np.abs(residual[bins == b]).mean():.3f}" if (bins == b).any() else "-"]
                 for b in range(len(edges) - 1)]
    write_csv(out / f"{task.name}_residuals.csv",
              ["gold", "examples", "mean residual", "median residual", "mean |residual|"], residuals)
    worst = np.argsort(-np.abs(residual), kind="stable")[:top]
    errors = [[rows.ids[i], *(t[i] for t in rows.texts), f"{gold[i]:g}", f"{pred[i]:.3f}"] for i in worst]
    write_csv(out / f"{task.name}_errors.csv", ["id", *task.sentences, "gold", "predicted"], errors)
    by_length = length_bins(rows, np.stack([pred, gold], 1),
                            lambda pg: stats.pearsonr(pg[:, 0], pg[:, 1]).statistic
                            if len(pg) > 1 and np.ptp(pg[:, 0]) > 0 else float("nan"))
    write_csv(out / f"{task.name}_by_length.csv", ["words", "examples", "pearson"], by_length)
    lines = [f"## {task.name}: Pearson r {r:.4f} ({len(gold)} examples)", "",
             "Residual (prediction - gold) by gold score:", "",
             "| gold | examples | mean | median | mean abs |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in residuals]
    lines += ["", f"Largest errors (of {top} in {task.name}_errors.csv):", ""]
    lines += [f"- {quote(e[1:1 + len(task.sentences)])}: gold {e[-2]}, predicted {e[-1]}" for e in errors[:3]]
    return lines + ["", length_table(by_length, "pearson"), ""]


def length_bins(rows: Split, values: np.ndarray, metric) -> list[list]:
    """`metric` of `values` in each quantile bin of the examples' word counts (all
    sentences of an example together)."""
    words = np.array([sum(len(t[i].split()) for t in rows.texts) for i in range(len(rows))])
    edges = np.unique(np.quantile(words, np.linspace(0, 1, LENGTH_BINS + 1)))
    if len(edges) == 1:  # every example has the same length: one bin
        edges = np.repeat(edges, 2)
    bins = np.clip(np.digitize(words, edges[1:-1], right=True), 0, len(edges) - 2)
    return [[f"{int(edges[b]) if b == 0 else int(edges[b]) + 1}-{int(edges[b + 1])}", int((bins == b).sum()),
             f"{metric(values[bins == b]):.4f}"] for b in range(len(edges) - 1) if (bins == b).any()]


def length_table(by_length: list[list], metric: str) -> str:
    return "By length (words): " + ", ".join(f"{w}: {metric} {m} ({n})" for w, n, m in by_length)


def ratio(a, b) -> float | None:
    return a / b if b else None


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def quote(texts: list[str]) -> str:
    return " / ".join(f'"{t}"' for t in texts)


def write_csv(path: Path, header: list, rows: list[list]):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[fmt(v) if isinstance(v, float) or v is None else v for v in row]
                          for row in rows])


def plot_confusion(task: Task, confusion: np.ndarray, path: Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * task.classes + 2, 1.2 * task.classes + 1.5), layout="constrained")
    ax = fig.subplots()
    normalised = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for (g, p), n in np.ndenumerate(confusion):
        ax.text(p, g, str(n), ha="center", va="center",
                color="white" if normalised[g, p] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="gold", xticks=range(task.classes), yticks=range(task.classes),
           title=f"{task.name} dev confusion, {confusion.sum():,} examples (colour: share of the gold class)")
    fig.savefig(path, dpi=120)


def plot_scatter(task: Task, gold: np.ndarray, pred: np.ndarray, r: float, path: Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(gold, pred, s=6, alpha=0.4)
    low, high = task.score_range
    ax.plot([low, high], [low, high], color="gray", ls="--", lw=1)
    ax.set(xlabel="gold", ylabel="predicted", title=f"{task.name} dev, {len(gold):,} examples: Pearson r {r:.3f}")
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=10, help="errors listed per task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None, help="override the run's data.root")
    args = parser.parse_args(argv)
    console_logging()
    try:
        out = analyze(args.run_dir, args.top, args.device, args.data_root)
    except (FileNotFoundError, DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print((out / "summary.md").read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
