"""Faults injected on purpose: a kill at every point of a checkpoint save, SIGTERM before
the loop, checkpoints damaged or deleted, the data changed or moved under a resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, compose_config, read_results, run_train
import mtbert.rundir as rundir
from mtbert.errors import CheckpointError
from mtbert.rundir import load_checkpoint, save_checkpoint


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, no cleanup in `except Exception`."""


def test_a_kill_at_any_point_of_a_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Every file-system step of save_checkpoint (write, sync, rename) is cut in turn; the
    checkpoint then loads as the old or the new state, never fails, and the run's next
    save keeps a good fallback."""
    real = {"replace": os.replace, "fsync": os.fsync, "unlink": rundir.Path.unlink}
    steps = []

    def cut_at(k):
        def wrap(name):
            def op(*args, **kwargs):
                steps.append(name)
                if len(steps) == k:
                    raise Killed(name)
                return real[name](*args, **kwargs)
            return op
        monkeypatch.setattr(os, "replace", wrap("replace"))
        monkeypatch.setattr(os, "fsync", wrap("fsync"))

    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    cut_at(10 ** 6)
    save_checkpoint({"step": 3}, path)
    points = len(steps)
    assert points >= 4, steps  # the data's sync and rename, the demotion, the promotion, the folder's sync
    monkeypatch.undo()
    for k in range(1, points + 1):
        folder = tmp_path / f"cut{k}"
        folder.mkdir()
        path = folder / "last.pt"
        save_checkpoint({"step": 1}, path)
        save_checkpoint({"step": 2}, path)
        steps.clear()
        cut_at(k)
        with pytest.raises(Killed):
            save_checkpoint({"step": 3}, path)
        monkeypatch.undo()
        assert load_checkpoint(path)["step"] in (2, 3), f"cut at {steps[-1]} (point {k})"
        save_checkpoint({"step": 4}, path)  # the resumed run saves again
        assert load_checkpoint(path)["step"] == 4
        path.write_bytes(path.read_bytes()[:100])  # and its last.pt is then damaged
        assert load_checkpoint(path)["step"] in (2, 3), "the fallback is a good, older state"


def test_a_damaged_checkpoint_is_never_kept_as_the_fallback(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(raw))
    assert load_checkpoint(path)["step"] == 1
    assert "last.pt: its SHA-256 does not match" in caplog.text and "resuming from " + str(tmp_path / "last.prev.pt") in caplog.text
    assert (tmp_path / "last.pt.corrupt").exists()
    save_checkpoint({"step": 3}, path)  # the next save demotes the good state, not the damaged one
    path.write_bytes(b"junk")
    assert load_checkpoint(path)["step"] == 1


def test_an_older_checkpoint_with_its_digest_beside_it_still_loads(tmp_path):
    import hashlib
    import io
    buffer = io.BytesIO()
    torch.save({"step": 7}, buffer)
    (tmp_path / "last.pt").write_bytes(buffer.getvalue())
    (tmp_path / "last.pt.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 7
    save_checkpoint({"step": 8}, tmp_path / "last.pt")
    assert not (tmp_path / "last.pt.sha256").exists() and load_checkpoint(tmp_path / "last.pt")["step"] == 8


def test_no_checkpoint_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*the run cannot resume"):
        load_checkpoint(tmp_path / "last.pt")


RUN = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "data.batch_size=4",
       "trainer.epochs=2", "trainer.precision=fp32")


def test_sigterm_during_setup_leaves_a_record(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run_dir / ".hydra" / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # Hydra has begun the job: mtbert is importing or building the model
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, -signal.SIGTERM), stderr
    results = read_results(run_dir)
    assert results["status"] == "interrupted" and "SIGTERM outside the training loop" in results["error"]


def stopped_run(tmp_path, data_dir, name="run", at_step=3):
    """A tiny run stopped by SIGTERM at `at_step` (it has last.pt, results.json interrupted)."""
    run_dir = tmp_path / name
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, "trainer.log_every_seconds=0",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= at_step for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    proc.communicate(timeout=120)
    results = read_results(run_dir)
    assert results["status"] == "interrupted", results
    return run_dir, results


@pytest.mark.slow  # stops a run and resumes it (test_resume keeps one such test in the quick loop)
def test_resume_on_other_data_refuses_and_the_same_data_moved_proceeds(tmp_path, data_dir):
    run_dir, stopped = stopped_run(tmp_path, data_dir)
    assert stopped["steps"] >= 3 and stopped["examples_seen"], "an interrupted run records how far it came"
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    sts = other / "sts-train.csv"
    sts.write_text(sts.read_text().replace("\t4.", "\t3."))
    proc = run_train(f"resume={run_dir}", cwd=tmp_path, data=other, check=False)
    assert proc.returncode != 0
    assert "the run would resume on other data than it started on: sts train was" in proc.stderr
    assert "data.root=FOLDER" in proc.stderr
    after = read_results(run_dir)
    assert after["status"] == "interrupted" and after["error"].startswith("resume refused: DataError")
    moved = tmp_path / "moved"
    shutil.move(str(data_dir), moved)
    proc = run_train(f"resume={run_dir}", f"data.root={moved}", cwd=tmp_path, data=other)
    assert "same files (same SHA-256) in another folder" in proc.stdout + proc.stderr
    done = read_results(run_dir)
    assert done["status"] == "completed" and done["data"]["sts"]["train"]["path"] == str(moved / "sts-train.csv")


@pytest.mark.slow  # stops a run and resumes it (test_resume keeps one such test in the quick loop)
def test_resume_with_every_checkpoint_deleted_refuses(tmp_path, data_dir):
    run_dir, _ = stopped_run(tmp_path, data_dir)
    for f in (run_dir / "checkpoints").glob("last*"):
        f.unlink()
    proc = run_train(f"resume={run_dir}", cwd=tmp_path, data=data_dir, check=False)
    assert proc.returncode != 0 and "the run cannot resume" in proc.stderr
    assert read_results(run_dir)["status"] == "interrupted"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    """With a checkpoint every step, a run killed outright resumes from its last one, ends
    bit-identical to a run never stopped, and logs no step twice."""
    every_step = (*RUN, "trainer.checkpoint_every_seconds=0", "trainer.log_every_seconds=0")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train(*every_step, f"hydra.run.dir={whole}", cwd=tmp_path, data=data_dir)
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *every_step, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()):
            proc.kill()
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert read_results(killed)["status"] == "running", "the record a killed run leaves"
    run_train(f"resume={killed}", cwd=tmp_path, data=data_dir)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (whole, killed))
    assert a["loop"]["step"] == b["loop"]["step"] and read_results(killed)["status"] == "completed"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "bit-identical"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)), "no step logged twice"
    assert read_results(killed)["dev"] == read_results(whole)["dev"]


def test_resume_with_another_tokenizer_refuses(tmp_path, data_dir):
    from mtbert.errors import ConfigError
    from mtbert.rundir import RunDir
    from mtbert.trainer import Trainer
    cfg = compose_config(*RUN, data=data_dir, cache=tmp_path / "c")
    first = Trainer(cfg, RunDir(tmp_path / "run"))
    state = first.state_dict()
    assert state["tokenizer"] == first.setup.tokenizer_digest and len(state["tokenizer"]) == 64
    save_checkpoint({**state, "tokenizer": "0" * 64}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="trained with another tokenizer"):
        Trainer(cfg, RunDir(tmp_path / "run")).resume(tmp_path / "last.pt")
