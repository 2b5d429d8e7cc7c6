"""The held-out selection split, reading dev only to report, equal data across samplers,
and the provenance every run records."""

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config, read_results, run_train, write_cs224n

import mtbert.trainer
from mtbert.data import RejectedRows, read_split
from mtbert.data.holdout import held_out_size, hold_out
from mtbert.config import declared_tasks
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer

SMOKE = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null")


def read(data: Path, name: str, file: str):
    task = declared_tasks(compose_config(data=data))[name]
    return read_split(task, data / file, RejectedRows(), labelled=True)


def test_split_is_disjoint_stratified_and_sized(tmp_path):
    data = write_cs224n(tmp_path / "data", n=400)
    rows = read(data, "sst", "ids-sst-train.csv")
    train, held = hold_out(rows, held_out_size(0.1, "sst", len(rows)))
    assert len(held) == 40 and len(train) == 360
    assert not set(train.ids) & set(held.ids) and set(train.ids) | set(held.ids) == set(rows.ids)
    whole, part = Counter(rows.labels), Counter(held.labels)
    for label, n in whole.items():  # each class keeps its share, to the row
        assert abs(part[label] - 40 * n / 400) < 1, (label, n, part[label])
    # the rows keep their own texts and labels
    index = {i: k for k, i in enumerate(rows.ids)}
    assert all(rows.texts[0][index[i]] == t and rows.labels[index[i]] == y
               for i, t, y in zip(held.ids, held.texts[0], held.labels))


def test_split_moves_with_neither_position_nor_limit_and_barely_with_an_added_row(tmp_path):
    data = write_cs224n(tmp_path / "data", n=300)
    path = data / "sts-train.csv"
    before = set(hold_out(read(data, "sts", "sts-train.csv"), 30)[1].ids)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "".join(reversed(lines[1:])))  # the same rows, in another order
    assert set(hold_out(read(data, "sts", "sts-train.csv"), 30)[1].ids) == before
    train, held = hold_out(read(data, "sts", "sts-train.csv"), 30, limit=50)
    assert set(held.ids) == before and len(train) == 50 and not set(train.ids) & before
    with open(path, "a") as f:  # a new row elsewhere in the file
        f.write("300\tnewid0000000000000000000001\tA new sentence.\tAnother one.\t2.5\n")
    after = set(hold_out(read(data, "sts", "sts-train.csv"), 30)[1].ids)
    assert len(after ^ before) <= 2, "at most the row at the edge trades places with the new one"


def test_split_does_not_move_with_seed_or_sampler(tmp_path, data_dir):
    held = []
    for overrides in (("seed=0",), ("seed=3", "sampler=proportional")):
        cfg = compose_config(*SMOKE, *overrides, data=data_dir, cache=tmp_path / "cache")
        trainer = Trainer(cfg, RunDir(tmp_path / f"run{len(held)}"))
        held.append({t: enc.ids.tolist() for t, (_, enc) in trainer.setup.validation.items()})
    assert held[0] == held[1] and set(held[0]) == {"sst", "para", "sts"}


@pytest.mark.parametrize("setting, why", [(0.6, "at most half"), (-1, "a count of rows"), ("x", "a count of rows"),
                                          (1.0, "a fraction in (0, 1)")])
def test_bad_validation_sizes_are_refused_naming_the_key(setting, why, tmp_path, data_dir):
    proc = run_train(*SMOKE, f"data.validation={setting}", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, data=data_dir, check=False)
    assert proc.returncode == 1 and "data.validation" in proc.stderr and why in proc.stderr, proc.stderr[-800:]


def test_selection_reads_dev_only_to_report(tmp_path, data_dir, monkeypatch):
    """Evaluations during training use the held-out rows; the dev sets are read after the
    last step alone: for the chosen checkpoint and the last one (once if they are one)."""
    cfg = compose_config(*SMOKE, "trainer.max_steps=6", "trainer.eval_every_steps=2", "trainer.precision=fp32",
                         data=data_dir, cache=tmp_path / "cache")
    run = RunDir(tmp_path / "run")
    trainer = Trainer(cfg, run)
    calls = []
    real = mtbert.trainer.evaluate

    def counting(model, split, *args, **kwargs):
        calls.append("dev" if split is trainer.setup.dev else "validation" if split is trainer.setup.validation
                     else "other")
        return real(model, split, *args, **kwargs)

    monkeypatch.setattr(mtbert.trainer, "evaluate", counting)
    trainer.on_eval = lambda step, metrics: calls.append(f"asked at {step}")
    results = trainer.fit()
    run.close()
    last = ["dev"] if results["best_step"] == 6 else ["dev", "dev"]
    assert calls == ["validation", "asked at 2", "validation", "asked at 4", "validation", *last]
    assert results["selected_on"] == "validation" and results["dev"] and results["dev_last"]
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6] and all("dev" not in e for e in evals)
    best = max(evals, key=lambda e: e["validation"]["mean"])
    assert results["validation"] == best["validation"] and results["best_step"] == best["step"]
    report = [e for e in events if e["event"] == "dev"]
    assert report == [{"step": 6, "event": "dev", "best_step": results["best_step"], "dev": results["dev"],
                       "dev_last": results["dev_last"]}]


def test_null_validation_selects_and_reports_on_dev(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "data.validation=null", f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert results["selected_on"] == "dev" and results["validation"] is None
    assert results["dev"] == max((e["dev"] for e in evals), key=lambda d: d["mean"])
    assert results["dev_last"] == evals[-1]["dev"]
    assert "validation" not in results["data"]["sst"]["train"] or not results["data"]["sst"]["train"]["validation"]


@pytest.mark.parametrize("sampler", ["rr_over", "proportional", "sequential"])
def test_equal_examples_gives_every_sampler_the_same_data(sampler, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "budget=equal_examples", f"sampler={sampler}", "data.batch_size=6", "data.limit.train=null",
              "trainer.max_examples=108", "trainer.eval_every_examples=54", "trainer.max_seconds=null",
              f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    assert sum(results["examples_seen"].values()) == 108
    assert results["steps"] == (6 if sampler == "rr_over" else 18)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [sum(e["examples_seen"].values()) for e in evals if e["event"] == "eval"] == [54, 108]


def test_every_run_records_its_provenance(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*SMOKE, "trainer.precision=fp32", f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    p = read_results(run_dir)["provenance"]
    assert len(p["code"]["commit"]) == 40 and isinstance(p["code"]["dirty"], bool)
    assert set(p["versions"]) == {"python", "torch", "transformers", "torchjd"} and all(p["versions"].values())
    assert p["device"]["type"] == "cpu" and p["device"]["name"] and p["device"]["isa"]
    assert p["precision"] == "fp32" and p["precision_reason"] == "trainer.precision=fp32" and p["threads"] >= 1


def test_a_run_from_before_the_split_resumes_choosing_on_dev(tmp_path, data_dir):
    """An older run's config has no data.validation: it resumes as it began, choosing on dev."""
    from omegaconf import OmegaConf
    from mtbert.compat import current_terms
    cfg = compose_config(*SMOKE, data=data_dir)
    saved = OmegaConf.create(OmegaConf.to_container(cfg))
    del saved.data["validation"]
    del saved.trainer["max_examples"]
    restated = current_terms(saved)
    assert restated.data.validation is None and restated.trainer.max_examples is None
