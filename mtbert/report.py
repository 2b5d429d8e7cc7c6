"""Turn sweeps into Table 1 and decide what it says: intervals over seeds, paired tests
against a reference row, Δm over single-task baselines, and the paper's claims.

    python -m mtbert.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--reference ROW]
                            [--claims FILE] [--data-root DIR] [--allow-mixed]

Reads every job (a folder with `.hydra/config.yaml`) under the given folders, and writes
`table.md` (the tables, each row's provenance, the comparisons, Δm and the claims'
verdicts), `readings.md` (one sentence per comparison and claim, its numbers as the table
gives them), `table.csv` (one line per row, seeds included), `comparisons.csv`,
`bars.png`, `seeds.png` and `curves.png` to `--out` (default: the first sweep folder),
printing the tables. Failed jobs, jobs without results and seeds that ran for some rows but
not others are shown as such, never dropped; a row whose runs were made differently
(precision, device, code, checkpoint selection) is refused unless `--allow-mixed`, and then
flagged. The statistics are in `mtbert.stats`, the claims in `mtbert.claims`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mtbert import claims as claims_module
from mtbert import stats
from mtbert.evaluate import PAPER_METRICS
from mtbert.rundir import process_alive, read_events

LABELS = {"sst_acc": "SST acc", "para_acc": "Quora acc", "sts_pearson": "STS r", "mean": "mean"}

# What a run's numbers depend on beyond its row's config: runs of one row must agree on them.
MADE_WITH = ("selected on", "precision", "device", "code")
UNKNOWN = "unknown"  # a run from before results.json recorded it

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
    trained: list[str] | None = None  # `sampler.tasks` (None: every declared task)
    row: str = ""

    @property
    def dev(self) -> dict:
        return self.results.get("dev") or {}

    @property
    def made_with(self) -> dict[str, str]:
        """Each of MADE_WITH as one comparable string. Runs from before `selected_on` chose
        on dev; before `provenance`, only the top-level precision and device kind are known."""
        r = self.results
        p = r.get("provenance") or {}
        return {"selected on": r.get("selected_on") or "dev",
                "precision": p.get("precision") or r.get("precision") or UNKNOWN,
                "device": device_name(p.get("device"), r.get("device")), "code": code_name(p.get("code"))}


class MixedRunsError(ValueError):
    pass


def device_name(device: dict | None, kind: str | None = None) -> str:
    """`Intel Xeon ... (AVX512)` or `NVIDIA H100 ... (capability 9.0)`: what decides the arithmetic."""
    if not device:
        return f"{kind} ({UNKNOWN} model)" if kind else UNKNOWN
    detail = device.get("isa") or (f"capability {device['capability']}" if device.get("capability") else None)
    return (device.get("name") or device.get("type") or UNKNOWN) + (f" ({detail})" if detail else "")


def code_name(code: dict | None) -> str:
    """The commit's short hash, `+dirty` with uncommitted changes; the package version without a checkout."""
    if not code:
        return UNKNOWN
    if not code.get("commit"):
        return f"mtbert {code.get('version') or UNKNOWN} (no git checkout)"
    return code["commit"][:10] + ("+dirty" if code.get("dirty") else "")


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
    short = {job.row: " ".join(map(short_number, job.row.split(" "))) for job in jobs}
    if len(set(short.values())) == len(short):  # the short names still tell the rows apart
        for job in jobs:
            job.row = short[job.row]
    return jobs


def short_number(override: str) -> str:
    """`lr=0.0009079068091925258` (a tuned value) as `lr=0.000908`: a row's name, not its record."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.3g}" if len(value) > 8 and not value.lstrip("-").isdigit() else override


def read_job(path: Path) -> Job:
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    hydra = OmegaConf.load(path / ".hydra" / "hydra.yaml").hydra
    experiment = hydra.runtime.choices.get("experiment")
    overrides = [o for o in hydra.overrides.task if not o.startswith(("seed=", "experiment="))]
    trained = OmegaConf.select(cfg, "sampler.tasks")
    trained = list(trained) if trained is not None else None
    results_file = path / "results.json"
    if not results_file.is_file():
        return Job(path, experiment, overrides, cfg.seed, "missing", trained=trained)
    results = json.loads(results_file.read_text())
    return Job(path, experiment, overrides, results.get("seed", cfg.seed), results["status"], results,
               trained)


def metric_keys(jobs: list[Job]) -> list[str]:
    """The tasks' metrics the jobs report (the paper's three first, any added task after),
    then the paper's mean."""
    found = {k: None for j in jobs for k in j.dev if k not in ("mean", "overall")}
    keys = [k for k in PAPER_METRICS if k in found] + [k for k in found if k not in PAPER_METRICS]
    return (keys or list(PAPER_METRICS)) + ["mean"]


def label(key: str) -> str:
    return LABELS.get(key, key)


def running_note(process: dict | None) -> str:
    """A `running` run: live, dead (killed without a record: rerun the sweep to resume it), or
    on another host, with its last sign of life."""
    alive = process_alive(process)
    if alive is False:
        return f"running, but its process (pid {process['pid']}) is gone: killed; rerun its sweep to resume it"
    if alive:
        return f"running (pid {process['pid']})"
    if process:
        return f"running on {process['host']} (last update {datetime.fromtimestamp(process['updated']):%Y-%m-%d %H:%M})"
    return "running (no process recorded: an older run, or killed)"


def single_task(group: list[Job]) -> str | None:
    """The task a single-task baseline row trains alone, else None. The paper's milestone
    row trains SST alone too, but at the starter's rates: a row of Table 1, no baseline."""
    trained = group[0].trained
    alone = trained is not None and len(trained) == 1 and group[0].experiment not in PAPER
    return trained[0] if alone else None


def summarize(jobs: list[Job], keys: list[str]) -> list[dict]:
    """One row per experiment, in Table 1 order, then the others alphabetically. Each
    metric gets its per-seed values (`<key>_seeds`), mean, 95% t-interval, sd, min, max."""
    seeds = sorted({j.seed for j in jobs})
    by_row = defaultdict(list)
    for job in jobs:
        by_row[job.row].append(job)
    paper_order = {name: i for i, name in enumerate(PAPER)}
    order = sorted(by_row, key=lambda r: (single_task(by_row[r]) is not None,
                                          paper_order.get(by_row[r][0].experiment, len(PAPER)), r))
    rows = []
    for name in order:
        group = by_row[name]
        done = {}
        notes = []
        for j in group:
            if j.status == "running":
                notes.append(f"seed {j.seed} {running_note(j.results.get('process'))}")
            elif j.status != "completed":
                notes.append(f"seed {j.seed} {j.status}"
                             + (f": {one_line(j.results['error'])}" if j.results.get("error") else ""))
            elif j.seed in done:
                notes.append(f"seed {j.seed} ran twice ({done[j.seed].path}, {j.path}): the first is used")
            else:
                done[j.seed] = j
                if j.results.get("skipped_steps"):
                    notes.append(f"seed {j.seed} skipped {j.results['skipped_steps']} of "
                                 f"{j.results['steps']} steps (non-finite loss)")
        notes += [f"seed {s} missing" for s in seeds if s not in {j.seed for j in group}]
        made_with = made_with_values(list(done.values()))
        on_dev = sum(len(paths) for value, paths in made_with["selected on"].items() if value == "dev")
        if on_dev:
            notes.insert(0, f"selected on dev ({on_dev} of {len(done)} seeds)")
        alone = single_task(group)
        if alone:
            notes.insert(0, f"single-task baseline: trains {alone} only")
        row = {"row": name, "completed": len(done), "jobs": len(group), "single_task": alone,
               "notes": "; ".join(notes), "runs": {s: j.path for s, j in sorted(done.items())},
               "made_with": made_with, "on_dev": on_dev}
        paper = dict(zip(PAPER_KEYS, PAPER.get(name, ())))  # a row with overrides is not the paper's
        for key in keys:
            values = {s: j.dev[key] for s, j in sorted(done.items()) if j.dev.get(key) is not None}
            v = list(values.values())
            ci = stats.interval(v)
            row.update({key: statistics.fmean(v) if v else None, f"{key}_seeds": values,
                        f"{key}_low": ci[0] if ci else None, f"{key}_high": ci[1] if ci else None,
                        f"{key}_sd": statistics.stdev(v) if len(v) > 1 else None,
                        f"{key}_min": min(v, default=None), f"{key}_max": max(v, default=None),
                        f"{key}_paper": paper.get(key)})
        row["steps"] = mean_or_none([j.results["steps"] for j in done.values()])
        seen = defaultdict(list)
        for j in done.values():
            for task, n in j.results.get("examples_seen", {}).items():
                seen[task].append(n)
        row["examples_seen"] = {t: statistics.fmean(v) for t, v in sorted(seen.items())}
        row["minutes"] = mean_or_none([j.results["train_seconds"] / 60 for j in done.values()])
        rows.append(row)
    return rows


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def made_with_values(jobs: list[Job]) -> dict[str, dict[str, list[Path]]]:
    """Per field of MADE_WITH, each value the runs have and the runs that have it."""
    values = {f: defaultdict(list) for f in MADE_WITH}
    for job in jobs:
        for f, value in job.made_with.items():
            values[f][value].append(job.path)
    return {f: dict(v) for f, v in values.items()}


def made_with_cell(row: dict, field: str) -> str:
    return " / ".join(row["made_with"][field]) or "-"


def mixed_rows(rows: list[dict]) -> list[tuple[str, str, dict[str, list[Path]]]]:
    """(row, field, value -> runs) for every row whose completed runs differ in a field of
    MADE_WITH: its interval and tests would pool runs that differ in more than the seed."""
    return [(r["row"], f, values) for r in rows for f, values in r["made_with"].items() if len(values) > 1]


def mixed_lines(mixed: list) -> list[str]:
    return [f"- `{row}` mixes {field}: " + "; ".join(f"{value} in {', '.join(map(str, paths))}"
                                                     for value, paths in values.items())
            for row, field, values in mixed]


def refuse_mixed(mixed: list):
    raise MixedRunsError(
        "rows whose runs were made differently (their intervals and tests would pool more than "
        "seeds):\n" + "\n".join(mixed_lines(mixed)) + "\nReport such runs as separate rows (or "
        "leave some out), or pass --allow-mixed (report(..., allow_mixed=True)) to go on with a "
        "warning in table.md.")


def compare(rows: list[dict], keys: list[str], reference: str,
            data_root: str | None = None) -> list[dict]:
    """Every multitask row against the reference on every metric: paired over seeds, or
    for two single runs a bootstrap over dev examples; Holm across the whole table."""
    ref = next(r for r in rows if r["row"] == reference)
    out = []
    for row in rows:
        if row is ref or row["single_task"]:
            continue
        boot = None
        if len(row["runs"]) == 1 and len(ref["runs"]) == 1:
            boot = bootstrap_runs(next(iter(row["runs"].values())), next(iter(ref["runs"].values())),
                                  data_root)
        for key in keys:
            result = stats.paired(row[f"{key}_seeds"], ref[f"{key}_seeds"])
            if isinstance(result, str) and isinstance(boot, dict) and key in boot:
                result = boot[key]
            elif isinstance(result, str) and isinstance(boot, str):
                result += f"; {boot}"
            out.append({"row": row["row"], "metric": key, "result": result})
    tested = [c for c in out if isinstance(c["result"], stats.Comparison)]
    for c, p in zip(tested, stats.holm([c["result"].p for c in tested])):
        c["result"].p_holm = p
    return out


def bootstrap_runs(run_a: Path, run_b: Path, data_root: str | None) -> dict | str:
    """The paired bootstrap over dev examples of two runs, from their prediction files
    (`python -m mtbert.predict RUN --splits dev`); a reason when they have none."""
    from mtbert.data import RejectedRows, read_split
    from mtbert.build import declared_tasks

    files = {}
    for run in (run_a, run_b):
        found = sorted((run / "predictions").glob("*-dev-output.csv"))
        if not found:
            return (f"no dev prediction files in {run}/predictions for a bootstrap over dev examples "
                    f"(python -m mtbert.predict {run} --splits dev)")
        files[run] = {f.name.removesuffix("-dev-output.csv"): f for f in found}
    cfg = OmegaConf.load(run_a / ".hydra" / "config.yaml")
    root = Path(data_root or cfg.data.root).expanduser()
    gold, a, b, metric = {}, {}, {}, {}
    for name, task in declared_tasks(cfg).items():
        if name not in files[run_a] or name not in files[run_b]:
            continue
        rows = read_split(task, root / task.files["dev"], RejectedRows("skip"), labelled=True)
        labels = dict(zip(rows.ids, rows.labels))
        pa, pb = read_predictions(files[run_a][name]), read_predictions(files[run_b][name])
        ids = [i for i in rows.ids if i in pa and i in pb]
        gold[name] = np.array([labels[i] for i in ids])
        a[name], b[name] = np.array([pa[i] for i in ids]), np.array([pb[i] for i in ids])
        metric[name] = task.metric
    return stats.bootstrap_examples(gold, a, b, metric)


def read_predictions(path: Path) -> dict[str, float]:
    """A CS224N prediction file (`id , prediction` lines after a header) as {id: value}."""
    values = {}
    with open(path) as f:
        next(f)
        for number, line in enumerate(f, 2):
            row_id, _, value = line.partition(",")
            try:
                values[row_id.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: expected 'id , prediction', got {line!r}") from None
    return values


def delta_m_rows(rows: list[dict], keys: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Δm of every multitask row against the single-task rows (one per task): of the seed
    means, as LibMTL reports it, and seed by seed (each seed's Δm against the baselines'
    same seed, on the seeds that the row and every baseline completed), with its t-interval."""
    baselines, base_seeds = {}, {}
    for row in rows:
        task = row["single_task"]
        if task:
            key = next((k for k in keys if k.rsplit("_", 1)[0] == task), None)
            if key and row[key] is not None:
                if key in baselines:
                    raise ValueError(f"two single-task rows train {task}; give the report one of them")
                baselines[key], base_seeds[key] = row[key], row[f"{key}_seeds"]
    if not baselines:
        return {}, []
    out = []
    for row in rows:
        if not row["single_task"]:
            change = {k: (row[k] - b) / abs(b) * 100 if row[k] is not None and b else None
                      for k, b in baselines.items()}
            seeds = sorted(set.intersection(*(set(row[f"{k}_seeds"]) & set(base_seeds[k]) for k in baselines)))
            by_seed = [stats.delta_m({k: row[f"{k}_seeds"][s] for k in baselines},
                                     {k: base_seeds[k][s] for k in baselines}) for s in seeds]
            out.append({"row": row["row"], "delta_m": stats.delta_m(row, baselines), **change,
                        "by_seed": mean_or_none(by_seed), "by_seed_ci": stats.interval(by_seed),
                        "seeds": seeds})
    return baselines, out


def one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def fmt(value, digits=3, sign="") -> str:
    return "-" if value is None else f"{value:{sign}.{digits}f}"


def cell(row: dict, key: str, paper: bool) -> str:
    """`mean [low, high] (paper)`; the interval only with 2 seeds or more."""
    text = fmt(row[key])
    if row[f"{key}_low"] is not None:
        text += f" [{fmt(row[key + '_low'])}, {fmt(row[key + '_high'])}]"
    return f"{text} ({fmt(row[key + '_paper'])})" if paper else text


def has_paper_rows(rows: list[dict], keys: list[str]) -> bool:
    """Whether any row is one of the paper's, so that its numbers have a column to go in."""
    return any(r[f"{k}_paper"] is not None for r in rows for k in keys)


def markdown(rows: list[dict], keys: list[str]) -> str:
    paper = has_paper_rows(rows, keys)
    head = ["row", *[label(k) + (" (paper)" if paper else "") for k in keys], "seeds", "steps",
            "examples seen", "minutes", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], *[cell(r, k, paper) for k in keys]]
        cells += [f"{r['completed']}/{r['jobs']}", fmt(r["steps"], digits=0),
                  ", ".join(f"{t} {n:,.0f}" for t, n in r["examples_seen"].items()) or "-",
                  fmt(r["minutes"], digits=1), r["notes"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_markdown(comparisons: list[dict], reference: str) -> str:
    tested = sum(isinstance(c["result"], stats.Comparison) for c in comparisons)
    lines = [f"Δ = row − `{reference}`, paired by seed: mean difference with its 95% t-interval, "
             f"paired t-test, Holm's correction across the {tested} tests of this table (a family apart "
             "from the claims'), the exact "
             "sign-flip permutation test (its smallest p is 2/2^seeds), and the smallest Δ a paired "
             "t-test on these seeds detects with 80% power at this spread.", "",
             "| row | metric | seeds | Δ [95% CI] | p | p Holm | p sign-flip | detectable Δ | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r = c["result"]
        if isinstance(r, str):
            lines.append(f"| {c['row']} | {label(c['metric'])} | - | - | - | - | - | - | {r} |")
            continue
        lines.append(
            f"| {c['row']} | {label(c['metric'])} | {','.join(map(str, r.seeds)) or 1} | "
            f"{delta_text(r)} | {fmt_p(r.p)} | {fmt_p(r.p_holm)} | {fmt_p(r.p_signflip)} | "
            f"{fmt(r.detectable, 4)} | {comparison_verdict(r)} |")
    return "\n".join(lines)


def delta_text(r: stats.Comparison) -> str:
    return f"{r.mean:+.4f} [{fmt(r.low, 4, '+')}, {fmt(r.high, 4, '+')}]"


def comparison_verdict(r: stats.Comparison) -> str:
    differs = r.p_holm is not None and r.p_holm < stats.ALPHA
    return ("differs" if differs else "no difference detected") + (
        "" if r.seeds else " (bootstrap over dev examples: seed noise not included)")


def fmt_p(p) -> str:
    return "-" if p is None else f"{p:.3g}"


def provenance_markdown(rows: list[dict]) -> str:
    """How each row's completed runs were made, and the fields in which rows differ from
    each other: a gap between such rows may come from how they were made."""
    lines = ["How each row's completed runs were made (`results.json`'s `selected_on` and `provenance`): "
             "the split that chose the checkpoint, the precision, the device (CPU and the instruction "
             "set its kernels used, or GPU and compute capability) and the code's commit. "
             f"`{UNKNOWN}`: runs from before mtbert recorded it.", "",
             "| row | selected on | precision | device | code |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | " + " | ".join(made_with_cell(r, f) for f in MADE_WITH) + " |" for r in rows]
    between = [f for f in MADE_WITH if len({v for r in rows for v in r["made_with"][f]}) > 1]
    if between:
        lines += ["", f"The rows differ in {', '.join(between)}: a gap between two of them may come "
                  "from how they were made as well as from what the rows change."]
    return "\n".join(lines)


def delta_m_markdown(baselines: dict[str, float], rows: list[dict]) -> str:
    keys = list(baselines)
    lines = ["Δm: the mean relative change (%) of each task's metric over its single-task baseline "
             "(" + ", ".join(f"{label(k)} {v:.3f}" for k, v in baselines.items()) + "), of the seed "
             "means; then seed by seed (each seed against the baselines' same seed), its mean and "
             "95% t-interval over the seeds that the row and every baseline completed.",
             "", "| row | Δm (%) | Δm by seed (%) | seeds | " + " | ".join(f"{label(k)} (%)" for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        ci = r["by_seed_ci"]
        paired = fmt(r["by_seed"], 2, "+") + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        lines.append(f"| {r['row']} | {fmt(r['delta_m'], 2, '+')} | {paired} | "
                     f"{', '.join(map(str, r['seeds'])) or '-'} | "
                     + " | ".join(fmt(r[k], 2, "+") for k in keys) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: list[str], path: Path):
    columns = ["row", "completed", "jobs", "single_task"]
    for k in keys:
        columns += [k, f"{k}_low", f"{k}_high", f"{k}_sd", f"{k}_min", f"{k}_max", f"{k}_paper",
                    f"{k}_seeds"]
    columns += ["steps", "examples_seen", "minutes", "notes"]
    made_with = {f.replace(" ", "_"): f for f in MADE_WITH}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + list(made_with))
        writer.writeheader()
        for r in rows:
            line = {k: r[k] for k in columns} | {k: made_with_cell(r, f) for k, f in made_with.items()}
            for k in columns:
                if isinstance(line[k], dict):
                    line[k] = json.dumps(line[k])
            writer.writerow(line)


def write_comparisons_csv(comparisons: list[dict], path: Path):
    columns = ["row", "metric", "method", "seeds", "diffs", "mean", "low", "high", "p", "p_holm",
               "p_signflip", "detectable", "note"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for c in comparisons:
            r = c["result"]
            if isinstance(r, str):
                writer.writerow({"row": c["row"], "metric": c["metric"], "note": r})
            else:
                writer.writerow({"row": c["row"], "metric": c["metric"], "method": r.method,
                                 "seeds": json.dumps(r.seeds), "diffs": json.dumps(r.diffs),
                                 **{k: getattr(r, k) for k in columns[5:-1]}})


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


def report(folders: list[Path], out: Path | None = None, reference: str | None = None,
           claims_file: Path | None = claims_module.PAPER_CLAIMS, data_root: str | None = None,
           allow_mixed: bool = False) -> str:
    """Write the report's files to `out` and return table.md's text. A row whose runs were
    made differently (MADE_WITH) stops it, naming the runs, unless `allow_mixed`."""
    jobs = find_jobs(folders)
    keys = metric_keys(jobs)
    rows = summarize(jobs, keys)
    names = [r["row"] for r in rows]
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"--reference {reference!r} is not a row of this report; rows: {names}")
    mixed = mixed_rows(rows)
    if mixed and not allow_mixed:
        refuse_mixed(mixed)
    out = out or folders[0]
    out.mkdir(parents=True, exist_ok=True)
    comparisons = compare(rows, keys, reference, data_root)
    baselines, deltas = delta_m_rows(rows, keys)
    claims = judge_claims(claims_file, rows, keys) if claims_file is not None else None
    sections = []
    if mixed:
        sections += ["## Warning: rows mixing runs made differently", "",
                     "Reported with --allow-mixed: these rows' intervals and tests pool runs that "
                     "differ in more than the seed.", "", *mixed_lines(mixed), ""]
    on_dev = (", or on dev where a row's notes say \"selected on dev\": dev then both chose and "
              "scores it, which flatters it" if any(r["on_dev"] for r in rows) else "")
    sections += [f"Dev scores of the checkpoint each run chose (on the held-out validation rows{on_dev}): "
                 "the mean over completed seeds, its 95% Student-t interval over seeds in brackets "
                 "(with 2 seeds or more)"
                 + (", the paper's number in parentheses." if has_paper_rows(rows, keys) else "."),
                 "", markdown(rows, keys), "", "## Provenance", "", provenance_markdown(rows)]
    if comparisons:
        sections += ["", f"## Paired comparisons against {reference}", "",
                     comparisons_markdown(comparisons, reference)]
    if deltas:
        sections += ["", "## Δm against single-task baselines", "", delta_m_markdown(baselines, deltas)]
    if claims is not None:
        sections += ["", "## Claims", "", claims_markdown(claims_file.name, *claims, comparisons, reference)]
    text = "\n".join(sections) + "\n"
    (out / "table.md").write_text(text)
    (out / "readings.md").write_text(readings(rows, comparisons, reference, claims[0] if claims else None, mixed))
    write_csv(rows, keys, out / "table.csv")
    write_comparisons_csv(comparisons, out / "comparisons.csv")
    plot_bars(rows, keys, out / "bars.png")
    plot_seeds(rows, keys, out / "seeds.png")
    plot_curves(jobs, keys, out / "curves.png")
    return text


def judge_claims(path: Path, rows: list[dict], keys: list[str]) -> tuple[list, list]:
    """The judged claims with a row in the report, and the others (none of their rows here)."""
    values = {r["row"]: {k: r[f"{k}_seeds"] for k in keys} for r in rows}
    claims = claims_module.load_claims(path)
    relevant = [c for c in claims if any(ch.a in values or ch.b in values for ch in c.checks)]
    return claims_module.judge(relevant, values), [c for c in claims if c not in relevant]


def claims_markdown(name: str, relevant: list, others: list, comparisons: list[dict], reference: str) -> str:
    """The verdicts, after the family of tests Holm's correction ran over."""
    text = claims_module.markdown(relevant)
    if others:
        text += (("\n" if text else "") + "- Not tested here (none of their rows is in this report): "
                 + "; ".join(c.text for c in others) + ".")
    return f"From {name}. {claims_family(relevant, comparisons, reference)}\n\n" + text


def claims_family(claims: list, comparisons: list[dict], reference: str) -> str:
    """Which checks Holm's correction of the claims ran over, and the checks that compare the
    same two rows as a paired comparison, whose Holm p differs there: another family."""
    family = claims_module.family(claims)
    if not family:
        return "No check could be tested (each needs both rows and 2 seeds or more in common)."
    text = (f"Holm's correction runs across the {len(family)} checks tested here ("
            + "; ".join(c.sentence for c in family) + "), a family of its own.")
    holm = {(c["row"], c["metric"]): c["result"].p_holm for c in comparisons
            if isinstance(c["result"], stats.Comparison)}
    if not holm:
        return text
    both = [(check, holm[(other, check.metric)]) for check in family
            for other in [{check.a: check.b, check.b: check.a}.get(reference)]
            if (other, check.metric) in holm]
    text += (f" The paired comparisons against {reference} are another family ({len(holm)} tests), so "
             "the same comparison can appear in both sections with two different Holm-adjusted "
             "p-values, because the families differ")
    return text + (": " + "; ".join(
        f"{check.sentence}, Holm {check.p_holm:.3g} here and {fmt_p(p)} there"
        + (" (here against the claim's margin or gain, there against no difference)"
           if check.direction == "equal" or check.by else "") for check, p in both) if both else "") + "."


def readings(rows: list[dict], comparisons: list[dict], reference: str, claims: list | None,
             mixed: list) -> str:
    """One plain sentence per paired comparison and per claim, its numbers as table.md gives
    them, after the caveats a write-up must carry: generated, so never copied by hand."""
    lines = ["# Readings", "", "Generated by `python -m mtbert.report` from the runs of table.md, "
             "with its numbers; regenerate it rather than edit it.", ""]
    on_dev = [f"{r['row']} ({r['on_dev']} of {r['completed']} seeds)" for r in rows if r["on_dev"]]
    if on_dev:
        lines.append(f"- Selected on dev, so dev both chose and scores their checkpoints: {', '.join(on_dev)}.")
    lines += [f"- {row} mixes runs made differently in {field} ({', '.join(values)}): reported with "
              "--allow-mixed." for row, field, values in mixed]
    for c in comparisons:
        r, head = c["result"], f"- {c['row']} − {reference}, {label(c['metric'])}"
        if isinstance(r, str):
            lines.append(f"{head}: not compared ({r}).")
        else:
            lines.append(f"{head}: Δ {delta_text(r)}, Holm p {fmt_p(r.p_holm)} "
                         f"({f'{r.n} seeds' if r.seeds else 'one run each'}): {comparison_verdict(r)}.")
    for claim in (claims or []):
        tested = "; ".join(f"{ch.sentence}: {ch.numbers}" for ch in claim.checks
                           if isinstance(ch.comparison, stats.Comparison))
        lines.append(f"- Claim \"{claim.text}\": {claim.verdict_text}." + (f" Checks: {tested}." if tested else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Table 1 from sweep folders, with its statistics")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the first folder")
    parser.add_argument("--reference", default=None, help="the row the others are compared with "
                        "(default: the first row)")
    parser.add_argument("--claims", type=Path, default=claims_module.PAPER_CLAIMS,
                        help="a claims YAML file (default: the paper's, mtbert/paper_claims.yaml)")
    parser.add_argument("--no-claims", action="store_true", help="leave the claims section out")
    parser.add_argument("--data-root", default=None, help="the data folder for the gold dev labels "
                        "of a bootstrap (default: each run's data.root)")
    parser.add_argument("--allow-mixed", action="store_true", help="report rows whose runs differ in "
                        "precision, device, code or checkpoint selection, with a warning in table.md "
                        "(default: refuse them)")
    args = parser.parse_args(argv)
    try:
        print(report(args.folders, args.out, args.reference, None if args.no_claims else args.claims,
                     args.data_root, args.allow_mixed))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"\nwritten to {args.out or args.folders[0]}: table.md, readings.md, table.csv, "
          "comparisons.csv, bars.png, seeds.png, curves.png")


if __name__ == "__main__":
    main()
