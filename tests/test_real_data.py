"""The real CS224N files in $MTBERT_DATA_DIR: their row counts and known quirks."""

import os
from pathlib import Path

import pytest

from mtbert.data import RejectedRows, Task, read_split

ROOT = Path(os.environ.get("MTBERT_DATA_DIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (ROOT / "ids-sst-train.csv").is_file(),
                                reason="MTBERT_DATA_DIR does not hold the CS224N files")

SST = Task("sst", {}, ["sentence"], "sentiment", classes=5)
PARA = Task("para", {}, ["sentence1", "sentence2"], "is_duplicate", classes=2)
STS = Task("sts", {}, ["sentence1", "sentence2"], "similarity", score_range=(0.0, 5.0))

# file, task, labelled, valid rows, rejected rows (README: data rows and quirks)
FILES = [
    ("ids-sst-train.csv", SST, True, 8544, 0),
    ("ids-sst-dev.csv", SST, True, 1101, 0),
    ("ids-sst-test-student.csv", SST, False, 2210, 0),
    ("quora-train.csv", PARA, True, 13507, 0),
    ("quora-dev.csv", PARA, True, 20212, 2),
    ("sts-train.csv", STS, True, 6040, 0),
    ("sts-dev.csv", STS, True, 863, 0),
    ("sts-test-student.csv", STS, False, 1725, 0),
]


@pytest.mark.parametrize("name, task, labelled, rows, bad", FILES)
def test_real_file_row_counts(name, task, labelled, rows, bad):
    rejected = RejectedRows("skip")
    split = read_split(task, ROOT / name, rejected, labelled=labelled)
    assert len(split) == rows and len(rejected.rows) == bad
    assert len(set(split.ids)) == rows and all(len(i) == 25 for i in split.ids)


def test_quora_dev_bad_rows_are_lines_2577_and_14222():
    rejected = RejectedRows("skip")
    read_split(PARA, ROOT / "quora-dev.csv", rejected, labelled=True)
    assert [(line, reason) for _, line, reason, _ in rejected.rows] == [
        (2577, "missing label"), (14222, "empty sentence in column 'sentence2'")]
    # for prediction the unlabelled row is usable; the one without a second sentence is not
    assert len(read_split(PARA, ROOT / "quora-dev.csv", RejectedRows(), labelled=False)) == 20213


def test_the_few_control_characters_are_counted_and_their_rows_kept():
    """quora-dev.csv lines 13291 and 17276 hold U+007F, sts-train.csv line 3003 U+0012."""
    assert read_split(PARA, ROOT / "quora-dev.csv", RejectedRows(), labelled=True).counts["control_characters"] == 2
    sts = read_split(STS, ROOT / "sts-train.csv", RejectedRows("error"), labelled=True)
    assert sts.counts["control_characters"] == 1 and len(sts) == 6040
