"""The memory settings (mtbert/memory.py, issue 36, experiments/bench/memory.md): the bounded
kernel caches (oneDNN's and ideep's, set as the mtbert package loads) and the allocator
trim after each prediction batch change no prediction, bit for bit, on the tiny model in bf16
(oneDNN's matmuls) and fp32; the trims after each task's backward change no loss; the trim
hands free memory back; a checkpoint streamed to disk
is the file it was; the bench measures each variant's memory in a process of its own."""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_config

from mtbert import evaluate, memory, rundir, trainer
from mtbert.batching import encode, eval_batches
from mtbert.build import build_network
from mtbert.data import RejectedRows, read_split
from mtbert.bench import speed

CHILD = r"""
import os, sys, torch
from pathlib import Path
from mtbert import evaluate, memory, schema
from mtbert.batching import encode
from mtbert.build import build_network
from mtbert.data import RejectedRows, read_split

data, cache, out = sys.argv[1:4]
cfg = schema.compose(["model=tiny", "logger=none", f"data.root={data}", f"data.cache_dir={cache}"],
                     Path(schema.__file__).resolve().parents[1] / "conf")
torch.manual_seed(cfg.seed)
tasks, objectives, encodings, model, tokenizer = build_network(cfg)
device, result = torch.device("cpu"), {}
for name, task in tasks.items():
    rows = read_split(task, Path(data) / task.files["dev"], RejectedRows("skip"), labelled=True)
    enc = encode(rows, tokenizer, cfg.data.max_length, encodings[name] == "siamese", cache)
    for precision in ("bf16", "fp32"):
        for trim in (True, False):  # the allocator's trim after each batch, and without it
            release = evaluate.release_memory
            if not trim:
                evaluate.release_memory = lambda: None
            # raw outputs (logits, cosines), not the classes they decide: every bit counts
            values = evaluate.predict(model, task, objectives[name], enc, device, precision,
                                      output=lambda head, task: head, log_every=None)
            evaluate.release_memory = release
            result[f"{name} {precision} trim={trim}"] = values
torch.save({"predictions": result, "caches": {k: os.environ.get(k) for k in memory.KERNEL_CACHES}}, out)
"""


def predictions(tmp_path, data_dir, name: str, **env) -> dict:
    out = tmp_path / f"{name}.pt"
    environ = {k: v for k, v in os.environ.items() if k not in memory.KERNEL_CACHES}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(tmp_path / "cache"), str(out)],
                          cwd=ROOT, env={**environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out)


def test_prediction_hands_free_memory_back_after_each_batch(tmp_path, data_dir, monkeypatch):
    """Prediction batches run in length order, each wider than the last, and glibc would
    place each beside the blocks the one before freed: on a CPU the pages go back after
    every batch."""
    cfg = compose_config("model=tiny", "logger=none", data=data_dir, cache=tmp_path / "cache")
    tasks, objectives, encodings, model, tokenizer = build_network(cfg)
    rows = read_split(tasks["sst"], data_dir / tasks["sst"].files["dev"], RejectedRows("skip"), labelled=True)
    enc = encode(rows, tokenizer, cfg.data.max_length, False, tmp_path / "cache")
    trims = []
    monkeypatch.setattr(evaluate, "release_memory", lambda: trims.append(1))
    evaluate.predict(model, tasks["sst"], objectives["sst"], enc, torch.device("cpu"), "fp32", max_tokens=256,
                     log_every=None)
    assert len(trims) == len(list(eval_batches(enc, 256))) > 1


@pytest.mark.slow
def test_bounded_kernel_caches_and_the_trim_change_no_prediction(tmp_path, data_dir):
    """mtbert's cache bounds, torch's defaults (1024 each) and caches of one entry (every
    primitive made again for every batch) predict the same bits; with and without the
    allocator's trim after each batch."""
    ours = predictions(tmp_path, data_dir, "ours")
    assert ours["caches"] == memory.KERNEL_CACHES  # set as the mtbert package loaded
    defaults = predictions(tmp_path, data_dir, "defaults", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024",
                           LRU_CACHE_CAPACITY="1024")
    assert defaults["caches"] == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}
    single = predictions(tmp_path, data_dir, "single", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1",
                         LRU_CACHE_CAPACITY="1")
    keys = ours["predictions"].keys()
    assert len(keys) == 3 * 2 * 2 and defaults["predictions"].keys() == single["predictions"].keys() == keys
    for key in keys:
        reference = defaults["predictions"][key]
        assert reference.isfinite().all() and reference.std() > 0, key
        for other in (ours, single):
            assert torch.equal(other["predictions"][key], reference), key
        task, precision, _ = key.split()
        assert torch.equal(ours["predictions"][f"{task} {precision} trim=False"], reference), key


def test_kernel_cache_bounds_leave_a_users_setting_alone():
    environ = {"LRU_CACHE_CAPACITY": "7"}
    chosen = memory.limit_kernel_caches(environ)
    assert environ == {**memory.KERNEL_CACHES, "LRU_CACHE_CAPACITY": "7"}
    assert chosen == {k: v for k, v in memory.KERNEL_CACHES.items() if k != "LRU_CACHE_CAPACITY"}


def test_the_trim_after_each_tasks_backward_changes_no_loss(tmp_path, data_dir, monkeypatch):
    """A CPU run hands glibc's free pages back after each task's backward (the step's three
    tasks: two in the step, one after it); the losses are the bits they are without it."""

    def losses(name: str, trim) -> list[float]:
        monkeypatch.setattr(trainer, "release_memory", trim)
        cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
                             "trainer.log_every_seconds=0", "trainer.max_steps=5", "data.validation=null",
                             data=data_dir, cache=tmp_path / "cache")
        run = trainer.Trainer(cfg, rundir.RunDir(tmp_path / name))
        run.fit()
        run.run.close()
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in events if e["event"] == "train"]

    trims = []
    trimmed = losses("trimmed", lambda: (trims.append(1), memory.release_memory()))
    assert len(trims) == 5 * 3
    assert trimmed == losses("kept", lambda: None) and len(trimmed) == 5


TRIM_CHILD = r"""
import torch
from mtbert import memory

def rss_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) // 1024

start = rss_mib()
tensors = [torch.ones(16 * 1024) for _ in range(3073)]  # 192 MiB
top = tensors.pop()  # kept: the heap's top stays in use, so only a trim returns what lies below
del tensors
held = rss_mib()
memory.release_memory()
print(start, held, rss_mib())
"""


@pytest.mark.skipif(memory._malloc_trim() is None, reason="glibc's malloc_trim: Linux with glibc only")
def test_release_memory_hands_freed_tensors_back():
    """Tensors of 64 KiB come from glibc's heap (under its mmap threshold); freed, glibc
    keeps their pages, and release_memory hands them back. In a fresh process: one that has
    run other tests holds free pages that the tensors would reuse."""
    proc = subprocess.run([sys.executable, "-c", TRIM_CHILD], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    start, held, after = map(int, proc.stdout.split())
    assert held > start + 150  # freed, still resident
    assert after < held - 150


@pytest.mark.slow
def test_bench_measures_a_variant_alone_in_its_own_process(tmp_path, data_dir, monkeypatch):
    """`--memory-of` (what each child of `python -m mtbert.bench` runs): the variant built,
    its steps taken, its peak resident set reported; the parent reads it from the child's
    output and lists it in the report."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--model", "tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--steps", "1",
            "--warmup", "1", "--rounds", "2"]
    with pytest.raises(ValueError, match="no variant 'nope'"):
        speed.main([*argv, "--memory-of", "nope"])

    args = argparse.Namespace(argv=[*argv, "--memory-of-ignored"])  # a bad flag: the child fails
    failed = speed.memory_per_variant(args, ["naive"])
    assert "error" in failed["naive"]
    args.argv = argv
    # each in a fresh child, as the bench runs them: in this process, earlier tests' freed memory
    # would make the figures meaningless (a trim can take the resident set below where it started)
    measured = speed.memory_per_variant(args, ["bare", "naive", "eval"])
    bare = measured["bare"]
    assert bare["steps"] == 3 and bare["peak_mb"] >= bare["start_mb"] > 0
    assert bare["helper_freed"] is True  # Linux: the peak restarts once adam's helper is freed
    assert measured["naive"]["steps"] == 3 and measured["naive"]["peak_mb"] > 0
    assert "steps" not in measured["eval"] and measured["eval"]["peak_mb"] > 0
    json.dumps(measured)  # goes into bench.json as it is


def test_a_streamed_checkpoint_is_the_bytes_an_in_memory_one_was(tmp_path):
    """save_checkpoint streams torch.save into the file (no copy of the state in memory):
    the file is what it was when the bytes were built in memory first, digest included."""
    torch.manual_seed(0)
    state = {"model": {f"w{i}": torch.randn(64, 64) for i in range(4)}, "step": 3,
             "moments": [torch.randn(8).bfloat16()], "rng": torch.get_rng_state()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    rundir.save_checkpoint(state, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == data + rundir.MARK + hashlib.sha256(data).hexdigest().encode()
    assert torch.equal(rundir.load_checkpoint(tmp_path / "last.pt")["model"]["w3"], state["model"]["w3"])
