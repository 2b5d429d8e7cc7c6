"""Less memory, the same update: one task's graph at a time, activation checkpointing and
gradient accumulation."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer  # the layers of transformers >= 5.0
from conftest import compose_config, write_cs224n

from mtbert.batching import collate
from mtbert.build import Setup
from mtbert.device import autocast
from mtbert.gradients import Sum
from mtbert.model import checkpoint_threshold, checkpointed_modules
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
    plain, _ = trained(tmp_path, "plain", "trainer.max_steps=8", "model.gradient_checkpointing=false", *method)
    ckpt, _ = trained(tmp_path, "ckpt", "trainer.max_steps=8", "model.gradient_checkpointing=true", *method)
    assert checkpointing(ckpt) and not checkpointing(plain)
    a, b = plain.setup.model.state_dict(), ckpt.setup.model.state_dict()
    start = Trainer(compose_config(*EXACT, data=tmp_path / "data", cache=tmp_path / "cache"),
                    RunDir(tmp_path / "start")).setup.model.state_dict()
    assert sum(not torch.equal(a[k], start[k]) for k in a) > 10, "the weights moved"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


BF16 = ("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null", "trainer.precision=bf16",
        "trainer.log_every_seconds=0", "data.validation=null", "trainer.max_steps=8")
OPTIONS = [(), ("sharing=top_layers",), ("sharing=lora", "sharing.train_base=true"), ("regularizer=smart",)]


def bf16_run(tmp_path, name, option, setting) -> tuple[dict, set, dict]:
    """A default-like run (bf16, dropout on) with `model.gradient_checkpointing=setting`: its
    results, whether its training forwards were recomputed, and its weights."""
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config(*BF16, *option, f"model.gradient_checkpointing={setting}", data=data, cache=tmp_path / "cache")
    trainer = Trainer(cfg, RunDir(tmp_path / name))
    layer = next(m for m in trainer.setup.model.modules() if isinstance(m, GradientCheckpointingLayer))
    recomputed = set()
    layer.register_forward_pre_hook(  # in training: whether this forward is recomputed in the backward
        lambda m, args: recomputed.add(m.gradient_checkpointing) if m.training else None)
    assert trainer.setup.model.encoder.config.hidden_dropout_prob > 0
    results = trainer.fit()
    trainer.run.close()
    return results, recomputed, trainer.setup.model.state_dict()


@pytest.fixture(scope="module")
def plain_bf16_run(tmp_path_factory):
    """An option's run without checkpointing, made once (in each worker that needs it) for
    both settings it is compared with."""
    runs = {}

    def run(option):
        if option not in runs:
            runs[option] = bf16_run(tmp_path_factory.mktemp("plain"), "plain", option, "false")
        return runs[option]
    return run


@pytest.mark.parametrize("setting", ["true", "100"])
@pytest.mark.parametrize("option", OPTIONS, ids=" ".join)
def test_gradient_checkpointing_in_bf16_with_dropout_is_bit_identical(option, setting, plain_bf16_run, tmp_path):
    """As a default run trains (bf16 autocast, dropout on): the recomputed forward draws the
    dropout masks the stored one drew (the RNG state is replayed), so every weight is equal
    to the bit, and the scores are the plain run's. With a threshold (100 padded tokens:
    these SST batches have 72, Quora's 112-128 and STS's 144) only the wider batches recompute."""
    a, plain, x = plain_bf16_run(option)
    b, ckpt, y = bf16_run(tmp_path, "ckpt", option, setting)
    assert (plain, ckpt) == ({False}, {True} if setting == "true" else {False, True})
    assert a["dev"] == b["dev"]
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("setting", [0, -5, 1.5, "wide"])
def test_gradient_checkpointing_takes_true_false_or_a_token_count(setting):
    with pytest.raises(ValueError, match="model.gradient_checkpointing must be true, false or a number"):
        checkpoint_threshold(setting)
    assert (checkpoint_threshold(False), checkpoint_threshold(True), checkpoint_threshold(2048)) == (None, 0, 2048)


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


def built(tmp_path, *overrides) -> Setup:
    data = write_cs224n(tmp_path / "data", n=16)
    cfg = compose_config("model=tiny", "logger=none", "data.validation=null", *overrides, data=data,
                         cache=tmp_path / "cache")
    s = Setup(cfg, RunDir(tmp_path / "run"))
    s.model.train()
    return s


def each_task_loss(s: Setup, size: int = 8):
    """Each task's loss as the trainer makes it (its own autocast, dropout drawn), one at a time."""
    for t in s.tasks:
        batch = collate(s.train[t], torch.arange(size), s.tokenizer.pad_token_id)
        with autocast(s.device, s.precision):
            output = s.model(t, batch)
        yield {t: s.objectives[t].loss(output, batch.labels, s.tasks[t])}


@pytest.mark.parametrize("overrides", [
    ("trainer.precision=fp32",), ("trainer.precision=bf16",), ("sharing=top_layers", "trainer.precision=bf16"),
    ("sharing=lora", "sharing.train_base=true"), ("regularizer=smart", "trainer.precision=fp32"),
    ("regularizer=smart", "trainer.precision=bf16"),
    ("loss=baseline", "sharing=mmoe"),
], ids=" ".join)
def test_one_task_graph_at_a_time_gives_the_summed_loss_gradient_bit_for_bit(overrides, tmp_path):
    """The default step (Sum, equal weights) runs each task's backward before the next task's
    forward; its gradients equal one backward of the summed loss to the bit, though float sums
    depend on their order (the first task's gradient added first would differ)."""
    s = built(tmp_path, *overrides)
    params = [p for p in s.model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    losses = {t: loss for one in each_task_loss(s) for t, loss in one.items()}
    sum(losses.values()).backward()
    summed = [p.grad for p in params]
    s.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    shared = s.model.shared_parameters()
    heads = [p for own in s.model.task_parameters().values() for p in own]
    Sum().collect_by_task(each_task_loss(s), list(s.tasks), shared, heads)
    assert sum(g is not None for g in summed) > 10
    for p, g in zip(params, summed):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_one_task_graph_at_a_time_holds_one_tasks_activations(tmp_path):
    """What autograd keeps for the backward, at its most, in a step of three tasks: the
    summed loss's one backward keeps every task's, the default step one task's at a time."""
    s = built(tmp_path, "trainer.precision=fp32")
    shared = s.model.shared_parameters()
    heads = [p for own in s.model.task_parameters().values() for p in own]

    def peak_saved(collect) -> int:
        alive, peak = [0], [0]

        class Saved:
            def __init__(self, tensor):
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                alive[0] += self.size
                peak[0] = max(peak[0], alive[0])

            def __del__(self):
                alive[0] -= self.size

        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
            collect()
        s.model.zero_grad(set_to_none=True)
        return peak[0]

    def summed():
        losses = {t: loss for one in each_task_loss(s, 16) for t, loss in one.items()}
        Sum().collect(losses, shared, heads)

    at_once = peak_saved(summed)
    by_task = peak_saved(lambda: Sum().collect_by_task(each_task_loss(s, 16), list(s.tasks), shared, heads))
    assert by_task < 0.6 * at_once, (by_task, at_once)


def test_a_recomputed_batch_hands_freed_memory_back_before_each_layers_backward(tmp_path, monkeypatch):
    """glibc's heap grows through a recomputed backward unless its free pages go back between
    layers: a wide batch trims before each checkpointed module's backward, a narrow one (its
    activations kept) and an evaluation never."""
    s = built(tmp_path, "trainer.precision=fp32", "model.gradient_checkpointing=100")
    trims = []
    monkeypatch.setattr("mtbert.memory.release_memory", lambda: trims.append(len(trims)))
    checkpointed = checkpointed_modules(s.model.encoder)
    assert sum(isinstance(m, GradientCheckpointingLayer) for m in checkpointed) == s.model.encoder.config.num_hidden_layers

    def step(task: str, size: int):
        batch = collate(s.train[task], torch.arange(size), s.tokenizer.pad_token_id)
        output = s.model(task, batch)
        s.objectives[task].loss(output, batch.labels, s.tasks[task]).backward()
        return batch.input_ids.numel()

    assert step("sst", 2) <= 100 and trims == []
    assert step("sst", 16) > 100 and len(trims) == len(checkpointed)
    s.model.eval()
    with torch.no_grad():
        s.model("sst", collate(s.train["sst"], torch.arange(16), s.tokenizer.pad_token_id))
    assert len(trims) == len(checkpointed)
