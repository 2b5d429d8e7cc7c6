import csv
import gzip
import hashlib

import pytest
import torch

from mtbert.errors import DataError
from mtbert.data import RejectedRows, Task, read_split
from mtbert.evaluate import score

SST = Task("sst", {"train": "ids-sst-train.csv"}, ["sentence"], "sentiment", classes=5)
QUORA = Task("para", {}, ["sentence1", "sentence2"], "is_duplicate", classes=2)
STS = Task("sts", {}, ["sentence1", "sentence2"], "similarity", score_range=(0.0, 5.0))


def write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_reads_synthetic_files_with_quirks(data_dir):
    rows = read_split(SST, data_dir / "ids-sst-train.csv", RejectedRows(), labelled=True)
    assert len(rows) == 60 and not rows.texts[0][0].startswith(" ")
    assert all(label in range(5) for label in rows.labels)
    quora = read_split(QUORA, data_dir / "quora-dev.csv", RejectedRows(), labelled=True)
    assert set(quora.labels) <= {0.0, 1.0}
    assert any(t.startswith('"Tell') for t in quora.texts[1]), "quoted fields keep their text"
    # the SST test file has an extra leading column: read by name, not position
    test = read_split(SST, data_dir / "ids-sst-test-student.csv", RejectedRows(), labelled=False)
    assert test.labels is None and len(test.ids[0]) == 25 and test.texts[0][0].startswith("The film")


def test_cs224n_quoting(tmp_path):
    path = write(tmp_path / "q.csv", ["", "id", "sentence1", "sentence2", "is_duplicate"],
                 [["1", "a" * 25, 'Do I need "the" here?', "Grammar: what?", "1.0"]])
    rows = read_split(QUORA, path, RejectedRows(), labelled=True)
    assert rows.texts[0] == ['Do I need "the" here?'] and rows.labels == [1.0]


BAD = [
    ["0", "x" * 25, "fine sentence", "3"],
    ["1", "y" * 25, "label out of range", "7"],
    ["2", "z" * 25, "   ", "2"],
    ["3", "w" * 25, "missing label", ""],
    ["4", "v" * 25, "too many", "1", "extra"],
    ["5", "u" * 25, "not a number", "three"],
    ["6", "t" * 25, "half a class", "2.5"],
]


def test_bad_rows_skipped_counted_and_written(tmp_path, caplog):
    path = write(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"], BAD)
    rejected = RejectedRows("skip")
    rows = read_split(SST, path, rejected, labelled=True)
    assert rows.ids == ["x" * 25]
    assert [r[1] for r in rejected.rows] == [3, 4, 5, 6, 7, 8]  # file lines (header is line 1)
    reasons = " | ".join(r[2] for r in rejected.rows)
    for words in ("not a class", "empty sentence", "missing label", "columns", "not a number"):
        assert words in reasons
    assert "skipped 6 bad row(s)" in caplog.text
    rejected.write(tmp_path / "rejected_rows.tsv")
    lines = (tmp_path / "rejected_rows.tsv").read_text().splitlines()
    assert lines[0] == "file\tline\treason\trow" and len(lines) == 7


def test_bad_rows_error_policy_names_file_line_and_reason(tmp_path):
    path = write(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"], BAD)
    with pytest.raises(DataError, match=r"sst.csv, line 3: label '7' is not a class in 0..4"):
        read_split(SST, path, RejectedRows("error"), labelled=True)


def test_regression_label_range(tmp_path):
    path = write(tmp_path / "sts.csv", ["", "id", "sentence1", "sentence2", "similarity"],
                 [["0", "a" * 25, "a", "b", "5.0"], ["1", "b" * 25, "a", "b", "5.1"],
                  ["2", "c" * 25, "a", "b", "nan"]])
    rejected = RejectedRows()
    assert read_split(STS, path, rejected, labelled=True).labels == [5.0]
    assert len(rejected.rows) == 2


def test_missing_file_and_columns_are_clear(tmp_path):
    with pytest.raises(DataError, match="data file .*nope.csv not found.*mtbert.data download.*MTBERT_DATA_DIR"):
        read_split(SST, tmp_path / "nope.csv", RejectedRows(), labelled=True)
    path = write(tmp_path / "sst.csv", ["", "id", "text", "sentiment"], [["0", "a", "b", "1"]])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['sentence'\]"):
        read_split(SST, path, RejectedRows(), labelled=True)


def test_limit_keeps_first_valid_rows(data_dir):
    rows = read_split(SST, data_dir / "ids-sst-train.csv", RejectedRows(), labelled=True, limit=7)
    assert len(rows) == 7
    assert rows.counts == {"rows": 60, "valid": 60, "kept": 7, "skipped": 0, "control_characters": 0,
                           "sha256": hashlib.sha256((data_dir / "ids-sst-train.csv").read_bytes()).hexdigest()}


def test_limit_never_hides_a_bad_row_further_down(tmp_path, caplog):
    """data.limit keeps the first valid rows, but the whole file is validated."""
    rows = [[str(i), f"{i:025x}", f"sentence {i}", str(i % 5)] for i in range(80)]
    rows[60][3] = "9"  # file line 62
    path = write(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"], rows)
    with pytest.raises(DataError, match=r"sst.csv, line 62: label '9' is not a class"):
        read_split(SST, path, RejectedRows("error"), labelled=True, limit=10)
    kept = read_split(SST, path, RejectedRows("skip"), labelled=True, limit=10)
    assert len(kept) == 10 and kept.counts["skipped"] == 1 and "skipped 1 bad row(s) of 80" in caplog.text


def test_duplicate_ids_are_bad_rows(tmp_path):
    path = write(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"],
                 [["0", "a" * 25, "one", "1"], ["1", "b" * 25, "two", "2"], ["2", "a" * 25, "three", "3"]])
    rejected = RejectedRows("skip")
    assert read_split(SST, path, rejected, labelled=True).ids == ["a" * 25, "b" * 25]
    assert rejected.rows[0][1:3] == (4, f"duplicate id {'a' * 25!r} (first on line 2)")
    with pytest.raises(DataError, match="line 4: duplicate id"):
        read_split(SST, path, RejectedRows("error"), labelled=True)


def test_control_characters_are_counted_and_kept(tmp_path, caplog):
    path = write(tmp_path / "sst.csv", ["", "id", "sentence", "sentiment"],
                 [["0", "a" * 25, "guilt\x7f?", "1"], ["1", "b" * 25, "nul\x00here", "2"], ["2", "c" * 25, "ok", "3"]])
    rows = read_split(SST, path, RejectedRows("error"), labelled=True)
    assert len(rows) == 3 and rows.counts["control_characters"] == 2
    assert "2 row(s) hold control characters (the first: U+007F on line 2, column 'sentence')" in caplog.text


@pytest.mark.parametrize("content, message", [
    (b"\tid\tsentence\tsentiment\n0\taaa\tcaf\xe9 au lait\t1\n", r"line 2: byte 0xe9 is not UTF-8.*re-encode it as UTF-8"),
    (gzip.compress(b"\tid\tsentence\tsentiment\n", mtime=0), "is gzip-compressed; decompress it"),
    ("\tid\tsentence\tsentiment\n".encode("utf-16"), "is UTF-16; re-encode it as UTF-8"),
])
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_a_file_that_is_not_utf8_names_file_line_and_fix(content, message, policy, tmp_path):
    path = tmp_path / "sst.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"sst.csv.*{message}"):
        read_split(SST, path, RejectedRows(policy), labelled=True)


def test_a_folder_or_a_symlink_loop_says_what_it_is(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match="folder.csv is a directory, not a data file"):
        read_split(SST, tmp_path / "folder.csv", RejectedRows(), labelled=True)
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    with pytest.raises(DataError, match="cannot read data file .*loop.csv: Too many levels of symbolic links"):
        read_split(SST, tmp_path / "loop.csv", RejectedRows(), labelled=True)
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "gone.csv")
    with pytest.raises(DataError, match="dangling.csv is a broken symbolic link"):
        read_split(SST, tmp_path / "dangling.csv", RejectedRows(), labelled=True)


def test_bad_policy_name():
    with pytest.raises(ValueError, match="data.bad_rows must be 'skip' or 'error'"):
        RejectedRows("drop")


def test_task_declaration_checked():
    with pytest.raises(ValueError, match="exactly one of"):
        Task("x", {}, ["a"], "y")
    assert STS.metric_key == "sts_pearson" and SST.metric_key == "sst_acc" and STS.is_pair


def test_pearson_is_null_where_undefined():
    labels = torch.tensor([1.0, 2.0, 3.0])
    assert score(STS, torch.tensor([1.0, 2.0, 4.0]), labels) == pytest.approx(0.9820, abs=1e-4)
    assert score(STS, torch.tensor([0.5, 0.5, 0.5]), labels) is None  # constant predictions
    assert score(STS, torch.tensor([0.5]), labels[:1]) is None  # data.limit.dev=1
