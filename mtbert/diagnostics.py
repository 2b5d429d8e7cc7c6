"""Do the tasks' gradients conflict? (the open question of paper section 5.2)

The `grad` events that `diagnostics.grad_every` adds to metrics.jsonl hold the pairwise
cosines of the task gradients on the shared parameters, their norms and, under PCGrad,
the projections made; `plot_grad_conflict` draws them over training.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mtbert.rundir import read_events


def plot_grad_conflict(run_dir: Path, name: str = "grad_conflict.png") -> Path | None:
    """Draw the run's `grad` events into `run_dir/name`; None when there are none."""
    events = read_events(run_dir, "grad")
    if not events:
        return None
    projections = [(e["step"], e["projections"]) for e in events
                   if e.get("projections") is not None]
    fig = Figure(figsize=(8, 8 if projections else 6), layout="constrained")
    axes = fig.subplots(3 if projections else 2, 1, sharex=True)
    for key, ax, label in (("cos", axes[0], "cosine of task gradients"),
                           ("norm", axes[1], "task gradient norm")):
        for series in sorted({k for e in events for k in e[key]}):
            # null: undefined (a zero gradient); a zero norm has no place on a log axis
            points = [(e["step"], e[key][series]) for e in events
                      if e[key].get(series) is not None and (key == "cos" or e[key][series] > 0)]
            if points:
                ax.plot(*zip(*points), label=series, lw=1)
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].axhline(0, color="gray", lw=0.8, ls="--")
    axes[1].set_yscale("log")
    if projections:
        axes[2].step(*zip(*projections), where="mid", color="black", lw=1)
        axes[2].set_ylabel("PCGrad projections")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Task-gradient conflict on the shared parameters")
    path = Path(run_dir) / name
    fig.savefig(path, dpi=120)
    return path
