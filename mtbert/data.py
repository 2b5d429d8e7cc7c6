"""Tasks as data, and the readers that turn the CS224N files into validated examples.

A task is declared in `conf/data/*.yaml` (files, columns, label kind); nothing below
names SST, Quora or STS. Bad rows are never dropped silently: with `bad_rows=skip` they
are counted per file and written to `rejected_rows.tsv`; with `bad_rows=error` the first
one stops the run, naming file, line and reason.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DATA_HELP = (
    "Point data.root (or the MTBERT_DATA_DIR environment variable) at the folder with the "
    "CS224N minBERT files (ids-sst-*.csv, quora-*.csv, sts-*.csv); see shared/data/README.md."
)


class DataError(ValueError):
    """A data file or row that cannot be used, with where and why."""


@dataclass(frozen=True)
class Task:
    """One task of the study: what to read and how to score it.

    `classes` set means classification (labels are integers 0..classes-1, accuracy);
    `score_range` set means regression (Pearson r). One sentence column is a
    single-sentence task, two make a sentence-pair task.
    """

    name: str
    files: dict[str, str]
    sentences: list[str]
    label: str
    id: str = "id"
    classes: int | None = None
    score_range: tuple[float, float] | None = None
    prediction_header: str = "Predicted"

    def __post_init__(self):
        if (self.classes is None) == (self.score_range is None):
            raise ValueError(f"task {self.name}: set exactly one of `classes` or `score_range`")
        if len(self.sentences) not in (1, 2):
            raise ValueError(f"task {self.name}: `sentences` must name 1 or 2 columns")

    @property
    def is_pair(self) -> bool:
        return len(self.sentences) == 2

    @property
    def metric(self) -> str:
        return "acc" if self.classes is not None else "pearson"

    @property
    def metric_key(self) -> str:
        return f"{self.name}_{self.metric}"

    def parse_label(self, text: str) -> float:
        """The label as a number, or DataError saying why the text is not a valid label."""
        if text is None or not text.strip():
            raise DataError("missing label")
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"label {text!r} is not a number") from None
        if self.classes is not None:
            if not value.is_integer() or not 0 <= value < self.classes:
                raise DataError(f"label {text!r} is not a class in 0..{self.classes - 1}")
        else:
            low, high = self.score_range
            if not (math.isfinite(value) and low <= value <= high):
                raise DataError(f"label {text!r} is outside {low}..{high}")
        return value


@dataclass
class Split:
    """The valid rows of one file: ids, sentence columns and labels (None when unlabelled)."""

    task: Task
    path: Path
    ids: list[str]
    texts: list[list[str]]  # one list per sentence column
    labels: list[float] | None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RejectedRows:
    """Collects bad rows; `policy` is 'skip' (record and go on) or 'error' (stop)."""

    policy: str = "skip"
    rows: list[tuple[str, int, str, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ("skip", "error"):
            raise ValueError(f"data.bad_rows must be 'skip' or 'error', got {self.policy!r}")

    def add(self, path: Path, line: int, reason: str, raw: list[str]):
        if self.policy == "error":
            raise DataError(
                f"{path}, line {line}: {reason}. Fix the row, or run with data.bad_rows=skip "
                "to skip bad rows (they are written to rejected_rows.tsv)."
            )
        self.rows.append((str(path), line, reason, "\t".join(raw)))

    def write(self, path: Path):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["file", "line", "reason", "row"])
            writer.writerows(self.rows)


def read_split(task: Task, path: Path, rejected: RejectedRows, labelled: bool,
               limit: int | None = None) -> Split:
    """Read one tab-separated CS224N file by column name, validating every row.

    `limit` keeps the first valid rows only (for quick runs); it never hides bad rows
    among those read.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}. {DATA_HELP}")
    ids, texts, labels = [], [[] for _ in task.sentences], []
    skipped = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty; expected a header row. {DATA_HELP}")
        wanted = [task.id, *task.sentences] + ([task.label] if labelled else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path}: header {header} lacks column(s) {missing}")
        col = {name: header.index(name) for name in wanted}
        for row in reader:
            line = reader.line_num
            reason = _row_problem(task, row, header, col, labelled)
            if reason:
                rejected.add(path, line, reason, row)
                skipped += 1
                continue
            ids.append(row[col[task.id]])
            for column, out in zip(task.sentences, texts):
                out.append(row[col[column]].strip())
            if labelled:
                labels.append(task.parse_label(row[col[task.label]]))
            if limit is not None and len(ids) >= limit:
                break
    if skipped:
        log.warning("%s: skipped %d bad row(s), listed in rejected_rows.tsv", path, skipped)
    if not ids:
        raise DataError(f"{path} has no valid rows")
    return Split(task, path, ids, texts, labels if labelled else None)


def _row_problem(task: Task, row: list[str], header: list[str], col: dict[str, int],
                 labelled: bool) -> str | None:
    if len(row) != len(header):
        return f"has {len(row)} columns, header has {len(header)}"
    if not row[col[task.id]].strip():
        return "empty id"
    for column in task.sentences:
        if not row[col[column]].strip():
            return f"empty sentence in column {column!r}"
    if labelled:
        try:
            task.parse_label(row[col[task.label]])
        except DataError as e:
            return str(e)
    return None
