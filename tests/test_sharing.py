"""The `sharing` group (issue 34): what each option shares, checked by hand on the tiny
model; a task's own layers, adapter or gate get exactly that task's gradient under
PCGrad; every option trains on each encoder family, predicts and is analysed from its
best checkpoint; a config saved before the group means hard sharing; mistakes are named.
(Resume and 2-rank DDP: tests/test_resume.py and tests/test_distributed.py.)"""

import csv

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import open_dict

from conftest import compose_config, read_results, run_module, run_train
from test_encoders import tiny
from mtbert.analyze import analyze
from mtbert.batching import Batch
from mtbert.errors import ConfigError
from mtbert.build import build_network
from mtbert.compat import current_terms
from mtbert.job import run_job
from mtbert.rundir import RunDir
from mtbert.schema import UnknownKeyError, compose
from mtbert.trainer import Trainer
from mtbert.weighting import GradNorm

OPTIONS = ("top_layers", "lora", "mmoe")
TASKS = ("sst", "para", "sts")
NO_DROPOUT = ("trainer.precision=fp32", "model.dropout=0", "+model.random_init.hidden_dropout_prob=0",
              "+model.random_init.attention_probs_dropout_prob=0")


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# each option's own parameters of task t below its head, by name, and what else it changes
OWN = {"hard": lambda n, t: False,
       "top_layers": lambda n, t: n.startswith(f"sharing.layers.{t}."),
       "lora": lambda n, t: f".lora_A.{t}." in n or f".lora_B.{t}." in n,
       "mmoe": lambda n, t: n.startswith(f"shared.gates.{t}.")}


@pytest.mark.parametrize("option", ["hard", *OPTIONS])
def test_what_each_option_shares_by_hand(option, data_dir):
    cfg = compose_config("model=tiny", f"sharing={option}", data=data_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_network(cfg)[3:]
    every = {n for n, _ in model.named_parameters()}
    own = {t: names(model, params) for t, params in model.task_parameters().items()}
    for t in TASKS:
        below = {n for n in every if OWN[option](n, t)}
        assert own[t] == {n for n in every if n.startswith(f"heads.{t}.")} | below
        # sts's cosine head (loss=cosine_mse) reads the pooled embedding: no MMoE gate for it
        assert bool(below) == (option != "hard" and (option, t) != ("mmoe", "sts"))
    assert names(model, model.shared_parameters()) == every - set().union(*own.values())

    layers = {n.split(".")[3] for n in every if n.startswith("encoder.encoder.layer.")}
    assert layers == ({"0"} if option == "top_layers" else {"0", "1"}), "the copied top layer is not kept twice"
    if option == "top_layers":  # each copy starts from the pretrained layer
        torch.manual_seed(cfg.seed)
        hard = build_network(compose_config("model=tiny", data=data_dir)).model.state_dict()
        for t in TASKS:
            for key, value in model.sharing.layers[t][0].state_dict().items():
                assert torch.equal(value, hard[f"encoder.encoder.layer.1.{key}"])
    if option == "mmoe":
        assert "shared.0.weight" not in every and {f"shared.experts.{i}.0.weight" for i in range(4)} <= every
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if option == "lora":  # the base frozen (train_base=false): the shared layer is all that is shared and trains
        assert trainable - set().union(*own.values()) == {"shared.0.weight", "shared.0.bias"}
    else:
        assert trainable == every
    gradnorm = GradNorm(list(TASKS))  # its matrix: the last shared one that trains
    gradnorm.bind(model)
    assert gradnorm.parameter == {"top_layers": "encoder.encoder.layer.0.output.dense.weight",
                                  "lora": "shared.0.weight"}.get(option, "encoder.encoder.layer.1.output.dense.weight")
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["shared"] + sum(counts["tasks"].values()) == counts["trainable"]

    # every parameter that trains is reached by some task's loss (BERT's pooler aside: mean pooling)
    model.train()
    enc = tokenizer(["a fine film", "a dull one"], ["is it?", "it is"], padding=True, return_tensors="pt")
    batch = Batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], None, torch.arange(2))
    sum(model(t, batch).float().sum() for t in TASKS).backward()
    unreached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == {n for n in trainable if n.startswith("encoder.pooler.")}


@pytest.mark.parametrize("overrides", [
    ("sharing=top_layers",), ("sharing=top_layers", "model.gradient_checkpointing=true"),
    ("sharing=lora", "sharing.dropout=0"),
    # the base shared too; the checkpointed layers recomputed in the backward, after other tasks' forwards
    ("sharing=lora", "sharing.dropout=0", "sharing.train_base=true", "model.gradient_checkpointing=true"),
    ("sharing=mmoe",)], ids=" ".join)
def test_a_tasks_own_parameters_get_exactly_its_gradient_under_pcgrad(overrides, tmp_path, data_dir):
    """The gradient the PCGrad step leaves on a task's own layers, adapter or gate (and head)
    is that task's loss alone, backpropagated; PCGrad changes the shared gradient meanwhile."""
    cfg = compose_config("model=tiny", "optim=pcgrad", "budget=smoke", "logger=none", "data.batch_size=8",
                         *NO_DROPOUT, *overrides, data=data_dir, cache=tmp_path / "cache")
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    s = trainer.setup
    s.model.train()
    trainer.set_phase()
    option = overrides[0].removeprefix("sharing=")
    own = {t: [p for n, p in s.model.named_parameters() if n.startswith(f"heads.{t}.") or OWN[option](n, t)]
           for t in TASKS}  # by name, not from the model's own bookkeeping
    assert sum(len(own[t]) > len(list(s.model.heads[t].parameters())) for t in TASKS) >= 2
    left, projections = {}, []
    optimizer_step, coefficients = s.optimizer.step, s.gradient.coefficients

    def step(*args, **kwargs):  # what the gradient method left, as the optimizer sees it
        left.update({id(p): p.grad.clone() for params in own.values() for p in params})
        return optimizer_step(*args, **kwargs)

    def counted(gram):
        c, n = coefficients(gram)
        projections.append(int(n))
        return c, n

    s.optimizer.step, s.gradient.coefficients = step, counted  # (torch then warns that step was replaced)
    for _ in range(4):
        batches = trainer.next_batches(s.train_tasks)
        alone = {}
        for t, batch in batches.items():
            s.optimizer.zero_grad(set_to_none=True)
            trainer.task_losses({t: batch})[t].backward()
            alone[t] = [p.grad.clone() for p in own[t]]
        s.optimizer.zero_grad(set_to_none=True)
        trainer.training_step(batches)
        for t in batches:
            for p, g in zip(own[t], alone[t]):
                torch.testing.assert_close(left[id(p)], g, rtol=0, atol=1e-6)
        trainer.step += 1
    assert sum(projections) > 0, "PCGrad projected some task gradients: the test can tell shared from own"


@pytest.mark.parametrize("family", ["distilbert", "deberta_v3"])
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_trains_on_another_family(option, family, tmp_path, data_dir, caplog):
    caplog.set_level("INFO", logger="mtbert.trainer")
    cfg = compose_config(*tiny(family), f"sharing={option}", "optim=pcgrad", "schedule=paper", "budget=smoke",
                         "trainer.max_seconds=null", "trainer.max_steps=6", "logger=none",
                         data=data_dir, cache=tmp_path / "cache")
    results = run_job(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["steps"] == 6
    assert all(results["dev"][k] is not None for k in ("sst_acc", "para_acc", "sts_pearson"))
    counts = results["parameters"]
    assert counts["shared"] + sum(counts["tasks"].values()) == counts["trainable"]
    frozen = {"top_layers": "encoder and the tasks' top layers frozen", "lora": "encoder frozen (its base and every "
              "adapter)", "mmoe": "encoder frozen (the experts and gates train on, as the shared layer does)"}
    assert f"step 0: {frozen[option]}, training heads" in caplog.text  # the paper schedule's first phase


@pytest.mark.parametrize("option", ["top_layers", "lora"])
def test_predict_and_analyze_from_the_best_checkpoint(option, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train("model=tiny", "budget=smoke", "logger=none", f"sharing={option}", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, data=data_dir)
    proc = run_module("mtbert.predict", str(run_dir), cwd=tmp_path,
                      env={"MTBERT_DATA_DIR": str(data_dir), "MTBERT_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert len((run_dir / "predictions" / "sst-dev-output.csv").read_text().splitlines()) == 61
    # the best checkpoint, rebuilt with its task layers or adapters, scores what the run recorded for it
    out = analyze(run_dir, top=3, device="cpu", data_root=str(data_dir))
    dev = read_results(run_dir)["dev"]
    confusion = np.array([r[1:] for r in csv.reader(open(out / "sst_confusion.csv"))][1:], dtype=int)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(dev["sst_acc"], abs=1e-6)
    assert f"## sts: Pearson r {dev['sts_pearson']:.4f}" in (out / "summary.md").read_text()


def test_a_config_saved_before_the_group_means_hard_sharing(data_dir):
    cfg = compose_config("model=tiny", data=data_dir)
    with open_dict(cfg):
        del cfg["sharing"]
    torch.manual_seed(0)
    model = build_network(current_terms(cfg)).model
    assert type(model.sharing).__name__ == "HardSharing"
    assert not any(k.startswith("sharing.") for k in model.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (("sharing=top_layers", "sharing.k=2"),
     "sharing.k=2 must be smaller than the encoder's 2 layers, so that at least one stays shared: "
     "set sharing.k to at most 1"),
    (("sharing=top_layers", "sharing.k=0"), "sharing.k must be a whole number >= 1, got 0"),
    (("sharing=lora", "sharing.targets=[query,qery]"),
     "sharing.targets: 'qery' names no linear layer in this bert encoder's layers; name roles"),
    (("sharing=mmoe", "sharing.experts=1"), "sharing.experts must be a whole number >= 2"),
])
def test_a_bad_value_is_named(overrides, message, data_dir):
    with pytest.raises(ConfigError, match=f"^{message}".replace("(", r"\(").replace("[", r"\[")):
        build_network(compose_config("model=tiny", *overrides, data=data_dir))


def test_lora_refuses_compile(tmp_path, data_dir):
    cfg = compose_config("model=tiny", "sharing=lora", "trainer.compile=true", "logger=none", data=data_dir,
                         cache=tmp_path / "cache")
    with pytest.raises(ConfigError, match="^trainer.compile=true with sharing=lora: .* set trainer.compile=false"):
        Trainer(cfg, RunDir(tmp_path / "run"))


def test_an_unknown_option_or_key_is_refused():
    with pytest.raises(MissingConfigException, match="sharing/shared"):
        compose_config("sharing=shared")
    with pytest.raises(UnknownKeyError, match=r"^unknown config key sharing.kk .*did you mean sharing.k\?"):
        compose(["sharing=top_layers", "+sharing.kk=2"])
    with pytest.raises(UnknownKeyError, match=r"sharing.k \(from \+sharing.k=2\) is a key of sharing=top_layers, "
                                              r"not of the chosen sharing=hard"):
        compose(["+sharing.k=2"])
