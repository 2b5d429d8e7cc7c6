"""torchrun with 2 CPU processes (gloo) makes the same updates as one process."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_config, read_results, run_train
from mtbert.rundir import load_checkpoint

EXACT = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
         "trainer.precision=fp32", "data.batch_size=8", "trainer.max_steps=4",
         "model.dropout=0", "+model.random_init.hidden_dropout_prob=0",
         "+model.random_init.attention_probs_dropout_prob=0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*overrides, cwd, data):
    env = {**os.environ, "MTBERT_DATA_DIR": str(data), "MTBERT_CACHE_DIR": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "train.py"), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("method", [("optim=adam",), ("optim=pcgrad",), ("weighting=uw",),
                                    ("weighting=gradnorm",), ("optim=gradvac",),
                                    ("weighting=uw", "optim=pcgrad", "trainer.accumulate=2"),
                                    ("sharing=top_layers", "optim=pcgrad"), ("sharing=lora", "sharing.dropout=0", "optim=pcgrad"),
                                    ("sharing=mmoe", "optim=pcgrad")], ids=" ".join)
def test_two_ranks_equal_one_process(method, tmp_path, data_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(*EXACT, *method, f"hydra.run.dir={one}", cwd=tmp_path, data=data_dir)
    proc = torchrun(*EXACT, *method, f"hydra.run.dir={two}", cwd=tmp_path, data=data_dir)
    assert proc.stdout.count("run directory:") == 1, "only rank 0 reports"
    log = (two / "train.log").read_text()
    assert log.count("validation at step 4") == 1 and log.count("training sst+para+sts") == 1, "rank 0 logs, once"
    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(two / "checkpoints" / "last.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 4
    assert a["loop"]["seen"] == b["loop"]["seen"], "examples counted once per global batch"
    start = run_train_initial(tmp_path, data_dir, *method)
    moved = 0
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += not torch.equal(value, start[key])
    assert moved > 10, "the comparison is between trained parameters"
    assert read_results(two)["status"] == "completed"
    assert not any(p.name.startswith("rank") for p in two.iterdir())


def run_train_initial(tmp_path, data_dir, *overrides):
    """The parameters before any step: same seed, zero steps of training."""
    from mtbert.build import build_network
    cfg = compose_config(*EXACT, *overrides)
    torch.manual_seed(cfg.seed)
    return build_network(cfg).model.state_dict()


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_as_two_ranks(tmp_path, data_dir):
    """`hydra.launcher.tasks_per_node=2`: the job's two tasks are the two ranks of one run
    (submitit_local here; SLURM sets the same variables through submitit)."""
    one, sweep = tmp_path / "one", tmp_path / "sweep"
    run_train(*EXACT, f"hydra.run.dir={one}", cwd=tmp_path, data=data_dir)
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *EXACT],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("run directory:") == 1, "only rank 0 reports"
    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(sweep / "0" / "checkpoints" / "last.pt")
    assert a["loop"]["seen"] == b["loop"]["seen"] and b["loop"]["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert read_results(sweep / "0")["status"] == "completed"


def children(pid: int) -> list[int]:
    """The processes that `pid` started (torchrun's workers), from /proc."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_with_dropout_end_bit_identical(tmp_path, data_dir):
    """Every rank's RNG is saved: with dropout on, a resumed 2-rank run ends where an
    uninterrupted one does, to the bit. Batches of 7 split 4 + 3, so the ranks draw
    different numbers of dropout masks and their generators part ways."""
    import json
    import signal
    import time
    run = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "trainer.precision=fp32",
           "data.batch_size=7", "trainer.max_steps=8", "trainer.log_every_seconds=0")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    torchrun(*run, f"hydra.run.dir={whole}", cwd=tmp_path, data=data_dir)
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(ROOT / "train.py"), *run,
                             f"hydra.run.dir={stopped}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        metrics = stopped / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()):
            for worker in children(proc.pid):
                os.kill(worker, signal.SIGTERM)
            break
        time.sleep(0.01)
    proc.communicate(timeout=180)
    assert read_results(stopped)["status"] == "interrupted"
    saved = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert 3 <= saved["loop"]["step"] < 8 and len(saved["rng"]["torch"]) == 2
    assert not torch.equal(*saved["rng"]["torch"]), "the ranks' generators differ"
    torchrun(f"resume={stopped}", cwd=tmp_path, data=data_dir)
    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert b["loop"]["step"] == 8 and read_results(stopped)["status"] == "completed"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "bit-identical"


SKEWED = ("model=tiny", "budget=smoke", "logger=none", "trainer.precision=fp32", "data.batch_size=7",
          "trainer.checkpoint_every_seconds=1", "trainer.log_every_seconds=0.3")


def skewed(*overrides, cwd, data, popen=False):
    """torchrun of `train.py` with rank 1 slowed and started late (tests/scripts/skewed_train.py)."""
    env = {**os.environ, "MTBERT_DATA_DIR": str(data), "MTBERT_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(ROOT / "tests" / "scripts" / "skewed_train.py"), *overrides]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_skewed_ranks_agree_on_timed_saves_logs_and_the_time_limit(tmp_path, data_dir):
    """Saves every second, logs every 0.3 s and a time limit, each due on each rank's own
    clock, with rank 1 late and jittery: the ranks take every such decision together (a
    save gathers every rank's generators, an evaluation broadcasts), so the run ends."""
    run_dir = tmp_path / "run"
    skewed(*SKEWED, "trainer.epochs=1000", "trainer.max_seconds=50", "trainer.eval_every_steps=40",
           f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["train_seconds"] >= 50
    log = (run_dir / "train.log").read_text()
    assert "trainer.max_seconds=50 reached" in log
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["loop"]["step"] == results["steps"] > 100 and len(saved["rng"]["torch"]) == 2


@pytest.mark.slow
def test_skewed_ranks_stopped_and_resumed_end_bit_identical(tmp_path, data_dir):
    """Timed saves with skewed ranks, a SIGTERM to both, a resume: the weights end where an
    uninterrupted run's do, to the bit."""
    import json
    import signal
    import time
    run = (*SKEWED, "trainer.max_steps=70", "trainer.epochs=1000", "trainer.max_seconds=null",
           "trainer.eval_every_steps=25")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    skewed(*run, f"hydra.run.dir={whole}", cwd=tmp_path, data=data_dir)
    proc = skewed(*run, f"hydra.run.dir={stopped}", cwd=tmp_path, data=data_dir, popen=True)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        metrics = stopped / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 30 for line in metrics.read_text().splitlines()):
            for worker in children(proc.pid):
                os.kill(worker, signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=180)
    assert read_results(stopped)["status"] == "interrupted", out[-2000:] + err[-2000:]
    assert f"resume with: torchrun --nproc_per_node=2 train.py resume={stopped}" in err, "the command that works"
    assert 30 <= load_checkpoint(stopped / "checkpoints" / "last.pt")["loop"]["step"] < 70
    skewed(f"resume={stopped}", cwd=tmp_path, data=data_dir)
    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert b["loop"]["step"] == 70 and read_results(stopped)["status"] == "completed"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "bit-identical"
