"""Sweeps through Hydra's launcher plugins: submitit (SLURM; its local executor runs the
jobs here, one requeued mid-run as on a time limit) and joblib."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, read_results, run_train

FAST = ("model=tiny", "budget=smoke", "logger=none", "data.limit.dev=8")


@pytest.fixture(autouse=True)
def one_thread_per_job(monkeypatch):
    """Two jobs at once on a small machine: each with one thread, as README advises."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow
def test_submitit_local_sweep_requeued_job_resumes_in_its_directory(tmp_path, data_dir):
    """Two identical jobs; job 0 gets submitit's timeout signal (USR2) mid-run, is requeued
    and resumes from its checkpoints/last.pt: it ends exactly as job 1, never stopped."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=4", f"hydra.sweep.dir={sweep}", *FAST, "seed=0,0",
         "data.limit.train=32", "data.batch_size=4", "trainer.epochs=2", "trainer.max_seconds=null",
         "trainer.checkpoint_every_seconds=0", "trainer.log_every_seconds=0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    job, signalled = sweep / "0", False
    deadline = time.time() + 240
    try:
        while not signalled and proc.poll() is None and time.time() < deadline:
            metrics = job / "metrics.jsonl"
            if metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()) \
                    and read_results(job)["status"] == "running":
                # the job's id is its local controller's pid; the job runs in that one's child
                controller = int(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id)
                for pid in children(controller):
                    os.kill(pid, signal.SIGUSR2)
                    signalled = True
            time.sleep(0.02)
        output = proc.communicate(timeout=max(1, deadline - time.time()))[0]
    finally:
        if proc.poll() is None:  # the sweep and its jobs, all in the session it started
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert signalled, "job 0 ended before it could be signalled"

    requeued, uninterrupted = read_results(sweep / "0"), read_results(sweep / "1")
    assert requeued["status"] == uninterrupted["status"] == "completed"
    log = (sweep / "0" / "train.log").read_text()
    assert "Requeued job" in log and f"loaded {sweep / '0' / 'checkpoints' / 'last.pt'}" in log
    assert "resumed at step" in log
    assert "resumed" not in (sweep / "1" / "train.log").read_text()
    for key in ("dev", "steps", "examples_seen", "best_step"):
        assert requeued[key] == uninterrupted[key], key


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.mark.slow
def test_joblib_sweep(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
              *FAST, "trainer.max_steps=2", "seed=0,1", cwd=tmp_path, data=data_dir)
    for n in (0, 1):
        results = read_results(sweep / str(n))
        assert results["status"] == "completed" and results["seed"] == n and results["steps"] == 2


def test_slurm_launcher_options_reach_sbatch(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` composes with its documented options, and they end up in the
    sbatch script of the job array (submission intercepted: no SLURM here)."""
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.timeout_min=30", "hydra.launcher.array_parallelism=2",
            f"hydra.sweep.dir={tmp_path}"])
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s > 0
        launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    class Submitted(Exception):
        pass

    def submit(executor, command):
        raise Submitted(executor._make_submission_file_text(command, "uid"), executor.max_num_timeout)

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)
    sbatch, max_num_timeout = submitted.value.args
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=30", "--array=0-2%2",
                 f"--signal=USR2@{cfg.hydra.launcher.signal_delay_s}", "--cpus-per-task=4"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert max_num_timeout == cfg.hydra.launcher.max_num_timeout


@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local", "joblib"])
def test_plugin_launchers_compose(launcher):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
