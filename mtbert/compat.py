"""Configs and checkpoints saved by earlier versions of mtbert, restated in today's terms,
in one place: the rest of the code reads one format. A key added since, or a component's
state saved since, gets the value that means what the older run did."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from mtbert import distributed
from mtbert.config import build_objectives, declared_tasks


# Keys added since runs were first saved, with the value that keeps an older run's meaning.
ADDED_KEYS = {
    "weighting": {"_target_": "mtbert.weighting.Equal"},  # the losses were summed with equal weights
    "data.validation": None,  # the dev sets chose the checkpoint
    "trainer.eval_every_steps": None,
    "trainer.eval_tasks": None,  # every declared task was evaluated
    "trainer.max_examples": None,
    "trainer.eval_every_examples": None,
    "trainer.grad_scaler": {"init_scale": 65536.0, "growth_interval": 2000},  # no run used fp16
    "model.gradient_checkpointing": False,
    "trainer.accumulate": 1,
    "sharing": {"_target_": "mtbert.sharing.HardSharing"},  # every task shared the encoder and the shared layer
    "regularizer": {"_target_": "mtbert.regularizer.Regularizer"},  # no regularizer
}


def current_terms(saved: DictConfig) -> DictConfig:
    """A config saved by an earlier mtbert, restated in today's keys with the meaning it had,
    so that its runs still resume and predict: each key added since (`ADDED_KEYS`) with the
    value that meant what the run did; and before `check_pair_encodings`, a 'cross' pair
    encoding under a cosine loss was encoded siamese (the loss decided, as `null` says now)."""
    for key, value in ADDED_KEYS.items():
        if OmegaConf.select(saved, key, default=KeyError) is KeyError:
            OmegaConf.update(saved, key, value, force_add=True)
    encodings = saved.model.get("pair_encoding") or {}
    for name, objective in build_objectives(saved, declared_tasks(saved)).items():
        if objective.compares_embeddings and encodings.get(name) == "cross":
            encodings[name] = None
    return saved


def current_state(state: dict, components: dict, tokenizer_digest: str) -> dict:
    """A checkpoint saved by an earlier mtbert, restated in today's format (as `current_terms`
    restates its config), so that the loop and each component read one format: what a
    stateful component did not save (it kept no such state then: the loss weighting, an
    aggregator's, a weighting's period count, the regularizer's) is its initial state; a run
    that did not record its data files or tokenizer is not checked on them; generators saved
    for one process stand for each rank's."""
    for name, component in components.items():
        state[name] = {**component.state_dict(), **state.get(name, {})}
    state.setdefault("data", {})
    state.setdefault("tokenizer", tokenizer_digest)
    rng = state["rng"]
    if isinstance(rng["torch"], torch.Tensor):  # saved before every rank's state was kept
        rng["torch"], rng["cuda"] = [rng["torch"]] * distributed.world_size(), [rng["cuda"]] * distributed.world_size()
    return state
