"""Precision by hardware, and fp16 with loss scaling under every kind of gradient method."""

import json

import pytest
import torch
from conftest import compose_config, write_cs224n

import mtbert.weighting
from mtbert.device import resolve_precision
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16"), ((6, 0), "fp32")],
                         ids=["T4", "V100", "A100", "H100", "P100"])
def test_auto_on_gpus_by_compute_capability(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    precision, why = resolve_precision("auto", torch.device("cuda", 0))
    assert precision == expected and f"{capability[0]}.{capability[1]}" in why


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                        (False, True, "bf16")],
                         ids=["AVX2 or AVX-512 without bf16", "AVX512_BF16", "AMX"])
def test_auto_on_cpus_by_native_bf16(avx512_bf16, amx, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # AVX-512 alone decides nothing
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and why.startswith("auto:")
    assert resolve_precision("fp16", torch.device("cpu")) == ("fp16", "trainer.precision=fp16")


def test_auto_is_fp32_where_torchs_kernels_are_capped_below_avx512(monkeypatch):
    """`ATEN_CPU_CAPABILITY=avx2` on a CPU with AVX512_BF16: the kernels would emulate bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_precision("auto", torch.device("cpu"))[0] == "fp32"


def run(tmp_path, name, *overrides):
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
                         "trainer.log_every_seconds=0", "trainer.max_steps=6", "data.validation=null",
                         "model.dropout=0", "+model.random_init.hidden_dropout_prob=0",
                         "+model.random_init.attention_probs_dropout_prob=0", *overrides,
                         data=data, cache=tmp_path / "cache")
    trainer = Trainer(cfg, RunDir(tmp_path / name))
    results = trainer.fit()
    trainer.run.close()
    events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, results, [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.parametrize("method", [("optim=adam",), ("optim=pcgrad",), ("optim=upgrad",), ("weighting=uw",)],
                         ids=" ".join)
def test_fp16_trains_as_fp32_does(method, tmp_path):
    """fp16 keeps 11 significant bits (a relative rounding of 5e-4 per operation): after six
    steps of a tiny model the losses agree with fp32's to a few parts in a thousand, and the
    loss scale (65536, never overflowing here) leaves no trace: each method combined the
    unscaled task gradients (MGDA-like aggregators would be off by far more otherwise)."""
    _, exact, fp32 = run(tmp_path, "fp32", "trainer.precision=fp32", *method)
    trainer, half, fp16 = run(tmp_path, "fp16", "trainer.precision=fp16", *method)
    assert half["precision"] == "fp16" and half["overflow_steps"] == 0
    assert trainer.setup.scaler.get_scale() == 65536.0
    assert len(fp16) == len(fp32) == 6
    for a, b in zip(fp16, fp32):
        assert a == pytest.approx(b, rel=5e-3, abs=2e-3)
    assert half["dev_last"]["mean"] == pytest.approx(exact["dev_last"]["mean"], abs=0.05)


def test_an_fp16_overflow_is_skipped_counted_and_kept_from_the_weighting(tmp_path, monkeypatch):
    """A scale of 1e30 overflows fp16's gradients: the step is skipped (no parameter moves),
    counted apart from non-finite losses, the scale backs off, and the loss weighting's
    history (FAMO's update after each step) is not fed from it."""
    updates = []
    real = mtbert.weighting.Scalarized.after_step
    monkeypatch.setattr(mtbert.weighting.Scalarized, "after_step",
                        lambda self, recompute: updates.append(1) or real(self, recompute))
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "trainer.max_seconds=null",
                         "trainer.precision=fp16", "weighting=famo", "trainer.max_steps=3",
                         "trainer.grad_scaler.init_scale=1e30", data=data, cache=tmp_path / "cache")
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    before = {k: v.clone() for k, v in trainer.setup.model.state_dict().items()}
    results = trainer.fit()
    assert results["overflow_steps"] == 3 and results["skipped_steps"] == 0
    assert updates == [], "no weighting history from skipped steps"
    after = trainer.setup.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    assert trainer.setup.scaler.get_scale() == pytest.approx(1e30 * 0.5 ** 3)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["overflow_steps"] for e in log if e["event"] == "train"][-1] == 3
