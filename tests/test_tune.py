"""mtbert.tune: an Optuna study of tiny runs end to end, pruned trials, a resumed study,
a failing trial, and the search space's validation."""

import csv
import json

import pytest
from omegaconf import OmegaConf

from conftest import read_results, run_train, write_cs224n
from mtbert.tune import SpaceError, check_space, main

TINY = ["experiment=rro_hp_cs", "model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
        "trainer.max_steps=6", "trainer.eval_every_steps=2", "data.batch_size=4"]
ONE_EVAL = [o for o in TINY if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=2"]  # its last


@pytest.fixture
def data(tmp_path, monkeypatch):
    root = write_cs224n(tmp_path / "data", n=24)
    monkeypatch.setenv("MTBERT_DATA_DIR", str(root))
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    return root


def trials(study) -> list[dict]:
    with open(study / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_a_study_writes_best_csv_and_plots_and_its_command_reproduces_the_best_trial(data, tmp_path):
    study = tmp_path / "study"
    best = main(["hpo=paper_rates", *TINY, "--trials", "4", "--dir", str(study)])
    rows = trials(study)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4  # the median pruner waits for 5
    for name in ("best.yaml", "history.png", "slices.png", "importances.png", "study.db"):
        assert (study / name).is_file(), name
    saved = OmegaConf.load(study / "best.yaml")
    assert saved.value == best["value"] == max(float(r["mean"]) for r in rows if r["state"] == "COMPLETE")
    trial_dir = study / "trials" / f"{saved.trial:04d}"
    assert read_results(trial_dir)["status"] == "completed"
    for n in range(4):  # a trial keeps its best weights, not the resume state it never needs
        checkpoints = sorted(p.name for p in (study / "trials" / f"{n:04d}" / "checkpoints").iterdir())
        assert checkpoints == ["best.safetensors"], checkpoints
    assert saved.command.startswith("python train.py experiment=rro_hp_cs model=tiny")
    assert "optim.lr.heads.sts=" in saved.command

    run_train(*saved.command.split()[2:], f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path, data=data)
    again = read_results(tmp_path / "again")
    assert again["validation"]["mean"] == pytest.approx(saved.value, abs=1e-6), "the printed command reproduces it"


def test_pruned_trials_are_recorded_as_pruned_not_failed(data, tmp_path):
    study = tmp_path / "study"
    pruner = ["hpo.pruner._target_=optuna.pruners.ThresholdPruner", "~hpo.pruner.n_startup_trials",
              "~hpo.pruner.n_warmup_steps", "+hpo.pruner.lower=2.0"]  # no mean reaches 2: all pruned
    assert main(["hpo=paper_rates", *TINY, *pruner, "--trials", "2", "--dir", str(study)]) is None
    assert [r["state"] for r in trials(study)] == ["PRUNED", "PRUNED"]
    for n in range(2):
        results = read_results(study / "trials" / f"{n:04d}")
        assert results["status"] == "pruned" and results["steps"] == 2 and results["error"] is None
    assert not (study / "best.yaml").exists()


def test_a_trial_that_reaches_its_last_evaluation_is_complete_whatever_the_pruner_says(data, tmp_path):
    study = tmp_path / "study"
    pruner = ["hpo.pruner._target_=optuna.pruners.ThresholdPruner", "~hpo.pruner.n_startup_trials",
              "~hpo.pruner.n_warmup_steps", "+hpo.pruner.lower=2.0"]  # would prune every evaluation
    main(["hpo=paper_rates", *ONE_EVAL, *pruner, "--trials", "1", "--dir", str(study)])
    assert [r["state"] for r in trials(study)] == ["COMPLETE"]
    assert read_results(study / "trials" / "0000")["status"] == "completed"


def test_a_resumed_study_draws_new_values_not_its_seed_again(data, tmp_path):
    study = tmp_path / "study"
    random = ["~hpo.pruner.n_startup_trials", "~hpo.pruner.n_warmup_steps", "hpo.pruner._target_=optuna.pruners.NopPruner",
              "hpo.sampler._target_=optuna.samplers.RandomSampler"]
    for wanted in (2, 4):  # stopped after 2 trials, then the same command asks for 4
        main(["hpo=paper_rates", *ONE_EVAL, *random, "--trials", str(wanted), "--dir", str(study)])
    drawn = [r["optim.lr.encoder"] for r in trials(study)]
    assert len(drawn) == 4 and len(set(drawn)) == 4, drawn


def test_a_stopped_study_continues_and_a_failing_trial_does_not_stop_it(data, tmp_path):
    study = tmp_path / "study"
    space = ["~hpo.space", "+hpo.space={sampler.sigma: {type: categorical, choices: [2, -1]}}",
             "hpo.sampler._target_=optuna.samplers.BruteForceSampler", "hpo.pruner._target_=optuna.pruners.NopPruner",
             "~hpo.pruner.n_startup_trials", "~hpo.pruner.n_warmup_steps"]
    main(["hpo=paper_rates", *TINY, *space, "--trials", "1", "--dir", str(study)])
    assert len(trials(study)) == 1
    main(["hpo=paper_rates", *TINY, *space, "--trials", "2", "--dir", str(study)])  # the same command, more trials
    rows = trials(study)
    assert [r["trial"] for r in rows] == ["0", "1"]
    assert sorted(r["state"] for r in rows) == ["COMPLETE", "FAIL"]
    failed = next(r for r in rows if r["state"] == "FAIL")
    assert "sampler.sigma must be a positive integer" in failed["error"]
    results = json.loads((study / "trials" / f"{int(failed['trial']):04d}" / "results.json").read_text())
    assert results["status"] == "failed" and "sampler.sigma" in results["error"]
    assert OmegaConf.load(study / "best.yaml").params == {"sampler.sigma": 2}


@pytest.mark.parametrize("space, message", [
    ({"optim.lr.nope": {"low": 1e-5, "high": 1e-3}}, "hpo.space.optim.lr.nope"),
    ({"optim.lr.encoder": {"low": 1e-3, "high": 1e-5}}, "needs `low` < `high`"),
    ({"optim.lr.encoder": {"type": "uniform", "low": 0, "high": 1}}, "type must be one of"),
    ({"optim.lr.encoder": {"low": 0.0, "high": 1.0, "log": True}}, "a log scale needs `low` > 0"),
    ({}, "hpo.space is empty"),
])
def test_the_search_space_is_checked_before_any_trial(space, message, data):
    with pytest.raises(SpaceError, match=message.replace(".", r"\.").replace("`", ".")):
        check_space(space, TINY)


@pytest.mark.parametrize("overrides, message", [
    (["hpo=nope"], "Could not find 'hpo/nope'"),
    (["hpo=paper_rates", "hpo.n_trials=3"], "Could not override 'hpo.n_trials'"),
    ([], "name a search space, e.g. hpo=paper_rates"),
])
def test_a_bad_command_line_is_one_error_line(overrides, message):
    with pytest.raises(SystemExit) as e:
        main(overrides)
    assert str(e.value).startswith("error: ") and message in str(e.value)
