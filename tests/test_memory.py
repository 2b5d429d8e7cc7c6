"""Less memory, the same update: activation checkpointing (and gradient accumulation)."""

import pytest
import torch
from conftest import compose_config, write_cs224n

from mtbert.rundir import RunDir
from mtbert.trainer import Trainer

EXACT = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "trainer.precision=fp32",
         "trainer.log_every_seconds=0", "data.validation=null", "model.dropout=0",
         "+model.random_init.hidden_dropout_prob=0", "+model.random_init.attention_probs_dropout_prob=0")


def trained(tmp_path, name, *overrides) -> tuple[Trainer, dict]:
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config(*EXACT, *overrides, data=data, cache=tmp_path / "cache")
    trainer = Trainer(cfg, RunDir(tmp_path / name))
    results = trainer.fit()
    trainer.run.close()
    return trainer, results


def checkpointing(trainer: Trainer) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.setup.model.encoder.modules())


@pytest.mark.parametrize("method", [("optim=pcgrad", "schedule=paper"), ("optim=adam",)], ids=" ".join)
def test_gradient_checkpointing_changes_no_update(method, tmp_path):
    """Recomputed activations give the gradients stored ones do, also through PCGrad's one
    backward per task (the graph retained between them) and the paper's frozen phases."""
    plain, _ = trained(tmp_path, "plain", "trainer.max_steps=8", *method)
    ckpt, _ = trained(tmp_path, "ckpt", "trainer.max_steps=8", "model.gradient_checkpointing=true", *method)
    assert checkpointing(ckpt) and not checkpointing(plain)
    a, b = plain.setup.model.state_dict(), ckpt.setup.model.state_dict()
    start = Trainer(compose_config(*EXACT, data=tmp_path / "data", cache=tmp_path / "cache"),
                    RunDir(tmp_path / "start")).setup.model.state_dict()
    assert sum(not torch.equal(a[k], start[k]) for k in a) > 10, "the weights moved"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("method", [("optim=adam",), ("optim=pcgrad",), ("optim=upgrad",), ("weighting=uw",),
                                    ("weighting=gradnorm",), ("weighting=famo", "optim=pcgrad")], ids=" ".join)
def test_accumulated_micro_batches_make_the_whole_batch_update(method, tmp_path):
    """Batches of 6 in 3 micro-batches of 2 make the update of batches of 6, for a method that
    sums, one that projects, an aggregator, a weighting with learnt weights, GradNorm (the
    task gradients' norms on W, of the whole batch) and FAMO (its update from the whole
    batch's losses): each task's gradient is accumulated apart before it is combined."""
    common = ("trainer.max_steps=5", "data.batch_size=6", "model.pair_encoding.para=siamese", *method)
    whole, a = trained(tmp_path, "whole", *common)
    micro, b = trained(tmp_path, "micro", *common, "trainer.accumulate=3")
    assert a["examples_seen"] == b["examples_seen"] and b["steps"] == 5
    x, y = whole.setup.model.state_dict(), micro.setup.model.state_dict()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-6, msg=k)
    if whole.setup.weighting.reweights:
        torch.testing.assert_close(micro.setup.weighting.applied, whole.setup.weighting.applied, rtol=1e-4, atol=1e-6)
