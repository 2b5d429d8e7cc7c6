"""`python -m mtbert.data download` against a server on 127.0.0.1 (and file://), and the
hub conversion on small datasets the test builds: nothing leaves this machine."""

import contextlib
import functools
import http.server
import subprocess
import sys
import threading

import pytest

from conftest import write_cs224n
from mtbert.data import RejectedRows, read_split
from mtbert.data.download import build_from_hub, cs224n_files, download

FILES = [name for _, _, name in cs224n_files()]


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `truncate` names files sent with their full length announced but
    only half their bytes."""
    truncate: set = set()

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name in self.truncate:
            with open(self.translate_path(self.path), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder, truncate=()):
    handler = type("H", (Handler,), {"truncate": set(truncate)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/data"
    finally:
        server.shutdown()


@pytest.fixture
def mirror(tmp_path):
    write_cs224n(tmp_path / "mirror" / "data")  # every file but quora-test-student.csv
    return tmp_path / "mirror"


def statuses(outcomes):
    return {o.file: o.status for o in outcomes}


def test_download_checks_every_file_and_skips_what_is_there(mirror, tmp_path):
    to = tmp_path / "data"
    with serve(mirror) as url:
        first = download(to, url)
        assert statuses(first) == {**{f: "downloaded" for f in FILES}, "quora-test-student.csv": "missing"}
        assert first[0].counts["rows"] == 60 and first[0].counts["skipped"] == 0
        for name in FILES:
            if name != "quora-test-student.csv":
                assert (to / name).read_bytes() == (mirror / "data" / name).read_bytes()
        again = download(to, url)
    assert statuses(again) == {**{f: "present" for f in FILES}, "quora-test-student.csv": "missing"}
    assert sorted(p.name for p in to.iterdir()) == sorted(f for f in FILES if f != "quora-test-student.csv")


def test_a_404_a_truncated_transfer_and_bad_rows(mirror, tmp_path, caplog):
    (mirror / "data" / "sts-dev.csv").unlink()  # a required file the mirror lacks
    sst = mirror / "data" / "ids-sst-dev.csv"
    sst.write_text(sst.read_text() + "60\tffff\tan extra row\t9\n")  # one bad label
    to = tmp_path / "data"
    with serve(mirror, truncate={"quora-train.csv"}) as url:
        outcomes = {o.file: o for o in download(to, url)}
    assert outcomes["sts-dev.csv"].status == "failed" and "sts-dev.csv: HTTP 404" in outcomes["sts-dev.csv"].detail
    assert outcomes["quora-train.csv"].status == "failed" and "transfer cut short" in outcomes["quora-train.csv"].detail
    assert not (to / "quora-train.csv").exists() and not (to / "sts-dev.csv").exists()
    assert outcomes["ids-sst-dev.csv"].status == "downloaded"
    assert outcomes["ids-sst-dev.csv"].counts == {**outcomes["ids-sst-dev.csv"].counts, "rows": 61, "skipped": 1}
    assert [p.name for p in to.iterdir() if p.name.startswith(".")] == []  # no partial file left
    warned = [r.getMessage() for r in caplog.records if "skipped 1 bad row" in r.getMessage()]
    assert warned and warned[0].startswith(f"{to / 'ids-sst-dev.csv'}:"), "named as the file it becomes"
    assert not any(".partial-" in r.getMessage() for r in caplog.records)


def test_the_command_with_a_file_url_and_its_summary(mirror, tmp_path):
    to = tmp_path / "data"
    cmd = [sys.executable, "-m", "mtbert.data", "download", "--to", str(to), "--base-url", (mirror / "data").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ids-sst-train.csv          downloaded       60       60        0" in proc.stdout
    assert "ids-sst-train.csv: 100%" in proc.stderr, "each file's bar is left at its end"
    assert f"ready: python train.py data.root={to}" in proc.stdout
    (mirror / "data" / "sts-train.csv").unlink()
    (to / "sts-train.csv").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "sts-train.csv              failed     " in proc.stdout and "--base-url URL" in proc.stdout


def test_hub_conversion_on_a_local_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {
        ("SetFit/sst5", None): lambda n: {"text": [f"film {i}\twith a tab" for i in range(n)],
                                          "label": [i % 5 for i in range(n)], "label_text": ["x"] * n},
        ("nyu-mll/glue", "qqp"): lambda n: {"question1": [f"q{i}?" for i in range(n)],
                                            "question2": [f"p{i}?" for i in range(n)],
                                            "label": [i % 2 for i in range(n)], "idx": list(range(n))},
        ("nyu-mll/glue", "stsb"): lambda n: {"sentence1": [f"s{i}" for i in range(n)],
                                             "sentence2": [f"t{i}" for i in range(n)],
                                             "label": [i % 6 * 0.8 for i in range(n)], "idx": list(range(n))},
    }
    asked = []

    def load(name, config, split):
        asked.append((name, config, split))
        data = rows[(name, config)](7)
        if split == "test" and "label" in data and config:
            data["label"] = [-1] * 7  # GLUE's unlabelled test sets
        return datasets.Dataset.from_dict(data)

    outcomes = build_from_hub(tmp_path, load)
    assert {o.status for o in outcomes} == {"built"} and len(outcomes) == len(FILES)
    assert ("nyu-mll/glue", "qqp", "validation") in asked
    for task, split, name in cs224n_files():
        split_rows = read_split(task, tmp_path / name, RejectedRows("error"), labelled=split != "test")
        assert len(split_rows) == 7 and len(set(split_rows.ids)) == 7 and len(split_rows.ids[0]) == 25
    header = (tmp_path / "quora-test-student.csv").read_text().splitlines()[0]
    assert header == "\tid\tsentence1\tsentence2"
    assert (tmp_path / "ids-sst-train.csv").read_text().splitlines()[1].endswith("\tfilm 0 with a tab\t0")
