"""The report's text: table.md's sections, readings.md's sentences and the CSV files, all
written from the rows and comparisons `mtbert.report.table` computed (no number computed here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mtbert import claims as claims_module
from mtbert import stats
from mtbert.paper import label
from mtbert.report.runs import MADE_WITH, UNKNOWN


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
    head = ["row", *[label(k) + (" (paper)" if paper else "") for k in keys], "seeds", "validation mean",
            "steps", "examples seen", "minutes", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], *[cell(r, k, paper) for k in keys]]
        cells += [f"{r['completed']}/{r['jobs']}", fmt(r["validation"]), fmt(r["steps"], digits=0),
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


def made_with_cell(row: dict, field: str) -> str:
    return " / ".join(row["made_with"][field]) or "-"


def write_csv(rows: list[dict], keys: list[str], path: Path):
    columns = ["row", "completed", "jobs", "single_task"]
    for k in keys:
        columns += [k, f"{k}_low", f"{k}_high", f"{k}_sd", f"{k}_min", f"{k}_max", f"{k}_paper",
                    f"{k}_seeds"]
    columns += ["validation", "steps", "examples_seen", "minutes", "notes"]
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
             mixed: list, best: dict | None = None, command: str = "python -m mtbert.report") -> str:
    """One plain sentence per paired comparison and per claim, its numbers as table.md gives
    them, after the caveats a write-up must carry: generated, so never copied by hand. The
    command that wrote it heads it, so that anyone can regenerate it and compare."""
    lines = ["# Readings", "", f"Generated by `{command}` from the runs of table.md, "
             "with its numbers; regenerate it rather than edit it.", ""]
    on_dev = [f"{r['row']} ({r['on_dev']} of {r['completed']} seeds)" for r in rows if r["on_dev"]]
    if on_dev:
        lines.append(f"- Selected on dev, so dev both chose and scores their checkpoints: {', '.join(on_dev)}.")
    lines += best_on_validation_line(best)
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


def best_on_validation_line(best: dict | None) -> list[str]:
    if not best:
        return []
    return [f"- Highest mean validation score over seeds {', '.join(map(str, best['seeds']))}, which all "
            f"{best['rows']} multitask rows completed: {best['row']}, {fmt(best['validation'])}; "
            f"its dev mean over them {fmt(best['mean'])}."]
