"""Runs stopped by a signal and resumed end exactly where an uninterrupted run ends;
damaged checkpoints are detected; non-finite losses stop or are skipped."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, read_results, run_train
from mtbert.errors import CheckpointError
from mtbert.rundir import RunDir, load_checkpoint, save_checkpoint
from mtbert.compat import current_terms
from mtbert.guards import NonFiniteLoss
from mtbert.predict import load_best
from mtbert.trainer import Trainer

RUN = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
       "data.batch_size=4", "trainer.epochs=3", "trainer.log_every_seconds=0")


def final_model(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


SLOW = pytest.mark.slow  # the first case stays in the quick loop


@pytest.mark.parametrize("extra", [("sampler=rr_over", "optim=pcgrad", "schedule=paper"),
                                   pytest.param(("sampler=annealed", "trainer.evals_per_epoch=2"), marks=SLOW),
                                   # a scalarizer, an aggregator
                                   pytest.param(("weighting=famo", "optim=nash_mtl"), marks=SLOW),
                                   pytest.param(("weighting=gradnorm", "optim=gradvac"), marks=SLOW),
                                   # a task's own top layers, adapters (the base trained too), gates
                                   pytest.param(("sharing=top_layers", "optim=pcgrad", "schedule=paper"), marks=SLOW),
                                   pytest.param(("sharing=lora", "sharing.train_base=true", "optim=pcgrad"), marks=SLOW),
                                   pytest.param(("sharing=mmoe", "weighting=uw"), marks=SLOW),
                                   # fp16: overflows skip steps early, then the scale grows every 3 steps;
                                   # each step in 2 micro-batches
                                   pytest.param(("trainer.precision=fp16", "optim=pcgrad",
                                                 "trainer.grad_scaler.init_scale=1e9",
                                                 "trainer.grad_scaler.growth_interval=3", "trainer.accumulate=2"),
                                                marks=SLOW)])
def test_sigterm_then_resume_matches_uninterrupted_run(extra, tmp_path, data_dir):
    whole = tmp_path / "whole"
    run_train(*RUN, *extra, f"hydra.run.dir={whole}", cwd=tmp_path, data=data_dir)

    stopped = tmp_path / "stopped"
    env = {**os.environ, "MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra,
                             f"hydra.run.dir={stopped}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # stop it once it is under way
        metrics = stopped / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 7
                                    for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run should have been stopped mid-way"
    results = read_results(stopped)
    assert results["status"] == "interrupted" and "SIGTERM" in results["error"]
    assert "resume with: python train.py resume=" in stderr
    stopped_at = load_checkpoint(stopped / "checkpoints" / "last.pt")["loop"]["step"]

    run_train(f"resume={stopped}", cwd=tmp_path, data=data_dir)
    resumed, uninterrupted = read_results(stopped), read_results(whole)
    assert resumed["status"] == "completed" and 7 <= stopped_at < resumed["steps"]
    assert (stopped / ".hydra-resume").is_dir() and "experiment" in (stopped / ".hydra" / "hydra.yaml").read_text()
    for key in ("dev", "steps", "examples_seen", "best_step"):
        assert resumed[key] == uninterrupted[key], key
    a, b = final_model(stopped), final_model(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical"


def test_resume_refuses_other_overrides(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    proc = run_train(f"resume={run_dir}", "seed=3", cwd=tmp_path, data=data_dir, check=False)
    assert proc.returncode == 1 and "error: ConfigError: " in proc.stderr and "drop the other overrides ['seed=3']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_keep_last_false_keeps_best_and_a_rerun_trains_nothing(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = (*RUN, "trainer.epochs=1", "trainer.keep_last=false", f"hydra.run.dir={run_dir}")
    run_train(*args, cwd=tmp_path, data=data_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.safetensors"]
    done, metrics = read_results(run_dir), (run_dir / "metrics.jsonl").read_text()
    again = run_train(*args, cwd=tmp_path, data=data_dir)  # as a sweep run a second time
    assert "completed earlier" in again.stdout + again.stderr and "sst_acc" in again.stdout
    assert read_results(run_dir) == done and (run_dir / "metrics.jsonl").read_text() == metrics


def test_damaged_checkpoints_fall_back_then_fail_clearly(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert load_checkpoint(path)["step"] == 1 and "unusable" in caplog.text
    prev = tmp_path / "last.prev.pt"
    raw = bytearray(prev.read_bytes())
    raw[-40] ^= 0xFF  # one flipped byte
    prev.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="no usable checkpoint.*SHA-256"):
        load_checkpoint(path)


def test_checkpoints_hold_no_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    save_checkpoint({"x": Evil()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "last.pt")


def trainer(tmp_path, data_dir, *overrides) -> Trainer:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "budget=smoke", "logger=none",
                                          f"data.root={data_dir}", f"data.cache_dir={tmp_path}/c",
                                          *overrides])
    return Trainer(cfg, RunDir(tmp_path / "run"))


def test_non_finite_loss_names_task_and_step(tmp_path, data_dir):
    t = trainer(tmp_path, data_dir)
    with torch.no_grad():
        t.setup.model.heads["para"].linear.weight.fill_(math.nan)
    with pytest.raises(NonFiniteLoss, match=r"task\(s\) \['para'\] at step 0.*on_nonfinite=skip"):
        t.fit()
    assert t.step > 1, "noted on the device, raised at the next check"
    assert not list(t.run.checkpoints.glob("*")), "nothing is saved from the spoilt weights"


def test_non_finite_loss_skip_leaves_parameters_alone(tmp_path, data_dir):
    t = trainer(tmp_path, data_dir, "trainer.on_nonfinite=skip", "trainer.epochs=1", "trainer.max_skipped=1")
    with torch.no_grad():
        t.setup.model.heads["sts"].projection.weight[0, 0] = math.inf
    before = {k: v.clone() for k, v in t.setup.model.encoder.state_dict().items()}
    results = t.fit()
    assert results["skipped_steps"] == results["steps"] == 5
    assert t.scheduler.last_epoch == 5, "skipped steps count in the LR schedule"
    after = t.setup.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_too_many_skipped_steps_stop_the_run(tmp_path, data_dir):
    t = trainer(tmp_path, data_dir, "trainer.on_nonfinite=skip", "trainer.epochs=1")  # max_skipped 0.1 of 5 steps
    with torch.no_grad():
        t.setup.model.heads["sts"].projection.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLoss, match=r"1 steps skipped for non-finite losses, more than trainer.max_skipped=0.1"):
        t.fit()


def test_best_evaluation_counts_an_undefined_pearson_as_zero(tmp_path, data_dir, monkeypatch):
    """A constant STS head must not win by leaving STS out of the average."""
    t = trainer(tmp_path, data_dir, "trainer.epochs=2")
    dev = iter([{"sst_acc": 0.5, "para_acc": 0.6, "sts_pearson": None, "mean": None, "overall": None},
                {"sst_acc": 0.45, "para_acc": 0.55, "sts_pearson": 0.5, "mean": 0.5, "overall": 0.583},
                {"sst_acc": 0.4, "para_acc": 0.5, "sts_pearson": 0.4, "mean": 0.433, "overall": 0.533}])  # dev
    monkeypatch.setattr("mtbert.trainer.evaluate", lambda *args, **kwargs: next(dev))
    results = t.fit()
    assert results["best_epoch"] == 2 and results["validation"]["sts_pearson"] == 0.5
    assert results["dev"] == results["dev_last"] and results["dev"]["sts_pearson"] == 0.4


def test_a_config_from_before_eval_every_steps_still_trains(tmp_path, data_dir):
    """Runs saved by an older mtbert resume with their own config, which lacks the key."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "budget=smoke", "logger=none", "trainer.epochs=1",
                                          f"data.root={data_dir}", f"data.cache_dir={tmp_path}/c"])
    with open_dict(cfg):
        del cfg.trainer.eval_every_steps
    t = Trainer(current_terms(cfg), RunDir(tmp_path / "run"))
    assert t.eval_every_steps is None
    assert t.fit()["steps"] == 5


def test_a_run_saved_by_an_earlier_mtbert_resumes_and_predicts(tmp_path, data_dir):
    """Its config lacks `weighting` and says 'cross' for a cosine STS loss, which was then
    encoded siamese: both are read as they were meant, not refused."""
    run_dir = tmp_path / "run"
    run_train(*RUN, "loss=cosine", "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    done = read_results(run_dir)

    def as_saved_before(yaml: str) -> str:
        cfg = OmegaConf.create(yaml)
        del cfg["weighting"]
        cfg.model.pair_encoding = {"para": "cross", "sts": "cross"}
        return OmegaConf.to_yaml(cfg)

    config = run_dir / ".hydra" / "config.yaml"
    config.write_text(as_saved_before(config.read_text()))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    save_checkpoint({**state, "config": as_saved_before(state["config"])}, run_dir / "checkpoints" / "last.pt")
    (run_dir / "results.json").write_text(json.dumps({**done, "status": "interrupted"}))

    run_train(f"resume={run_dir}", cwd=tmp_path, data=data_dir)
    assert read_results(run_dir)["status"] == "completed"
    assert read_results(run_dir)["dev"] == done["dev"]
    assert current_terms(OmegaConf.load(config)).model.pair_encoding.sts is None
    assert load_best(run_dir, device="cpu").model is not None
