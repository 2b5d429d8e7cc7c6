"""Tasks as data, and the readers that turn the CS224N files into validated examples.

A task is declared in `conf/data/*.yaml` (files, columns, label kind); nothing below
names SST, Quora or STS. Bad rows are never dropped silently: with `bad_rows=skip` they
are counted per file and written to `rejected_rows.tsv`; with `bad_rows=error` the first
one stops the run, naming file, line and reason. A bad row is a wrong column count, an
empty id or sentence, a missing or invalid label, an id seen before in the same file, or
the line of a quote never closed (reading resumes on the line after it). A control
character inside a sentence (the real files hold a few, such as U+007F) is counted and
warned about, and the row kept: BERT tokenizers drop such characters. A file that is not
UTF-8 text, or a path that is no regular file (a FIFO, a device), stops the run under
either policy, naming the line and byte, or what the path is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.errors import DataError

log = logging.getLogger(__name__)

DATA_HELP = (
    "Get the CS224N files with `python -m mtbert.data download --to data` (or, with Quora's "
    "full training set from the Hugging Face hub, `pip install -e '.[hub]'` and "
    "`python -m mtbert.data download --source hub --to data`), then point data.root (or the "
    "MTBERT_DATA_DIR environment variable) at that folder."
)


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


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
    counts: dict = field(default_factory=dict)  # rows read, valid, kept and skipped; the file's sha256

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        """The reader's counts for the log: '60 rows, 59 valid, 40 kept, 1 skipped'."""
        c = self.counts
        return f"{c['rows']} rows, {c['valid']} valid, {c['kept']} kept, {c['skipped']} skipped"


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
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # LF, as every file a run writes
            writer.writerow(["file", "line", "reason", "row"])
            writer.writerows(self.rows)


def read_split(task: Task, path: Path, rejected: RejectedRows, labelled: bool,
               limit: int | None = None) -> Split:
    """Read one tab-separated CS224N file by column name, validating every row.

    The whole file is always validated, so every bad row is counted (and with
    `bad_rows=error` stops the run) even when `limit` keeps only the first valid rows
    (for quick runs). A repeated id is a bad row, since prediction files are keyed by id.
    A row is named by its first line; blank lines are not rows. One pass over the file,
    each row's fate decided where it is read, so over 40 lines: split, a row's checks
    would need the reader's state (line numbers, ids seen, the kept count) handed around.
    """
    text, digest = read_text(path)
    ids, texts, labels = [], [[] for _ in task.sentences], []
    read = skipped = 0
    first_bad = None  # (line, reason) of the file's first bad row
    seen: dict[str, int] = {}
    control = []  # (line, character, column) of rows with control characters
    records = _records(text)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path} is empty; expected a header row. {DATA_HELP}")
    header = first.fields
    wanted = [task.id, *task.sentences] + ([task.label] if labelled else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: header {header} lacks column(s) {missing}")
    col = {name: header.index(name) for name in wanted}
    for record in records:
        line, row, read = record.line, record.fields, read + 1
        reason = record.problem or _row_problem(task, row, header, col, labelled)
        if not reason and row[col[task.id]] in seen:
            reason = f"duplicate id {row[col[task.id]]!r} (first on line {seen[row[col[task.id]]]})"
        if reason:
            if record.last > line and not record.problem:
                reason += f" (the record runs over lines {line}-{record.last})"
            rejected.add(path, line, reason, row)
            skipped += 1
            first_bad = first_bad or (line, reason)
            continue
        seen[row[col[task.id]]] = line
        for column in task.sentences:
            if found := CONTROL.search(row[col[column]]):
                control.append((line, found.group(), column))
                break
        if limit is not None and len(ids) >= limit:
            continue
        ids.append(row[col[task.id]])
        for column, out in zip(task.sentences, texts):
            out.append(row[col[column]].strip())
        if labelled:
            labels.append(task.parse_label(row[col[task.label]]))
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d (the first: line %d, %s)",
                    path, skipped, read, *first_bad)
    if control:
        line, char, column = control[0]
        log.warning("%s: %d row(s) hold control characters (the first: U+%04X on line %d, column %r); "
                    "kept, since the tokenizer drops them", path, len(control), ord(char), line, column)
    if not ids:
        raise DataError(f"{path} has no valid rows")
    return Split(task, path, ids, texts, labels if labelled else None,
                 {"rows": read, "valid": read - skipped, "kept": len(ids), "skipped": skipped,
                  "control_characters": len(control), "sha256": digest})


@dataclass
class _Record:
    line: int  # the first of its lines
    last: int
    fields: list[str]
    problem: str | None = None  # what makes it a bad row before its fields are looked at


def _records(text: str):
    """The file's records, each with the lines it covers; blank lines are skipped.

    A quoted field may hold a line break, so one record may cover several lines. Where
    a field swallowed line breaks and tabs (whole rows), a record over several lines has
    the wrong number of columns, or a field runs past csv's size limit, a quote was
    most likely never closed: then the record's first line alone is a bad row, and
    reading resumes on the line after it, so one stray quote costs one row, not the rest
    of the file.
    """
    lines = list(io.StringIO(text, newline=""))  # split as csv splits them: \n, \r or \r\n
    before = done = 0  # lines before the reader's first; lines read
    reader = csv.reader(lines, delimiter="\t")
    columns = None  # the header's
    while True:
        first = done + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field past csv.field_size_limit()
            done = before + reader.line_num
            problem = _too_long(e, first, done)
        else:
            done = before + reader.line_num
            if not "".join(fields).strip() and len(fields) < 2:  # a blank line, or spaces alone
                continue
            problem = _swallowed(fields, columns, first, done)
        if problem:
            yield _Record(first, first, lines[first - 1].rstrip("\r\n").split("\t"), problem)
            before = done = first
            reader = csv.reader(itertools.islice(lines, first, None), delimiter="\t")
            continue
        columns = columns or len(fields)
        yield _Record(first, done, fields)


def _swallowed(fields: list[str], columns: int | None, first: int, last: int) -> str | None:
    """Why a record whose quoted field holds a line break looks like rows swallowed by an
    unclosed quote (None when it looks like one row that holds a line break)."""
    if columns is None or not any("\n" in f or "\r" in f for f in fields):
        return None
    if any("\t" in f and ("\n" in f or "\r" in f) for f in fields):
        what = "run into one field, tabs and line breaks included"
    elif len(fields) != columns:
        what = f"have {len(fields)} columns, the header {columns}"
    else:
        return None
    return _unclosed(first, last, what)


def _too_long(error: csv.Error, first: int, last: int) -> str:
    if "field limit" not in str(error):
        return f"csv cannot read it ({error})"
    limit = csv.field_size_limit()
    if last > first:
        return _unclosed(first, last, f"run past csv's limit of {limit} characters for a field")
    return f"a field is longer than {limit} characters, csv's limit; no sentence is that long"


def _unclosed(first: int, last: int, what: str) -> str:
    span = f"lines {first}-{last}" if last > first else f"line {first} to the end of the file"
    return (f"a quote opens a field on this line and is not closed on it: read as one record, {span} "
            f"would {what}. Likely an unclosed quote: close it, or remove it")


def read_text(path: Path) -> tuple[str, str]:
    """The file as text and the SHA-256 of its bytes, or a DataError that says what the path
    is instead of a readable UTF-8 file (a folder, a broken link, a FIFO or device, gzip,
    UTF-16, a stray byte and its line)."""
    _check_regular(path)
    try:
        data = path.read_bytes()
    except OSError as e:  # no permission, ...
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed; decompress it (gunzip) and keep the name")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path} is UTF-16; re-encode it as UTF-8 "
                        f"(iconv -f UTF-16 -t UTF-8 {path.name} > fixed.csv)")
    try:
        return data.decode("utf-8-sig"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (the file "
                        "holds another encoding, such as Latin-1); re-encode it as UTF-8 "
                        f"(iconv -f LATIN1 -t UTF-8 {path.name} > fixed.csv)") from None


NOT_FILES = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def _check_regular(path: Path):
    """Refuse, before opening it, a path that is not a regular file (after its links): a
    FIFO would block the reader, a device such as /dev/zero would never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        what = "is a broken symbolic link" if path.is_symlink() else "not found"
        raise DataError(f"data file {path} {what}. {DATA_HELP}") from None
    except OSError as e:  # a symlink loop, no permission, ...
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path} is a directory, not a data file; data.tasks.<task>.files name "
                        "files inside data.root")
    if not stat.S_ISREG(mode):
        link = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        what = next((name for test, name in NOT_FILES.items() if test(mode)), "not a file")
        raise DataError(f"{path}{link} is {what}, not a regular file: mtbert reads a data file whole, "
                        "so copy the data into a file and name that file")


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
