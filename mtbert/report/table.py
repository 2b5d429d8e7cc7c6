"""Table 1's statistics: each row's seeds summarized with intervals, paired comparisons
against the reference row (a bootstrap over dev examples for single runs), Δm over
single-task baselines, and the claims judged (`mtbert.stats`, `mtbert.claims`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mtbert import claims as claims_module
from mtbert import stats
from mtbert.paper import PAPER, PAPER_KEYS, PAPER_METRICS
from mtbert.predict import read_predictions
from mtbert.report.runs import MADE_WITH, Job, running_note


class MixedRunsError(ValueError):
    pass


def metric_keys(jobs: list[Job]) -> list[str]:
    """The tasks' metrics the jobs report (the paper's three first, any added task after),
    then the paper's mean."""
    found = {k: None for j in jobs for k in j.dev if k not in ("mean", "overall")}
    keys = [k for k in PAPER_METRICS if k in found] + [k for k in found if k not in PAPER_METRICS]
    return (keys or list(PAPER_METRICS)) + ["mean"]



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
    return [summarize_row(name, by_row[name], seeds, keys) for name in order]


def summarize_row(name: str, group: list[Job], seeds: list[int], keys: list[str]) -> dict:
    """One row: its completed seeds, notes on the others and on how it was made, each
    metric's statistics over seeds (`metric_summary`), and what its runs cost."""
    done, notes = completed_seeds(group, seeds)
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
        row.update(metric_summary(key, values, paper.get(key)))
    return {**row, **run_costs(list(done.values()))}


def completed_seeds(group: list[Job], seeds: list[int]) -> tuple[dict[int, Job], list[str]]:
    """Each seed's completed job (the first, where a seed ran twice), and a note for each
    job that did not complete, ran twice or skipped steps, and for each seed missing."""
    done, notes = {}, []
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
    return done, notes


def metric_summary(key: str, values: dict[int, float], paper: float | None) -> dict:
    """One metric over a row's seeds: the values by seed, mean, 95% t-interval, sd, min,
    max, and the paper's number (None where the row is not the paper's)."""
    v = list(values.values())
    ci = stats.interval(v)
    return {key: statistics.fmean(v) if v else None, f"{key}_seeds": values,
            f"{key}_low": ci[0] if ci else None, f"{key}_high": ci[1] if ci else None,
            f"{key}_sd": statistics.stdev(v) if len(v) > 1 else None,
            f"{key}_min": min(v, default=None), f"{key}_max": max(v, default=None),
            f"{key}_paper": paper}


def run_costs(done: list[Job]) -> dict:
    """What chose a row's checkpoints and what its runs took, as means over completed seeds:
    the score on the held-out validation rows, steps, examples seen per task, minutes."""
    seen = defaultdict(list)
    for j in done:
        for task, n in j.results.get("examples_seen", {}).items():
            seen[task].append(n)
    validation = {j.seed: j.results["validation"]["mean"] for j in done
                  if (j.results.get("validation") or {}).get("mean") is not None}
    return {"validation": mean_or_none(list(validation.values())), "validation_seeds": validation,
            "steps": mean_or_none([j.results["steps"] for j in done]),
            "examples_seen": {t: statistics.fmean(v) for t, v in sorted(seen.items())},
            "minutes": mean_or_none([j.results["train_seconds"] / 60 for j in done])}


def best_on_validation(rows: list[dict]) -> dict | None:
    """The multitask row with the highest mean score on the held-out validation rows, the
    split that chose the checkpoints: a choice of row (say, for a follow-up run) that the
    dev sets, which score the rows, take no part in. Every row is averaged over the seeds
    all of them completed, so that no row is compared on seeds the others lack."""
    candidates = [r for r in rows if not r["single_task"] and r["validation_seeds"]]
    seeds = sorted(set.intersection(*(set(r["validation_seeds"]) for r in candidates))) if candidates else []
    if len(candidates) < 2 or not seeds:
        return None

    def over_seeds(r: dict, key: str) -> float | None:
        return mean_or_none([r[key][s] for s in seeds if s in r[key]])

    best = max(candidates, key=lambda r: over_seeds(r, "validation_seeds"))
    return {"row": best["row"], "seeds": seeds, "rows": len(candidates),
            "validation": over_seeds(best, "validation_seeds"), "mean": over_seeds(best, "mean_seeds")}


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def made_with_values(jobs: list[Job]) -> dict[str, dict[str, list[Path]]]:
    """Per field of MADE_WITH, each value the runs have and the runs that have it."""
    values = {f: defaultdict(list) for f in MADE_WITH}
    for job in jobs:
        for f, value in job.made_with.items():
            values[f][value].append(job.path)
    return {f: dict(v) for f, v in values.items()}



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
    from mtbert.config import declared_tasks

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




def judge_claims(path: Path, rows: list[dict], keys: list[str]) -> tuple[list, list]:
    """The judged claims with a row in the report, and the others (none of their rows here)."""
    values = {r["row"]: {k: r[f"{k}_seeds"] for k in keys} for r in rows}
    claims = claims_module.load_claims(path)
    relevant = [c for c in claims if any(ch.a in values or ch.b in values for ch in c.checks)]
    return claims_module.judge(relevant, values), [c for c in claims if c not in relevant]
