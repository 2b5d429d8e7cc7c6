"""Turn sweeps into Table 1: mean and spread over seeds, the paper's numbers beside them.

    python -m mtbert.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR]

Reads every job (a folder with `.hydra/config.yaml`) under the given folders, and writes
`table.md`, `table.csv`, `bars.png` and `curves.png` to `--out` (default: the first
sweep folder), printing the table. Failed jobs, jobs without results and seeds that
ran for some rows but not others are shown as such, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mtbert.evaluate import PAPER_METRICS
from mtbert.rundir import read_events

LABELS = {"sst_acc": "SST acc", "para_acc": "Quora acc", "sts_pearson": "STS r", "mean": "mean"}

# Table 1 of the paper: SST acc, Quora acc, STS Pearson, average of the three.
PAPER_KEYS = (*PAPER_METRICS, "mean")
PAPER = {
    "milestone_baseline": (0.316, 0.369, -0.009, 0.225),
    "random_sequential": (0.304, 0.670, 0.212, 0.395),
    "rr_under": (0.301, 0.632, 0.181, 0.371),
    "rr_over": (0.432, 0.691, 0.272, 0.465),
    "rro_hp_cs": (0.497, 0.864, 0.387, 0.582),
    "rro_hp_cs_gs": (0.497, 0.860, 0.378, 0.578),
}


@dataclass
class Job:
    path: Path
    experiment: str | None
    overrides: list[str]  # the job's command-line overrides, seed and experiment aside
    seed: int
    status: str  # completed | failed | interrupted | missing (no results.json)
    results: dict = field(default_factory=dict)
    row: str = ""

    @property
    def dev(self) -> dict:
        return self.results.get("dev") or {}


def find_jobs(folders: list[Path]) -> list[Job]:
    jobs = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        for config in sorted(folder.rglob(".hydra/config.yaml")):
            jobs.append(read_job(config.parent.parent))
    if not jobs:
        raise FileNotFoundError(f"no jobs (folders with .hydra/config.yaml) under {folders}")
    common = set.intersection(*(set(j.overrides) for j in jobs))
    for job in jobs:  # a row is named by its experiment and the overrides that tell it apart
        own = [o for o in job.overrides if o not in common]
        job.row = " ".join(([job.experiment] if job.experiment else []) + own) or "default"
    return jobs


def read_job(path: Path) -> Job:
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    hydra = OmegaConf.load(path / ".hydra" / "hydra.yaml").hydra
    experiment = hydra.runtime.choices.get("experiment")
    overrides = [o for o in hydra.overrides.task if not o.startswith(("seed=", "experiment="))]
    results_file = path / "results.json"
    if not results_file.is_file():
        return Job(path, experiment, overrides, cfg.seed, "missing")
    results = json.loads(results_file.read_text())
    return Job(path, experiment, overrides, results.get("seed", cfg.seed), results["status"], results)


def metric_keys(jobs: list[Job]) -> list[str]:
    """The tasks' metrics the jobs report (the paper's three first, any added task after),
    then the paper's mean."""
    found = {k: None for j in jobs for k in j.dev if k not in ("mean", "overall")}
    keys = [k for k in PAPER_METRICS if k in found] + [k for k in found if k not in PAPER_METRICS]
    return (keys or list(PAPER_METRICS)) + ["mean"]


def label(key: str) -> str:
    return LABELS.get(key, key)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(jobs: list[Job], keys: list[str]) -> list[dict]:
    """One row per experiment, in Table 1 order, then the others alphabetically."""
    seeds = sorted({j.seed for j in jobs})
    by_row = defaultdict(list)
    for job in jobs:
        by_row[job.row].append(job)
    paper_order = {name: i for i, name in enumerate(PAPER)}
    order = sorted(by_row, key=lambda r: (paper_order.get(by_row[r][0].experiment, len(PAPER)), r))
    rows = []
    for name in order:
        group = by_row[name]
        done = [j for j in group if j.status == "completed"]
        row = {"row": name, "completed": len(done), "jobs": len(group)}
        notes = [f"seed {j.seed} {j.status}" + (f": {one_line(j.results['error'])}"
                                                if j.results.get("error") else "")
                 for j in group if j.status != "completed"]
        notes += [f"seed {s} missing" for s in seeds if s not in {j.seed for j in group}]
        row["notes"] = "; ".join(notes)
        paper = dict(zip(PAPER_KEYS, PAPER.get(group[0].experiment, ())))
        for key in keys:
            values = [j.dev[key] for j in done if j.dev.get(key) is not None]
            row[key], row[f"{key}_std"] = mean_std(values)
            row[f"{key}_paper"] = paper.get(key)
        row["steps"] = mean_std([j.results["steps"] for j in done])[0]
        seen = defaultdict(list)
        for j in done:
            for task, n in j.results.get("examples_seen", {}).items():
                seen[task].append(n)
        row["examples_seen"] = {t: statistics.fmean(v) for t, v in sorted(seen.items())}
        row["minutes"] = mean_std([j.results["train_seconds"] / 60 for j in done])[0]
        rows.append(row)
    return rows


def one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def fmt(value, std=None, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(rows: list[dict], keys: list[str]) -> str:
    head = ["row", *[f"{label(k)} (paper)" for k in keys], "runs", "steps",
            "examples seen", "minutes", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"]]
        cells += [f"{fmt(r[k], r[k + '_std'])} ({fmt(r[k + '_paper'])})" for k in keys]
        cells += [f"{r['completed']}/{r['jobs']}", fmt(r["steps"], digits=0),
                  ", ".join(f"{t} {n:,.0f}" for t, n in r["examples_seen"].items()) or "-",
                  fmt(r["minutes"], digits=1), r["notes"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: list[str], path: Path):
    columns = ["row", "completed", "jobs"]
    for k in keys:
        columns += [k, f"{k}_std", f"{k}_paper"]
    columns += ["steps", "examples_seen", "minutes", "notes"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r[k] for k in columns}, "examples_seen": json.dumps(r["examples_seen"])})


def plot_bars(rows: list[dict], keys: list[str], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4.5), sharey=False)
    x = range(len(rows))
    for ax, key in zip(axes, keys):
        values = [r[key] if r[key] is not None else math.nan for r in rows]
        errors = [r[f"{key}_std"] or 0 for r in rows]
        ax.bar(x, values, yerr=errors, capsize=4, color="tab:blue", label="mtbert")
        paper = [r[f"{key}_paper"] if r[f"{key}_paper"] is not None else math.nan for r in rows]
        ax.scatter(x, paper, color="tab:red", marker="_", s=400, zorder=3, label="paper")
        ax.set_xticks(list(x), [r["row"] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(label(key))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(jobs: list[Job], keys: list[str], path: Path):
    """Dev metric per task against that task's examples seen, one line per row (seed
    mean); a task a row does not train has no curve there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys[:-1]  # the tasks' own metrics, not the mean
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    axes = axes[0]
    curves = defaultdict(lambda: defaultdict(list))  # (row, key) -> examples -> values
    for job in jobs:
        for event in read_events(job.path, "eval"):
            seen, dev = event.get("examples_seen", {}), event.get("dev") or {}
            for key in keys:
                task = key.rsplit("_", 1)[0]
                if dev.get(key) is not None and task in seen:
                    curves[(job.row, key)][seen[task]].append(dev[key])
    for ax, key in zip(axes, keys):
        for (row, k), points in sorted(curves.items()):
            if k == key:
                xs = sorted(points)
                ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=row)
        ax.set_xlabel(f"{key.rsplit('_', 1)[0]} examples seen")
        ax.set_title(label(key))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(folders: list[Path], out: Path | None = None) -> str:
    jobs = find_jobs(folders)
    keys = metric_keys(jobs)
    rows = summarize(jobs, keys)
    out = out or folders[0]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, keys)
    (out / "table.md").write_text(
        "Dev scores: mean ± standard deviation over completed seeds (the paper's number in "
        "brackets).\n\n" + table + "\n")
    write_csv(rows, keys, out / "table.csv")
    plot_bars(rows, keys, out / "bars.png")
    plot_curves(jobs, keys, out / "curves.png")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description="Table 1 from sweep folders")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the first folder")
    args = parser.parse_args(argv)
    try:
        print(report(args.folders, args.out))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    print(f"\nwritten to {args.out or args.folders[0]}: table.md, table.csv, bars.png, curves.png")


if __name__ == "__main__":
    main()
