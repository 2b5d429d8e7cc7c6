"""What only a GPU can show: autocast, loss scaling, fused AdamW, compile, pinned copies,
no host sync and NCCL, each on a tiny model. Marked `cuda` and skipped without one;
`python -m mtbert.bench.gpu` runs them where a GPU is lent (`pytest -m cuda tests/`)."""

import socket

import pytest
import torch
import torch.distributed as dist

from conftest import compose_config, write_cs224n
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ("model=tiny", "budget=smoke", "logger=none", "trainer.device=cuda", "trainer.max_seconds=null",
        "trainer.log_every_seconds=0", "trainer.max_steps=6", "data.validation=null")


def make_trainer(tmp_path, *overrides, name: str = "run") -> Trainer:
    data = write_cs224n(tmp_path / "data", n=48)
    cfg = compose_config(*TINY, *overrides, data=data, cache=tmp_path / "cache")
    return Trainer(cfg, RunDir(tmp_path / name))


def fit(tmp_path, *overrides) -> tuple[Trainer, dict]:
    trainer = make_trainer(tmp_path, *overrides)
    results = trainer.fit()
    trainer.run.close()
    return trainer, results


def test_bf16_autocast_trains_in_bf16(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16")
    dtypes = set()
    linear = next(m for m in trainer.setup.model.encoder.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    results = trainer.fit()
    assert results["device"] == "cuda" and results["precision"] == "bf16" and results["steps"] == 6
    assert results["overflow_steps"] == 0 and trainer.setup.scaler is None
    assert dtypes == {torch.bfloat16}, "the encoder's matmuls ran under bf16 autocast"
    assert results["dev"]["mean"] is not None


def test_fp16_trains_with_the_grad_scaler(tmp_path):
    trainer, results = fit(tmp_path, "trainer.precision=fp16")
    assert results["precision"] == "fp16" and results["steps"] == 6
    overflows = results["overflow_steps"]
    assert isinstance(overflows, int) and overflows < 6, "recorded, and most steps taken"
    assert trainer.setup.scaler.get_scale() == 65536.0 * 0.5 ** overflows  # no growth within 2000 steps


def test_an_fp16_overflow_on_cuda_is_skipped_and_counted(tmp_path):
    """The CUDA path of GradScaler (its fused non-finite check) skips every step at a scale of 1e30."""
    trainer = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.max_steps=3",
                           "trainer.grad_scaler.init_scale=1e30")
    before = {k: v.clone() for k, v in trainer.setup.model.state_dict().items()}
    results = trainer.fit()
    assert results["overflow_steps"] == 3 and results["skipped_steps"] == 0
    after = trainer.setup.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    assert trainer.setup.scaler.get_scale() == pytest.approx(1e30 * 0.5 ** 3)


def test_adamw_is_fused_on_cuda(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16")
    trainer.setup.model.train()
    trainer.training_step(trainer.next_batches(trainer.setup.train_tasks))
    optimizer = trainer.setup.optimizer
    assert optimizer.defaults["fused"] is True
    param = optimizer.param_groups[0]["params"][0]
    assert param.is_cuda and optimizer.state[param]["step"].is_cuda, "fused AdamW keeps its step count on the GPU"


def test_compiled_tiny_run_completes(tmp_path):
    trainer, results = fit(tmp_path, "trainer.precision=bf16", "trainer.compile=true", "trainer.max_steps=3",
                           "optim=pcgrad")
    assert results["steps"] == 3 and results["dev"]["mean"] is not None
    assert trainer.setup.model.encoder._compiled_call_impl is not None


def test_batches_go_to_the_gpu_pinned_and_non_blocking(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16")
    batch = trainer.streams["sts"].next()
    pinned, copies = [], []
    real_pin, real_to = torch.Tensor.pin_memory, torch.Tensor.to
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "pin_memory",
                  lambda self, *a, **k: pinned.append(real_pin(self, *a, **k)) or pinned[-1])
        m.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((self, k)) or real_to(self, *a, **k))
        moved = batch.to(torch.device("cuda"))
    assert pinned and all(t.is_pinned() for t in pinned)
    assert copies and all(source.is_pinned() and kwargs.get("non_blocking") for source, kwargs in copies)
    torch.cuda.synchronize()
    for name in ("input_ids", "attention_mask", "labels", "index"):
        assert getattr(moved, name).is_cuda and torch.equal(getattr(moved, name).cpu(), getattr(batch, name)), name


def steps_without_sync(trainer: Trainer, steps: int = 3) -> list[dict]:
    """Training steps under torch's sync debug mode, which raises at any synchronizing call
    (.item(), a device-to-host copy, a data-dependent shape); the first step, which creates
    the optimizer state, and the batches' copies run outside it."""
    trainer.setup.model.train()
    trainer.training_step(trainer.next_batches(trainer.setup.train_tasks))
    batches = [trainer.next_batches(trainer.setup.train_tasks) for _ in range(steps)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return [trainer.training_step(b) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("optim", ["adam", "pcgrad"])
def test_training_step_never_syncs_with_the_host(optim, tmp_path):
    losses = steps_without_sync(make_trainer(tmp_path, "trainer.precision=bf16", f"optim={optim}"))
    assert all(torch.isfinite(loss).all() for step in losses for loss in step.values())


def test_nccl_with_one_process(tmp_path, monkeypatch):
    """The process group train.py opens on GPUs (NCCL for tensors, gloo for flags), at world size 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    try:
        t = torch.full((4,), 3.0, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [3.0] * 4
        box = ["run dir"]
        dist.broadcast_object_list(box, src=0)
        trainer = make_trainer(tmp_path, "trainer.precision=bf16")
        trainer.setup.model.train()
        losses = trainer.training_step(trainer.next_batches(trainer.setup.train_tasks))
        assert all(torch.isfinite(loss) for loss in losses.values())
    finally:
        dist.destroy_process_group()


def accumulation() -> str:
    if "accumulate" not in compose_config().trainer:
        pytest.skip("no trainer.accumulate in conf/train.yaml")
    return "trainer.accumulate=2"


def test_gradient_accumulation_on_cuda(tmp_path):
    _, results = fit(tmp_path, "trainer.precision=bf16", accumulation())
    assert results["steps"] == 6 and results["dev"]["mean"] is not None


def test_an_accumulated_step_never_syncs_with_the_host(tmp_path):
    steps_without_sync(make_trainer(tmp_path, "trainer.precision=bf16", "optim=pcgrad", accumulation()), steps=2)
