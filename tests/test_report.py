"""The report on a synthetic sweep (a failed job, a missing seed) and on a real tiny one."""

import csv
import json
import statistics

import pytest
import yaml

from conftest import run_train
from mtbert.report import PAPER, report


def fake_job(path, experiment, seed, status="completed", dev=None, overrides=()):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    task_overrides = [f"experiment={experiment}", f"seed={seed}", *overrides]
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {
        "runtime": {"choices": {"experiment": experiment}},
        "overrides": {"task": task_overrides}}}))
    if status is None:
        return  # a job that never wrote results.json
    results = {"status": status, "experiment": experiment, "seed": seed, "dev": dev,
               "best_epoch": 1, "steps": 100, "examples_seen": {"sst": 3200, "para": 3200},
               "train_seconds": 120.0, "error": "RuntimeError: boom\nsecond line" if status == "failed" else None}
    (path / "results.json").write_text(json.dumps(results))
    events = [{"step": 50, "event": "eval", "examples_seen": {"sst": 1600}, "dev": dev},
              {"step": 100, "event": "eval", "examples_seen": {"sst": 3200}, "dev": dev}]
    (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, events)) + "\n")


def dev(sst, para, sts):
    return {"sst_acc": sst, "para_acc": para, "sts_pearson": sts, "mean": (sst + para + sts) / 3,
            "overall": 0.0}


def test_report_on_synthetic_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", "rr_over", 0, dev=dev(0.40, 0.70, 0.80))
    fake_job(sweep / "1", "rr_over", 1, dev=dev(0.44, 0.74, 0.86))
    fake_job(sweep / "2", "rr_over", 2, status="failed")
    fake_job(sweep / "3", "rr_under", 0, dev=dev(0.30, 0.60, 0.50))
    fake_job(sweep / "4", "rr_under", 2, status=None)  # seed 1 never ran, seed 2 has no results
    table = report([sweep], tmp_path / "out")
    lines = table.splitlines()
    assert lines[2].startswith("| rr_under |") and lines[3].startswith("| rr_over |"), "Table 1 order"
    over, under = lines[3], lines[2]
    sst = [0.40, 0.44]
    assert f"{statistics.fmean(sst):.3f} ± {statistics.stdev(sst):.3f} ({PAPER['rr_over'][0]:.3f})" in over
    assert "| 2/3 |" in over and "seed 2 failed: RuntimeError: boom second line" in over
    assert "| 1/2 |" in under and "seed 2 missing" in under and "seed 1 missing" in under
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    assert float(rows["rr_over"]["para_acc"]) == pytest.approx(0.72)
    assert float(rows["rr_over"]["mean_paper"]) == PAPER["rr_over"][3]
    assert json.loads(rows["rr_over"]["examples_seen"]) == {"para": 3200, "sst": 3200}
    for png in ("bars.png", "curves.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_rows_named_by_what_tells_them_apart(tmp_path):
    fake_job(tmp_path / "s" / "0", None, 0, dev=dev(0.4, 0.7, 0.8), overrides=["sampler=annealed", "budget=cpu"])
    fake_job(tmp_path / "s" / "1", None, 0, dev=dev(0.4, 0.7, 0.8), overrides=["sampler=adaptive", "budget=cpu"])
    table = report([tmp_path / "s"])
    assert "| sampler=adaptive |" in table and "| sampler=annealed |" in table
    assert (tmp_path / "s" / "table.md").is_file()


def test_an_added_task_gets_its_own_column(tmp_path):
    fake_job(tmp_path / "s" / "0", "rr_over", 0, dev={**dev(0.4, 0.7, 0.8), "nli_mnli_acc": 0.61})
    header, _, row = report([tmp_path / "s"]).splitlines()
    assert header.startswith("| row | SST acc (paper) | Quora acc (paper) | STS r (paper) | nli_mnli_acc (paper) |")
    assert "| 0.610 (-) | 0.633 (0.465) |" in row
    assert next(csv.DictReader(open(tmp_path / "s" / "table.csv")))["nli_mnli_acc"] == "0.61"


def test_report_of_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no jobs"):
        report([tmp_path])


def test_tiny_multirun_of_two_experiments_end_to_end(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_train("-m", "experiment=rr_under,rr_over", "model=tiny", "budget=smoke", "logger=none",
              "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path, data=data_dir)
    table = report([sweep])
    results = [json.loads((sweep / n / "results.json").read_text()) for n in ("0", "1")]
    assert [r["experiment"] for r in results] == ["rr_under", "rr_over"]
    for r in results:
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['experiment']} |"))
        assert f"{r['dev']['sst_acc']:.3f} (" in row and "| 1/1 |" in row
