"""The report's figures: each row's metrics with their intervals and the paper's values
(bars.png), every seed's value (seeds.png), and the evaluations that chose the checkpoints
(curves.png). matplotlib loads only when a figure is drawn."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from mtbert.paper import label
from mtbert.report.runs import Job
from mtbert.rundir import read_events


def plot_bars(rows: list[dict], keys: list[str], path: Path):
    """Each metric per row: the seed mean with its 95% t-interval, the paper's value marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4.5), sharey=False)
    x = range(len(rows))
    for ax, key in zip(axes, keys):
        values = [r[key] if r[key] is not None else math.nan for r in rows]
        errors = [[max(0.0, v - r[f"{key}_low"]) if r[f"{key}_low"] is not None else 0 for v, r in zip(values, rows)],
                  [max(0.0, r[f"{key}_high"] - v) if r[f"{key}_high"] is not None else 0 for v, r in zip(values, rows)]]
        ax.bar(x, values, yerr=errors, capsize=4, color="tab:blue", label="mtbert (95% CI)")
        paper = [r[f"{key}_paper"] if r[f"{key}_paper"] is not None else math.nan for r in rows]
        if not all(math.isnan(p) for p in paper):  # a legend entry only where the paper has a number
            ax.scatter(x, paper, color="tab:red", marker="_", s=400, zorder=3, label="paper")
        ax.set_xticks(list(x), [r["row"] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(label(key))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_seeds(rows: list[dict], keys: list[str], path: Path):
    """Each seed's value per row and metric (a strip plot), colour by seed, so a reader sees
    whether a gap between rows holds seed by seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({s for r in rows for k in keys for s in r[f"{k}_seeds"]})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4.5))
    for ax, key in zip(axes, keys):
        for x, r in enumerate(rows):
            for i, (seed, value) in enumerate(r[f"{key}_seeds"].items()):
                offset = (i - (len(r[f"{key}_seeds"]) - 1) / 2) * 0.08
                ax.scatter(x + offset, value, color=colours[seed], s=18, zorder=3, label=f"seed {seed}")
            if r[key] is not None:
                ax.hlines(r[key], x - 0.25, x + 0.25, color="black", lw=1)
        ax.set_xticks(range(len(rows)), [r["row"] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(label(key))
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CURVE_SPLITS = {  # the splits the eval events hold -> (axis label, title)
    frozenset({"validation"}): ("validation", "the held-out validation rows"),
    frozenset({"dev"}): ("dev", "the dev sets (the runs were selected on dev)"),
    frozenset({"validation", "dev"}): ("validation or dev",
                                       "the held-out validation rows, or dev for runs selected on dev"),
}


def plot_curves(jobs: list[Job], keys: list[str], path: Path):
    """The metric that chose each checkpoint (held-out validation rows, or dev for runs
    selected on dev) per task against that task's examples seen, one line per row (seed
    mean); a task a row does not train has no curve there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys[:-1]  # the tasks' own metrics, not the mean
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.4), squeeze=False)
    axes = axes[0]
    curves = defaultdict(lambda: defaultdict(list))  # (row, key) -> examples -> values
    splits = set()
    for job in jobs:
        for event in read_events(job.path, "eval"):
            split = "validation" if event.get("validation") is not None else "dev"
            seen, metrics = event.get("examples_seen", {}), event.get(split) or {}
            for key in keys:
                task = key.rsplit("_", 1)[0]
                if metrics.get(key) is not None and task in seen:
                    curves[(job.row, key)][seen[task]].append(metrics[key])
                    splits.add(split)
    short, split_title = CURVE_SPLITS.get(frozenset(splits), ("-", "no evaluations"))
    for ax, key in zip(axes, keys):
        for (row, k), points in sorted(curves.items()):
            if k == key:
                xs = sorted(points)
                ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=row)
        ax.set_xlabel(f"{key.rsplit('_', 1)[0]} examples seen")
        ax.set_ylabel(f"{label(key)} on {short}")
        ax.set_title(label(key))
    fig.suptitle(f"Evaluations that chose the checkpoints, on {split_title}", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
