"""Error analysis: a hand-made case with known answers, and a tiny run end to end."""

import csv
import json

import numpy as np
import pytest

from conftest import run_module, run_train
from mtbert.analyze import analyze, classification
from mtbert.data import Split, Task


def test_confusion_per_class_and_most_confident_errors_by_hand(tmp_path):
    task = Task("sst", {"dev": "x"}, ["sentence"], "label", classes=3)
    texts = ["a", "b c", "d e f", "g h i j", "k"]
    rows = Split(task, tmp_path, ["i0", "i1", "i2", "i3", "i4"], [texts], [0, 1, 2, 2, 1])
    probs = np.array([[0.8, 0.1, 0.1],    # right
                      [0.7, 0.2, 0.1],    # wrong: 1 -> 0 at 0.7
                      [0.1, 0.1, 0.8],    # right
                      [0.05, 0.9, 0.05],  # wrong: 2 -> 1 at 0.9, the most confident error
                      [0.3, 0.6, 0.1]])   # right
    lines = classification(task, rows, np.array(rows.labels), probs, top=5, out=tmp_path)
    confusion = list(csv.reader(open(tmp_path / "sst_confusion.csv")))
    assert confusion[1:] == [["0", "1", "0", "0"], ["1", "1", "1", "0"], ["2", "0", "1", "1"]]
    per_class = {r["class"]: r for r in csv.DictReader(open(tmp_path / "sst_per_class.csv"))}
    assert (per_class["0"]["precision"], per_class["0"]["recall"]) == ("0.500", "1.000")
    assert (per_class["1"]["precision"], per_class["1"]["recall"]) == ("0.500", "0.500")
    assert (per_class["2"]["precision"], per_class["2"]["recall"]) == ("1.000", "0.500")
    errors = list(csv.DictReader(open(tmp_path / "sst_errors.csv")))
    assert [(e["id"], e["gold"], e["predicted"], e["confidence"]) for e in errors] == [
        ("i3", "2", "1", "0.900"), ("i1", "1", "0", "0.700")]
    assert lines[0] == "## sst: accuracy 0.6000 (5 examples, 2 wrong)"
    assert '- "g h i j": gold 2, predicted 1 with probability 0.900' in lines


def test_analyze_a_tiny_run(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train("model=tiny", "budget=smoke", "logger=none", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, data=data_dir)
    proc = run_module("mtbert.analyze", str(run_dir), "--top", "3", cwd=tmp_path,
                      env={"MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "analysis"
    for task in ("sst", "para"):
        for suffix in ("confusion.csv", "confusion.png", "per_class.csv", "errors.csv", "by_length.csv"):
            assert (out / f"{task}_{suffix}").stat().st_size > 0
    for suffix in ("scatter.png", "residuals.csv", "errors.csv", "by_length.csv"):
        assert (out / f"sts_{suffix}").stat().st_size > 0
    # the best checkpoint, analysed, scores what the run recorded for it
    dev = json.loads((run_dir / "results.json").read_text())["dev"]
    confusion = np.array([r[1:] for r in csv.reader(open(out / "sst_confusion.csv"))][1:], dtype=int)
    assert confusion.sum() == 40  # budget=smoke: the run evaluated 40 dev rows
    assert np.trace(confusion) / 40 == pytest.approx(dev["sst_acc"], abs=1e-6)  # a float32 mean
    summary = (out / "summary.md").read_text()
    assert f"## sts: Pearson r {dev['sts_pearson']:.4f} (40 examples)" in summary
    assert len(list(csv.DictReader(open(out / "sts_errors.csv")))) == 3
    assert "written to" in proc.stdout


def test_a_single_task_baseline_is_analysed_on_its_own_task(tmp_path, data_dir, monkeypatch):
    run_dir = tmp_path / "run"
    run_train("experiment=single_sts", "model=tiny", "budget=smoke", "logger=none", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, data=data_dir)
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    out = analyze(run_dir, top=3, device="cpu", data_root=str(data_dir))
    assert sorted(p.name for p in out.iterdir()) == [
        "sts_by_length.csv", "sts_errors.csv", "sts_residuals.csv", "sts_scatter.png", "summary.md"]
