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
flagged.

Four modules, one job each: `runs` finds the jobs and how each was made, `table` computes
the rows, comparisons and Δm (the tests themselves are `mtbert.stats`, the claims
`mtbert.claims`), `render` writes the text and CSV files, `plots` the figures; the paper's
labels and Table 1 are `mtbert.paper`'s.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mtbert import claims as claims_module
from mtbert.paper import PAPER, label
from mtbert.report.plots import plot_bars, plot_curves, plot_seeds
from mtbert.report.render import (claims_markdown, comparisons_markdown, delta_m_markdown, has_paper_rows,
                                  markdown, provenance_markdown, readings, write_comparisons_csv, write_csv)
from mtbert.report.runs import find_jobs, running_note
from mtbert.report.table import (MixedRunsError, best_on_validation, compare, delta_m_rows, judge_claims,
                                 metric_keys, mixed_lines, mixed_rows, refuse_mixed, summarize)

__all__ = ["MixedRunsError", "PAPER", "label", "main", "report", "running_note"]


def report(folders: list[Path], out: Path | None = None, reference: str | None = None,
           claims_file: Path | None = claims_module.PAPER_CLAIMS, data_root: str | None = None,
           allow_mixed: bool = False, command: str = "python -m mtbert.report") -> str:
    """Write the report's files to `out` and return table.md's text. A row whose runs were
    made differently (MADE_WITH) stops it, naming the runs, unless `allow_mixed`. `command`,
    the command line that asked for it, heads readings.md."""
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
    delta_m = delta_m_rows(rows, keys)
    claims = judge_claims(claims_file, rows, keys) if claims_file is not None else None
    text = table_markdown(rows, keys, reference, mixed, comparisons, delta_m, claims, claims_file)
    (out / "table.md").write_text(text)
    (out / "readings.md").write_text(readings(rows, comparisons, reference, claims[0] if claims else None, mixed,
                                              best_on_validation(rows), command))
    write_csv(rows, keys, out / "table.csv")
    write_comparisons_csv(comparisons, out / "comparisons.csv")
    plot_bars(rows, keys, out / "bars.png")
    plot_seeds(rows, keys, out / "seeds.png")
    plot_curves(jobs, keys, out / "curves.png")
    return text


def table_markdown(rows: list[dict], keys: list[str], reference: str, mixed: list, comparisons: list[dict],
                   delta_m: tuple[dict, list[dict]], claims: tuple | None, claims_file: Path | None) -> str:
    """table.md's text: a warning where rows mix runs made differently, the table and its
    provenance, then the comparisons, Δm and the claims where the report has them."""
    baselines, deltas = delta_m
    sections = [*mixed_warning(mixed), scores_caption(rows, keys), "", markdown(rows, keys), "",
                "## Provenance", "", provenance_markdown(rows)]
    if comparisons:
        sections += ["", f"## Paired comparisons against {reference}", "",
                     comparisons_markdown(comparisons, reference)]
    if deltas:
        sections += ["", "## Δm against single-task baselines", "", delta_m_markdown(baselines, deltas)]
    if claims is not None:
        sections += ["", "## Claims", "", claims_markdown(claims_file.name, *claims, comparisons, reference)]
    return "\n".join(sections) + "\n"


def mixed_warning(mixed: list) -> list[str]:
    """The lines that flag rows pooling runs made differently (reported with --allow-mixed)."""
    if not mixed:
        return []
    return ["## Warning: rows mixing runs made differently", "",
            "Reported with --allow-mixed: these rows' intervals and tests pool runs that "
            "differ in more than the seed.", "", *mixed_lines(mixed), ""]


def scores_caption(rows: list[dict], keys: list[str]) -> str:
    """What the table's numbers are: which split chose and scores each run's checkpoint, the
    interval over seeds, and the paper's numbers where the table has its rows."""
    on_dev = (", or on dev where a row's notes say \"selected on dev\": dev then both chose and "
              "scores it, which flatters it" if any(r["on_dev"] for r in rows) else "")
    return (f"Dev scores of the checkpoint each run chose (on the held-out validation rows{on_dev}): "
            "the mean over completed seeds, its 95% Student-t interval over seeds in brackets "
            "(with 2 seeds or more)"
            + (", the paper's number in parentheses." if has_paper_rows(rows, keys) else "."))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mtbert.report",
                                     description="Table 1 from sweep folders, with its statistics")
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
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        print(report(args.folders, args.out, args.reference, None if args.no_claims else args.claims,
                     args.data_root, args.allow_mixed, shlex.join([*parser.prog.split(), *argv])))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"\nwritten to {args.out or args.folders[0]}: table.md, readings.md, table.csv, "
          "comparisons.csv, bars.png, seeds.png, curves.png")

