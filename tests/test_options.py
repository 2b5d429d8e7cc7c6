"""Every option of every config group, every experiment, and the options inside groups
that change what trains, for two steps on the tiny model (as lightning-hydra-template runs
`experiment=glob(*)`): a shipped choice that breaks fails here, not in a user's sweep."""

import pytest

from conftest import ROOT, compose_config, write_cs224n
from mtbert.job import run_job

CONF = ROOT / "conf"
METRIC = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_pearson"}
HUB = {"bert_base", "distilbert", "roberta", "deberta_v3"}  # weights from the hub: test_encoders trains them tiny
NEEDS = {"weighting=dwa": ("weighting.period=1", "trainer.max_steps=3")}  # equal weights for two periods
CHOICES = [(choice, *NEEDS.get(choice, ())) for group in sorted(CONF.iterdir())
           if group.is_dir() and group.name != "hydra"
           for option in sorted(group.glob("*.yaml")) if option.stem not in HUB
           for choice in [f"{group.name}={option.stem}"]]
INSIDE = [  # options within groups
    ("model.pooling=cls",), ("model.pooling=pooler",),
    ("loss=baseline", "model.pair_encoding.para=siamese", "model.pair_encoding.sts=siamese"),
    ("loss=baseline", "loss.objectives.sst.class_weights=[1,2,1,2,1]"),
    ("sampler=rr_over", "sampler.per_task=true"),
    ("optim=pcgrad", "diagnostics.grad_every=1"),
    ("weighting=famo", "optim=upgrad", "diagnostics.grad_every=1"),
    ("weighting=gradnorm", "schedule=paper", "diagnostics.grad_every=1"),
    ("trainer.on_nonfinite=skip",),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cs224n(tmp_path_factory.mktemp("options") / "data", n=24)


@pytest.mark.parametrize("overrides", CHOICES + INSIDE, ids=" ".join)
def test_option_trains_two_steps(overrides, data, tmp_path):
    model = () if any(o.startswith("model=") for o in overrides) else ("model=tiny",)
    cfg = compose_config("trainer.max_steps=2", "trainer.max_seconds=null", "data.batch_size=4",
                         "data.limit.train=12", "data.limit.dev=12", *model, *overrides,
                         data=data, cache=data.parent / "cache")
    results = run_job(cfg, tmp_path / "run")  # the lifecycle train.py's jobs and tune's trials run
    evaluated = cfg.trainer.eval_tasks or ["sst", "para", "sts"]  # a single-task baseline: its own
    assert results["steps"] == cfg.trainer.max_steps
    assert set(results["dev"]) - {"mean", "overall"} == {METRIC[t] for t in evaluated}
