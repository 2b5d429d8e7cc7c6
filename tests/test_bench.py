"""`python -m mtbert.bench` end to end on synthetic data: the report's structure, not its timings."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_config
from mtbert.bench import speed
from mtbert.bench.speed import NaiveLoop

PAPER_KEYS = {"sst_acc", "para_acc", "sts_pearson", "mean", "overall"}


@pytest.mark.slow
def test_bench_cli_reports_every_variant(tmp_path, data_dir):
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}  # a shared CI machine stalls multi-threaded tiny kernels
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "mtbert.bench", "--model", "tiny", "--device", "cpu", "--precision", "fp32",
         "--batch-size", "6", "--steps", "2", "--warmup", "1", "--rounds", "1",
         "--compare-precision", "--compare-bucketing", "--train-steps", "3",
         "--variant", "optim.optimizer.fused=false weighting=uw", "--out", str(out_json), "--out", str(out_md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # many variants; minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out_json.read_text())

    variants = r["variants"]
    assert list(variants) == ["naive", "mtbert adam", "bare", "mtbert pcgrad", "mtbert adam bf16",
                              "mtbert adam unbucketed", "mtbert adam optim.optimizer.fused=false weighting=uw"]
    for name, v in variants.items():
        assert v["sentences_per_s"] > 0 and v["tokens_per_s"] > 0 and v["mfu"] > 0, name
        # every variant trains on as much: 2 steps of 6 SST + 6 Quora + 6 STS pairs (siamese: 12)
        assert v["rounds"]["sentences"] == [2 * (6 + 6 + 12)], name
    assert variants["naive"]["precision"] == "fp32" and variants["mtbert adam bf16"]["precision"] == "bf16"
    same_batches = variants["mtbert adam"]["rounds"]["tokens"]
    assert variants["bare"]["rounds"]["tokens"] == same_batches
    assert variants["mtbert pcgrad"]["rounds"]["tokens"] == same_batches

    assert set(r["ratios"]) == {"speedup_vs_naive", "overhead_vs_bare", "pcgrad_vs_adam", "bf16_speedup",
                                "bucketing_speedup", "speedup_vs optim.optimizer.fused=false weighting=uw"}
    assert set(r["targets"]) == {"speedup_vs_naive", "overhead_vs_bare", "pcgrad_vs_adam", "eval_seconds",
                                 "mean_vs_naive"}
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert r["eval"]["examples"] == {"sst": 60, "para": 60, "sts": 60}

    short = r["short_run"]
    assert short["mtbert"]["steps"] == short["naive"]["steps"] == 3
    assert 1 <= short["naive, mtbert's time"]["steps"] <= 3
    for run in ("mtbert", "naive", "naive, mtbert's time"):
        assert set(short[run]["dev"]) == PAPER_KEYS and short[run]["train_seconds"] > 0, run
    assert short["mean_vs_naive"] == short["mtbert"]["dev"]["mean"] - short["naive"]["dev"]["mean"]
    assert r["matmul_peak_flops"]["fp32"] > 0 and r["peak_memory_mb"] > 0 and r["layer_params"] > 0
    assert r["machine"]["torch"] and r["settings"]["tasks"] == ["sst", "para", "sts"]

    report = out_md.read_text()
    assert "| naive | fp32 |" in report and "| speedup_vs_naive |" in report and "eval (full dev" in report
    assert "| naive, mtbert's time |" in report
    assert report in proc.stdout


def test_matmul_peak_stops_growing_at_the_first_long_product(monkeypatch):
    sizes, randn = [], torch.randn
    monkeypatch.setattr(speed.torch, "randn", lambda *shape, **kw: sizes.append(shape) or randn(*shape, **kw))
    monkeypatch.setattr(speed, "PEAK_SECONDS", float("inf"))  # no product is long: doubled up to the cap
    assert speed.matmul_peak(torch.device("cpu"), torch.float32) > 0
    assert sizes == [(n, n) for n in (256, 512, 1024, 2048) for _ in range(2)]
    sizes.clear()
    monkeypatch.setattr(speed, "PEAK_SECONDS", 0.0)  # every product is "long": bf16 on a CPU without it
    speed.matmul_peak(torch.device("cpu"), torch.bfloat16)
    assert sizes == [(256, 256)] * 2


def test_bench_counts_what_a_sharing_option_and_smart_run(tmp_path, data_dir, monkeypatch):
    """N is what one task's forward runs, asked of the sharing option, not `model.encoder`'s
    parameters; SMART's extra passes are in its FLOPs per token."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    variants = ["sharing=top_layers", "sharing=lora", "regularizer=smart regularizer.bregman=0.5"]
    r = speed.main(["--model", "tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "4",
                    "--steps", "1", "--warmup", "0", "--rounds", "1", "--no-eval", "--no-memory",
                    *[a for v in variants for a in ("--variant", v)]])
    v = {name.removeprefix("mtbert ").removeprefix("adam "): v for name, v in r["variants"].items()}
    # by hand: conf/model/tiny.yaml's 2 BERT layers, hidden 64, feed-forward 128
    layer = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 2 * 2 * 64
    adapters = 2 * 3 * 8 * (64 + 64)  # one task's: 2 layers x query, key, value x rank 8 (A and B)
    assert r["layer_params"] == v["adam"]["layer_params"] == v["naive"]["layer_params"] == 2 * layer
    assert v["adam"]["flops_per_token"] == v["pcgrad"]["flops_per_token"] == 6 * 2 * layer
    # k=1: one shared layer (all model.encoder holds now) and the task's own copy
    assert v["sharing=top_layers"]["layer_params"] == 2 * layer
    assert v["sharing=top_layers"]["flops_per_token"] == 6 * 2 * layer
    # the frozen base and one task's adapters (not all three tasks'); no weight gradient for the base
    assert v["sharing=lora"]["layer_params"] == 2 * layer + adapters
    assert v["sharing=lora"]["flops_per_token"] == 4 * (2 * layer + adapters) + 2 * adapters
    # a plain step (6N), an ascent step (4N), the term (6N) and the EMA teacher's forward (2N)
    smart = v["regularizer=smart regularizer.bregman=0.5"]
    assert smart["layer_params"] == 2 * layer and smart["flops_per_token"] == 18 * 2 * layer
    same_batches = v["adam"]["rounds"]["tokens"]
    assert all(x["rounds"]["tokens"] == same_batches for x in v.values() if x is not v["naive"])
    assert set(r["ratios"]) >= {f"speedup_vs {x}" for x in variants}
    report = speed.markdown(r)
    lora = 2 * layer + adapters
    assert f"| mtbert adam sharing=lora | fp32 | {lora:,} | {(4 * lora + 2 * adapters) / lora:.1f}N |" in report


@pytest.fixture
def naive_loop(data_dir, tmp_path):
    cfg = compose_config("model=tiny", "logger=none", "data.batch_size=4", data=data_dir, cache=tmp_path / "c")
    return lambda update: NaiveLoop(cfg, ["sst", "para", "sts"], torch.device("cpu"), update)


def test_naive_combined_update_is_one_adamw_step_on_the_summed_loss(naive_loop):
    combined, per_task, by_hand = naive_loop("combined"), naive_loop("per_task"), naive_loop("combined")
    for loop in (combined, per_task):
        torch.manual_seed(1)  # the same dropout masks
        loop.step()
    torch.manual_seed(1)
    batches = {t: by_hand.tokenize(t, next(by_hand.orders[t])) for t in by_hand.train_tasks}
    sum(by_hand.objectives[t].loss(by_hand.model(t, b), b.labels, by_hand.tasks[t])
        for t, b in batches.items()).backward()
    by_hand.optimizer.step()

    name, encoder = next(iter(combined.model.named_parameters()))
    assert name.startswith("encoder.")
    steps = lambda loop: loop.optimizer.state[dict(loop.model.named_parameters())[name]]["step"]
    assert steps(combined) == 1 and steps(per_task) == 3
    group = combined.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.0 and not group["fused"]  # conf/optim/adam.yaml's, unfused
    for (n, a), b in zip(combined.model.named_parameters(), by_hand.model.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert not torch.equal(encoder, dict(per_task.model.named_parameters())[name])


@pytest.mark.slow
def test_load_bench_reports_each_setting_under_each_load(tmp_path, data_dir):
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    out_json, out_md = tmp_path / "load.json", tmp_path / "load.md"
    proc = subprocess.run(
        [sys.executable, "-m", "mtbert.bench.load", "--model", "tiny", "--precision", "fp32", "--batch-size", "4",
         "--steps", "1", "--rounds", "1", "--loads", "0,1", "--out", str(out_json), "--out", str(out_md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out_json.read_text())
    assert list(r["settings"]) == ["spin (torch's default)", "passive", "spin, 1 thread"]
    assert r["settings"]["passive"]["env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert r["settings"]["spin, 1 thread"]["threads"] == 1
    for name, per_load in r["seconds"].items():
        assert list(per_load) == ["0", "1"] and all(v["step_seconds"] > 0 for v in per_load.values()), name
    assert r["seconds"]["spin (torch's default)"]["0"]["vs_idle"] == 1.0
    assert r["chosen"]["1"] == ["PASSIVE"]  # a competing busy process: mtbert would wait passively
    assert r["targets"]["1 competing"]["chosen"] == "passive"
    assert re.search(r"\| passive \| \d+ \|", out_md.read_text())  # threads: the machine's, or OMP_NUM_THREADS


@pytest.mark.parametrize("args, message", [
    (["--override", "sampler=nope"], "Could not find 'sampler/nope'"),
    ([], "data.root="),  # no data folder: how to get the files
])
def test_a_bad_option_or_data_folder_is_one_error_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as e:
        speed.main(["--model", "tiny", "--device", "cpu", *args])
    assert str(e.value).startswith("error: ") and message in str(e.value)
