"""Do the tasks' gradients conflict? (the open question of paper section 5.2)

    python -m mtbert.diagnostics RUN_DIR     # -> RUN_DIR/grad_conflict.md and .png

The `grad` events that `diagnostics.grad_every` adds to metrics.jsonl hold the pairwise
cosines of the task gradients on the shared parameters, their norms, under PCGrad the
projections made, how far the method's update is from the plain sum (`update`), the
weights it gave the task gradients (`weights`) and the loss weighting's (`loss_weights`);
`plot_grad_conflict` draws them over training and `conflict_summary` counts them by
task pair and phase (encoder trained or frozen).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
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
    panels = [("cos", "cosine of task gradients"), ("norm", "task gradient norm"),
              ("weights", "weight on task gradient\n(dashed: on task loss)")]
    fig = Figure(figsize=(8, 2.4 * (len(panels) + bool(projections))), layout="constrained")
    axes = fig.subplots(len(panels) + bool(projections), 1, sharex=True)
    for (key, label), ax in zip(panels, axes):
        for series in sorted({k for e in events for k in e.get(key) or {}}):
            # null: undefined (a zero gradient); a zero norm has no place on a log axis
            points = [(e["step"], e[key][series]) for e in events if (e.get(key) or {}).get(series) is not None
                      and (key != "norm" or e[key][series] > 0)]
            if points:
                line, = ax.plot(*zip(*points), label=series, lw=1)
                if key == "weights":  # the loss weighting's, where it has any
                    loss_points = [(e["step"], e["loss_weights"][series]) for e in events
                                   if (e.get("loss_weights") or {}).get(series) is not None]
                    if loss_points:
                        ax.plot(*zip(*loss_points), color=line.get_color(), ls="--", lw=1)
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].axhline(0, color="gray", lw=0.8, ls="--")
    axes[1].set_yscale("log")
    if projections:
        axes[-1].step(*zip(*projections), where="mid", color="black", lw=1)
        axes[-1].set_ylabel("PCGrad projections")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Task-gradient conflict on the shared parameters")
    path = Path(run_dir) / name
    fig.savefig(path, dpi=120)
    return path


def conflict_summary(run_dir: Path, name: str = "grad_conflict.md") -> str | None:
    """How often each pair of task gradients conflicts (cosine < 0), by phase, and how much
    the method changed the update; written to `run_dir/name`. None without grad events."""
    events = read_events(run_dir, "grad")
    if not events:
        return None
    widest = max(e.get("params", 0) for e in events)
    phases = defaultdict(list)
    for e in events:  # a frozen encoder leaves fewer shared parameters with a gradient
        phases["encoder trained" if e.get("params", 0) == widest else "encoder frozen"].append(e)
    lines = ["Task-gradient conflict on the shared parameters, from the run's `grad` events "
             "(cosine < 0: the pair conflicts; null cosines, from a zero gradient, are left out).", "",
             "| phase | pair | steps | conflicting | mean cos | median cos |", "|---|---|---|---|---|---|"]
    for phase, group in phases.items():
        for pair in sorted({k for e in group for k in e["cos"]}):
            cos = [e["cos"][pair] for e in group if e["cos"].get(pair) is not None]
            if cos:
                lines.append(f"| {phase} | {pair.replace('|', ' / ')} | {len(cos)} | {sum(c < 0 for c in cos) / len(cos):.1%} | "
                             f"{statistics.fmean(cos):+.4f} | {statistics.median(cos):+.4f} |")
    lines += ["", "The method's update against the plain sum of the task gradients: `change` is "
              "|update - sum| / |sum|; projections are PCGrad's per step (of T(T-1) possible).", "",
              "| phase | steps | projections per step | mean change | max change | mean cos(update, sum) |",
              "|---|---|---|---|---|---|"]
    for phase, group in phases.items():
        updates = [e["update"] for e in group if (e.get("update") or {}).get("change") is not None]
        projections = [e["projections"] for e in group if e.get("projections") is not None]
        if updates:
            change = [u["change"] for u in updates]
            cos = [u["cos"] for u in updates if u["cos"] is not None]
            per_step = f"{statistics.fmean(projections):.3f}" if projections else "-"
            mean_cos = f"{statistics.fmean(cos):.5f}" if cos else "-"  # none: the update was zero
            lines.append(f"| {phase} | {len(updates)} | {per_step} | {statistics.fmean(change):.4f} | "
                         f"{max(change):.4f} | {mean_cos} |")
    text = "\n".join(lines) + "\n"
    (Path(run_dir) / name).write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Task-gradient conflict of a run (diagnostics.grad_every)")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    text = conflict_summary(args.run_dir)
    if text is None:
        sys.exit(f"error: {args.run_dir}/metrics.jsonl has no grad events; train with diagnostics.grad_every=N")
    plot_grad_conflict(args.run_dir)
    print(text)
    print(f"written to {args.run_dir}: grad_conflict.md, grad_conflict.png")


if __name__ == "__main__":
    main()
