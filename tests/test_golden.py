"""Golden values: the first steps' losses and the dev scores of short tiny fp32 runs at
seed 0, recorded before a refactor, so that any silent change to the data pipeline,
batching, heads, losses, gradient methods or the loop fails here (torchtune's expected
loss values). A change meant to alter them records new ones in golden.json, and says why,
in its commit."""

import json
from pathlib import Path

import pytest
from conftest import compose_config, write_cs224n
from mtbert.rundir import RunDir
from mtbert.trainer import train

GOLDEN = json.loads((Path(__file__).parent / "golden.json").read_text())


def run(tmp_path, *overrides):
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "trainer.precision=fp32", "data.validation=null",
                         "trainer.max_seconds=null", "trainer.log_every_seconds=0", "trainer.max_steps=6",
                         "trainer.eval_every_steps=3", *overrides, data=data, cache=tmp_path / "cache")
    run_dir = RunDir(tmp_path / "run")
    results = train(cfg, run_dir)
    run_dir.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [e["loss"] for e in events if e["event"] == "train"],
            "dev": [e["dev"] for e in events if e["event"] == "eval"], "best": results["dev"]}


@pytest.mark.parametrize("name, overrides", [
    ("default", ()),
    ("row6", ("experiment=rro_hp_cs_gs",)),
    ("sequential_baseline", ("sampler=sequential", "loss=baseline")),
    ("annealed_siamese", ("sampler=annealed", "model.pair_encoding.para=siamese")),
])
def test_golden(name, overrides, tmp_path):
    got = run(tmp_path, *overrides)
    print(name, json.dumps(got))
    assert flat(got) == pytest.approx(flat(GOLDEN[name]), rel=1e-5, abs=1e-6)


def flat(record, prefix="") -> dict:
    """{"loss.0.sst": 1.6, ...}: pytest.approx compares flat dicts only."""
    items = record.items() if isinstance(record, dict) else enumerate(record)
    out = {}
    for key, value in items:
        if isinstance(value, (dict, list)):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
