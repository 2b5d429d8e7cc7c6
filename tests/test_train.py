"""train.py end to end, as a user runs it (model=tiny, budget=smoke, synthetic data)."""

import json

import pytest
import torch

from conftest import read_results, run_module, run_train

SMOKE = ("model=tiny", "budget=smoke")


def events(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.parametrize("sampler, steps_per_epoch", [
    ("sequential", 15), ("rr_under", 5), ("rr_over", 5)])  # 40 rows per task, batch 8
def test_train_each_sampler(sampler, steps_per_epoch, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = run_train(*SMOKE, f"sampler={sampler}", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["error"] is None
    assert results["steps"] == 2 * steps_per_epoch
    assert set(results["dev"]) == {"sst_acc", "para_acc", "sts_pearson", "mean", "overall"}
    dev = results["dev"]
    assert dev["mean"] == pytest.approx((dev["sst_acc"] + dev["para_acc"] + dev["sts_pearson"]) / 3)
    assert dev["overall"] == pytest.approx(
        (dev["sst_acc"] + dev["para_acc"] + (dev["sts_pearson"] + 1) / 2) / 3)
    per_task = {"sequential": 80, "rr_under": 80, "rr_over": 80}[sampler]
    assert results["examples_seen"] == {"sst": per_task, "para": per_task, "sts": per_task}
    evals = events(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and evals[-1]["step"] == results["steps"]
    assert results["best_epoch"] in (1, 2)
    assert any(e["validation"] == results["validation"] for e in evals), "results hold the best evaluation"
    assert results["selected_on"] == "validation" and "dev" not in evals[0], "dev only reports"
    assert events(run_dir, "train") and (run_dir / "checkpoints" / "best.safetensors").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "sst_acc" in proc.stdout and "run directory:" in proc.stdout


def test_evaluations_keep_to_epochs(tmp_path, data_dir):
    """Twice in each 5-step epoch: at steps 3 and 5, then 8 and 10, never across an epoch end."""
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "sampler=rr_over", "trainer.evals_per_epoch=2", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, data=data_dir)
    assert [(e["epoch"], e["step"]) for e in events(run_dir, "eval")] == [(1, 3), (1, 5), (2, 8), (2, 10)]
    run_train(*SMOKE, "sampler=rr_over", "trainer.eval_every_steps=4", f"hydra.run.dir={tmp_path / 'every'}",
              cwd=tmp_path, data=data_dir)
    assert [e["step"] for e in events(tmp_path / "every", "eval")] == [4, 8, 10]


def test_milestone_baseline_trains_sst_only_and_evaluates_all(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "experiment=milestone_baseline", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    assert results["experiment"] == "milestone_baseline"
    assert results["examples_seen"] == {"sst": 80}
    assert results["device"] == "cpu" and results["precision"] in ("bf16", "fp32")  # what auto resolved to
    sst_train = results["data"]["sst"]["train"]  # budget=smoke: data.limit 40 of the file's 60 rows
    assert (sst_train["rows"], sst_train["kept"], sst_train["skipped"]) == (60, 40, 0)
    assert sst_train["path"] == str((data_dir / "ids-sst-train.csv").resolve()) and len(sst_train["sha256"]) == 64
    # para and sts are evaluated, not trained: their training files give held-out rows alone
    assert set(results["data"]) == {"sst", "para", "sts"} and set(results["data"]["para"]) == {"train", "dev"}
    assert results["data"]["para"]["train"]["validation"] == 6 and set(results["validation"]) >= {"para_acc"}
    mode = (run_dir / "metrics.jsonl").stat().st_mode & 0o777
    assert all(f.stat().st_mode & 0o777 == mode for f in (run_dir / "checkpoints").iterdir()), "no odd modes"
    assert all(results["dev"][k] is not None for k in ("sst_acc", "para_acc", "sts_pearson"))


def test_bad_rows_skip_then_error(tmp_path, data_dir):
    path = data_dir / "sts-train.csv"
    with open(path, "a") as f:
        f.write("99\tabcdefabcdefabcdefabcdefa\tA sentence.\tAnother.\t7.5\n")
    run_dir = tmp_path / "skip"
    proc = run_train(*SMOKE, f"hydra.run.dir={run_dir}", "data.limit.train=null",
                     cwd=tmp_path, data=data_dir)
    assert "sts-train.csv: skipped 1 bad row(s)" in proc.stdout + proc.stderr
    rejected = (run_dir / "rejected_rows.tsv").read_text().splitlines()
    assert len(rejected) == 2 and "\t62\tlabel '7.5' is outside 0.0..5.0\t" in rejected[1]

    run_dir = tmp_path / "error"
    proc = run_train(*SMOKE, f"hydra.run.dir={run_dir}", "data.limit.train=null",
                     "data.bad_rows=error", cwd=tmp_path, data=data_dir, check=False)
    assert proc.returncode != 0
    assert "error: DataError: " in proc.stderr and "sts-train.csv, line 62: label '7.5' is outside 0.0..5.0" in proc.stderr
    assert "Traceback" not in proc.stderr, "a user's mistake is one message, not a stack trace"
    results = read_results(run_dir)
    assert results["status"] == "failed" and "line 62" in results["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_job_that_cannot_start_still_reports_and_the_sweep_goes_on(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_train("-m", *SMOKE, "seed=0,1", "trainer.device=cuda", f"hydra.sweep.dir={sweep}",
              cwd=tmp_path, data=data_dir)
    jobs = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/results.json"))]
    assert [j["seed"] for j in jobs] == [0, 1]
    assert all(j["status"] == "failed" and "use trainer.device=cpu" in j["error"] for j in jobs)


def test_same_seed_same_run(tmp_path, data_dir):
    dev = []
    for name in ("a", "b"):
        run_train(*SMOKE, "trainer.max_seconds=null", f"hydra.run.dir={tmp_path / name}",
                  cwd=tmp_path, data=data_dir)
        dev.append(read_results(tmp_path / name)["dev"])
    assert dev[0] == dev[1]


def test_predict_writes_cs224n_files(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "loss=cosine", f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    data = {"MTBERT_DATA_DIR": str(data_dir)}
    proc = run_module("mtbert.predict", str(run_dir), cwd=tmp_path, env=data)
    assert proc.returncode == 0, proc.stderr
    assert "para test: no file" in proc.stdout and "skipped" in proc.stdout
    moved = run_module("mtbert.predict", str(run_dir), "--data-root", str(tmp_path / "gone"), cwd=tmp_path)
    assert moved.returncode == 1 and f"data.root {tmp_path / 'gone'} of {run_dir} is not a folder" in moved.stderr
    sst_dev = data_dir / "ids-sst-dev.csv"
    sst_dev.write_text(sst_dev.read_text() + "60\tfeedbeef\tanother film .\t2\n")
    changed = run_module("mtbert.predict", str(run_dir), cwd=tmp_path, env=data)
    assert changed.returncode == 1 and "sst dev: " in changed.stderr and "is not the file the run evaluated" in changed.stderr
    out = run_dir / "predictions"
    assert sorted(p.name for p in out.iterdir()) == [
        "para-dev-output.csv", "sst-dev-output.csv", "sst-test-output.csv",
        "sts-dev-output.csv", "sts-test-output.csv"]
    lines = (out / "sst-dev-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Sentiment " and len(lines) == 61
    row_id, label = lines[1].split(" , ")
    assert len(row_id) == 25 and label.strip() in {"0", "1", "2", "3", "4"}
    sts = (out / "sts-test-output.csv").read_text().splitlines()
    assert sts[0] == "id \t Predicted_Similiarity " and len(sts) == 61
    float(sts[1].split(" , ")[1])
