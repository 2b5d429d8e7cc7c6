"""No silent stretch: evaluations and predictions report progress, the ETA counts the
evaluations to come, and results.json shows the best so far while a run is running."""

import json
import logging

import pytest
from conftest import compose_config, write_cs224n

from mtbert.evaluate import predict
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer

SMOKE = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "trainer.precision=fp32")


def make(tmp_path, *overrides) -> Trainer:
    data = write_cs224n(tmp_path / "data", n=60)
    return Trainer(compose_config(*SMOKE, *overrides, data=data, cache=tmp_path / "cache"), RunDir(tmp_path / "run"))


def test_predictions_report_progress_with_an_eta(tmp_path, caplog):
    trainer = make(tmp_path)
    s = trainer.setup
    task, enc = s.dev["sts"]
    with caplog.at_level(logging.INFO, logger="mtbert.evaluate"):
        predict(s.model, task, s.objectives["sts"], enc, s.device, s.precision, max_tokens=64,
                label="evaluating dev", log_every=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating dev sts:")]
    assert len(lines) >= 3 and all(" examples | elapsed " in line and "| ETA " in line for line in lines)
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[-1] < len(enc) and lines[0].split("/")[1].startswith(f"{len(enc)} ")


def test_results_show_the_best_so_far_while_running(tmp_path):
    trainer = make(tmp_path, "trainer.max_steps=6", "trainer.eval_every_steps=2")
    seen = []

    def read(step, metrics):
        record = json.loads((tmp_path / "run" / "results.json").read_text())
        seen.append((step, record))

    trainer.on_eval = read
    results = trainer.fit()
    assert [step for step, _ in seen] == [2, 4]
    for step, record in seen:
        assert record["status"] == "running" and record["steps"] == step and record["train_seconds"] > 0
        assert record["validation"] and record["best_step"] <= step and record["dev"] is None, "dev only at the end"
    assert results["steps"] == 6


def test_the_eta_counts_the_evaluations_to_come(tmp_path):
    trainer = make(tmp_path, "trainer.max_steps=6", "trainer.eval_every_steps=2")
    assert trainer.evaluations_left() == 0.0, "unknown before the first evaluation"
    trainer.eval_seconds, trainer.step = 5.0, 2
    size = lambda split: sum(len(enc) for _, enc in split.values())  # noqa: E731
    report = 2 * 5.0 * size(trainer.setup.dev) / size(trainer.setup.validation)
    assert trainer.evaluations_left() == pytest.approx(2 * 5.0 + report)  # steps 4 and 6, then the dev report
