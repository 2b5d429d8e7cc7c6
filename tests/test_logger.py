"""W&B logging with the real wandb library, offline: runs are read back from their .wandb
files (config, history, summary, grouping), as `wandb sync` would read them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from wandb.proto import wandb_internal_pb2
from wandb.sdk import wandb_setup

from conftest import ROOT, read_results, run_train
from mtbert.logger import NoLogger, api_key_configured, flatten, resolve_mode
from mtbert.rundir import RunDir

SMOKE = ("model=tiny", "budget=smoke")
DUMMY_KEY = "0123456789" * 4


def read_records(path: Path):
    """The records of a .wandb file: a LevelDB-style log (32 KiB blocks of chunks, each with
    a 7-byte header) of wandb_internal_pb2.Record messages after a 7-byte file header.
    wandb 0.31 has no Python reader of its own (wandb-core reads these files)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, message = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += 32768 - pos % 32768
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        message = chunk if kind in (1, 2) else message + chunk  # full/first, or middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(message)
            yield record


def _set(tree: dict, update, value):
    keys = list(update.nested_key) or [update.key]
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def read_run(path: Path) -> dict:
    """One offline run as W&B would show it: run record, config, history rows, summary."""
    run = {"config": {}, "history": [], "summary": {}, "artifacts": [], "files": []}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["run"] = r.run
            for u in r.run.config.update:
                _set(run["config"], u, json.loads(u.value_json))
        elif kind == "config":
            for u in r.config.update:
                _set(run["config"], u, json.loads(u.value_json))
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in r.history.item})
        elif kind == "summary":
            for u in r.summary.update:
                _set(run["summary"], u, json.loads(u.value_json))
        elif kind == "artifact":
            run["artifacts"].append(r.artifact)
        elif kind == "files":
            run["files"] += [f.path for f in r.files.files]
        elif kind == "exit":
            run["exit_code"] = r.exit.exit_code
    return run


def offline_runs(wandb_dir: Path) -> list[dict]:
    return [read_run(p) for p in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """A new user's machine: no API key, no netrc, W&B's folders in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_PROJECT",
                 "WANDB_ENTITY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / folder))
    return tmp_path


def train(*overrides: str, cwd: Path, data: Path, check: bool = True) -> subprocess.CompletedProcess:
    """train.py with stdin closed: a prompt would fail, never wait."""
    env = {**os.environ, "MTBERT_DATA_DIR": str(data), "MTBERT_CACHE_DIR": str(cwd / "mtbert-cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, *SMOKE], cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_offline_run_has_config_history_summary_and_files(wandb_env, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_env / "wandb-dir"))
    (wandb_env / "wandb-dir").mkdir()
    train("hydra.run.dir=run", "trainer.epochs=1", "trainer.evals_per_epoch=2",
          "diagnostics.grad_every=2", "logger.log_checkpoints=true", "logger.tags=[smoke,test]",
          cwd=wandb_env, data=data_dir)
    results = read_results(wandb_env / "run")
    [run] = offline_runs(wandb_env / "wandb-dir")

    meta = run["run"]
    assert (meta.project, meta.job_type, meta.run_group) == ("mtbert", "train", "")
    assert meta.display_name == (  # the job's overrides
        "budget=smoke,diagnostics.grad_every=2,logger.log_checkpoints=true,logger.tags=[smoke,test],"
        "model=tiny,trainer.epochs=1,trainer.evals_per_epoch=2")
    assert list(meta.tags) == ["smoke", "test"]
    config = run["config"]
    assert config["model"]["random_init"]["hidden_size"] == 64 and config["seed"] == 0
    assert config["data"]["root"] == str(data_dir)  # resolved from MTBERT_DATA_DIR
    assert config["choices"]["sampler"] == "rr_over" and "${" not in json.dumps(config)

    history = run["history"]
    steps = [row["_step"] for row in history]
    assert steps == sorted(steps) and steps[-1] == results["steps"]
    train_rows = [row for row in history if "train/loss/sst" in row]
    assert train_rows and {"train/loss/para", "train/loss/sts", "train/lr/encoder", "train/lr/head_sts",
                           "train/examples_seen/sst", "train/sentences_per_s",
                           "train/step_seconds"} <= set(train_rows[-1])
    evals = [row for row in history if "eval/validation/mean" in row]
    assert len(evals) == 2 and not any("eval/dev/mean" in row for row in history), "dev only reports"
    report = [row for row in history if "dev/dev/mean" in row]
    assert len(report) == 1 and report[0]["dev/dev/mean"] == results["dev"]["mean"]
    assert any("grad/cos/sst|para" in row and "grad/norm/sts" in row for row in history)

    summary = run["summary"]
    assert summary["eval/validation/mean"] == {"max": max(row["eval/validation/mean"] for row in evals)}
    assert summary["results"] == results
    assert summary["results_table"]["_type"] == "table-file"
    assert run["exit_code"] == 0
    assert any(f.startswith("media/images/plots/grad_conflict") for f in run["files"])
    assert [a.type for a in run["artifacts"] if a.type == "model"] == ["model"]


@pytest.mark.slow  # W&B's service process; the offline run above stays in the quick loop
def test_resumed_run_continues_its_wandb_run(wandb_env, data_dir):
    train("hydra.run.dir=run", cwd=wandb_env, data=data_dir)
    run_train("resume=run", cwd=wandb_env, data=data_dir, process=True)  # W&B keeps state in its process
    first, second = offline_runs(wandb_env / "run")
    run_id = (wandb_env / "run" / "wandb_run_id").read_text().strip()
    assert first["run"].run_id == second["run"].run_id == run_id  # `wandb sync` merges them


@pytest.mark.slow  # W&B's service process; the offline run above stays in the quick loop
def test_multirun_without_api_key_is_offline_and_grouped(wandb_env, data_dir):
    """A new user's sweep: no key, no WANDB_MODE, stdin closed; each job its own run, in
    the run directory, one group for the sweep."""
    proc = train("-m", "seed=0,1", "trainer.max_steps=1", "hydra.sweep.dir=multirun/sweep",
                 cwd=wandb_env, data=data_dir)
    assert "no API key configured" in proc.stdout + proc.stderr
    runs = [r for job in ("0", "1") for r in offline_runs(wandb_env / "multirun/sweep" / job)]
    assert [r["run"].display_name for r in runs] == [
        f"budget=smoke,model=tiny,seed={seed},trainer.max_steps=1" for seed in (0, 1)]
    assert {r["run"].run_group for r in runs} == {"multirun/sweep"}
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    assert [r["exit_code"] for r in runs] == [0, 0]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id


@pytest.mark.slow  # W&B's service process; the offline run above stays in the quick loop
def test_failed_run_is_finished_failed(wandb_env, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    proc = train("hydra.run.dir=run", "optim.lr.encoder=0", cwd=wandb_env, data=data_dir, check=False)
    assert proc.returncode != 0
    [run] = offline_runs(wandb_env / "run")
    assert run["exit_code"] == 1
    assert run["summary"]["results"]["status"] == "failed" == read_results(wandb_env / "run")["status"]
    # a bad task name or data folder is caught before W&B starts: no W&B run at all
    proc = train("hydra.run.dir=early", "sampler.tasks=[imdb]", cwd=wandb_env, data=data_dir, check=False)
    assert proc.returncode != 0 and read_results(wandb_env / "early")["status"] == "failed"
    assert not (wandb_env / "early" / "wandb").exists()


@pytest.mark.slow  # W&B's service process; the offline run above stays in the quick loop
def test_online_without_network_falls_back_to_offline(wandb_env, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    proc = train("hydra.run.dir=run", "trainer.max_steps=1", "logger.mode=online",
                 "logger.init_timeout=1", cwd=wandb_env, data=data_dir)
    assert time.monotonic() - start < 60
    assert "logging offline instead" in proc.stdout + proc.stderr
    assert read_results(wandb_env / "run")["status"] == "completed"
    [run] = offline_runs(wandb_env / "run")
    assert run["exit_code"] == 0 and run["summary"]["results"]["steps"] == 1


def test_logger_none_leaves_the_run_directory_as_the_record(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        logger = instantiate(compose("train", overrides=["logger=none"]).logger)
    run = RunDir(tmp_path, sinks=[logger])
    run.event("train", 1, loss={"sst": 1.0})
    run.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == {"sst": 1.0}
    assert isinstance(logger, NoLogger) and not (tmp_path / "wandb").exists()


def test_api_key_found_where_wandb_looks(wandb_env, monkeypatch):
    netrc = wandb_env / "no-netrc"
    assert not api_key_configured()
    assert resolve_mode("online") == "offline" and resolve_mode("disabled") == "disabled"
    host = wandb_setup.singleton().settings.base_url.split("://")[1]
    netrc.write_text(f"machine {host}\n  login user\n  password {DUMMY_KEY}\n")
    netrc.chmod(0o600)
    assert api_key_configured() and resolve_mode("online") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    assert api_key_configured()


def test_flatten_keeps_each_field_path():
    assert flatten({"loss": {"sst": 1.0}, "cos": [0.5]}, "train") == {"train/loss/sst": 1.0,
                                                                     "train/cos/0": 0.5}
