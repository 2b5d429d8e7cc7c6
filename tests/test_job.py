"""mtbert.job: the one lifecycle of a run (train.py's jobs, tune's trials, the tests), each end
mapped to its record, with `train` replaced by what each case needs (no model loads)."""

import json

import pytest
from omegaconf import OmegaConf

import mtbert.job
from mtbert.errors import ConfigError
from mtbert.guards import Interrupted
from mtbert.job import Lifecycle, run_job


def config(keep_last: bool = True):
    return OmegaConf.create({"seed": 3, "logger": {"_target_": "mtbert.logger.NoLogger"},
                             "trainer": {"keep_last": keep_last}})


def training(monkeypatch, outcome):
    """`train` as a callable `outcome(cfg, run, on_eval)`: returns results, or raises."""
    calls = []

    def fake(cfg, run, on_eval=None, reads=None):
        calls.append(on_eval)
        (run.checkpoints / "last.pt").parent.mkdir(exist_ok=True)
        (run.checkpoints / "last.pt").write_bytes(b"state")
        return outcome(cfg, run, on_eval)
    monkeypatch.setattr(mtbert.job, "train", fake)
    return calls


def read(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_a_completed_run_is_recorded_and_keeps_last_unless_told(tmp_path, monkeypatch):
    seen = []
    calls = training(monkeypatch, lambda cfg, run, on_eval: seen.append(read(run.path)) or {"steps": 2})
    results = run_job(config(), tmp_path / "kept", experiment="x", process={"pid": 1})
    assert seen[0]["status"] == "running" and seen[0]["process"] == {"pid": 1}, "running before training"
    assert results == read(tmp_path / "kept")
    assert results["status"] == "completed" and results["steps"] == 2 and results["experiment"] == "x"
    assert results["seed"] == 3 and results["error"] is None and results["train_seconds"] > 0
    assert calls == [None], "no on_eval: the trainer gets none"
    assert (tmp_path / "kept" / "checkpoints" / "last.pt").exists()
    run_job(config(keep_last=False), tmp_path / "dropped")
    assert not (tmp_path / "dropped" / "checkpoints" / "last.pt").exists()


def test_an_on_eval_that_stops_the_run_makes_it_pruned_and_last_always_goes(tmp_path, monkeypatch):
    training(monkeypatch, lambda cfg, run, on_eval: {"steps": 4 if on_eval(4, {}) else 8})
    results = run_job(config(), tmp_path / "run", on_eval=lambda step, metrics: True, always_drop_last=True)
    assert results["status"] == "pruned" and results["steps"] == 4
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert run_job(config(), tmp_path / "on", on_eval=lambda step, metrics: False)["status"] == "completed"


@pytest.mark.parametrize("label", [False, True])
def test_an_interruption_adds_to_the_previous_record_then_the_caller_decides(label, tmp_path, monkeypatch):
    def stop(cfg, run, on_eval):
        raise Interrupted("stopped by SIGTERM", {"steps": 5})
    training(monkeypatch, stop)
    previous = {"status": "interrupted", "steps": 3, "best_step": 2, "process": {"pid": 9}}
    failures = []
    with pytest.raises(Interrupted):
        with Lifecycle(config(), tmp_path, previous=previous, label_interrupts=label,
                       on_failure=lambda e, results: failures.append(dict(results)) or False) as job:
            job.open()
            job.train()
    record = read(tmp_path)
    assert record["status"] == "interrupted" and record["steps"] == 5 and record["best_step"] == 2
    assert record["error"] == ("Interrupted: stopped by SIGTERM" if label else "stopped by SIGTERM")
    assert failures == [{**record, "train_seconds": 0.0}], "on_failure sees the record before it is written"


def test_a_refused_resume_leaves_the_run_resumable(tmp_path, monkeypatch):
    def refuse(cfg, run, on_eval):
        raise ConfigError("the data changed")
    training(monkeypatch, refuse)
    previous = {"status": "interrupted", "steps": 3}
    with pytest.raises(ConfigError):
        run_job(config(), tmp_path, previous=previous)
    record = read(tmp_path)
    assert record["status"] == "interrupted" and record["steps"] == 3
    assert record["error"] == "resume refused: ConfigError: the data changed"


def test_an_error_fails_the_run_and_on_failure_may_let_the_job_end(tmp_path, monkeypatch):
    training(monkeypatch, lambda cfg, run, on_eval: 1 / 0)
    results = run_job(config(), tmp_path, on_failure=lambda e, results: True)  # a sweep goes on
    assert results == read(tmp_path)
    assert results["status"] == "failed" and results["error"] == "ZeroDivisionError: division by zero"
    with pytest.raises(ZeroDivisionError):
        run_job(config(), tmp_path / "again")


def test_stops_are_recorded_interrupted_others_failed_and_both_go_on(tmp_path, monkeypatch):
    def ctrl_c(cfg, run, on_eval):
        raise KeyboardInterrupt
    training(monkeypatch, ctrl_c)
    called = []
    with pytest.raises(KeyboardInterrupt):
        run_job(config(), tmp_path / "stop", stops={KeyboardInterrupt: "interrupted (SIGINT)"},
                on_failure=lambda e, results: called.append(e))
    assert read(tmp_path / "stop")["status"] == "interrupted" and not called, "a stop skips on_failure"
    assert read(tmp_path / "stop")["error"] == "interrupted (SIGINT)"
    with pytest.raises(KeyboardInterrupt):
        run_job(config(), tmp_path / "plain")
    assert read(tmp_path / "plain")["status"] == "failed" and read(tmp_path / "plain")["error"] is None


def test_a_job_that_fails_before_it_opens_its_run_still_records_on_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError):
        with Lifecycle(config(), tmp_path / "early"):
            raise ValueError("no such device")
    assert read(tmp_path / "early")["error"] == "ValueError: no such device"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError):
        with Lifecycle(config(), tmp_path / "rank1"):
            raise ValueError("no such device")
    assert not (tmp_path / "rank1").exists()
    (tmp_path / "shared").mkdir()
    training(monkeypatch, lambda cfg, run, on_eval: {"steps": 1})
    with Lifecycle(config(), tmp_path / "shared") as job:  # a rank other than 0 reads the run only
        job.open(writes=False)
        job.train()
    assert job.results["status"] == "completed" and not (tmp_path / "shared" / "results.json").exists()


def test_a_resumed_run_writes_no_running_record_over_its_own(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text(json.dumps({"status": "interrupted"}))
    seen = []
    training(monkeypatch, lambda cfg, run, on_eval: seen.append(read(run.path)["status"]) or {"steps": 6})
    assert run_job(config(), tmp_path, previous={"status": "interrupted"})["status"] == "completed"
    assert seen == ["interrupted"]
