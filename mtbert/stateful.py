"""The state of torchjd's stateful methods, for exact resumes.

torchjd's `state_dict()` holds a method's parameters and buffers only; DWA's loss history,
FAMO's last losses and its internal Adam, GradVac's running cosines and Nash-MTL's last
solution live in plain attributes. These are listed here by class, saved as tensors (a
checkpoint holds no pickled objects) and put back on resume.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.optim import Adam

ATTRIBUTES = {
    "DWA": ("_loss_sum", "_n_batches", "_previous_averages"),
    "FAMO": ("_prev_losses",),
    "GradVacWeighting": ("_phi_t",),
    "_NashMTLWeighting": ("step", "prvs_alpha"),
}


def torchjd_state(module: nn.Module) -> dict:
    state = {"tensors": module.state_dict()}
    for name, sub in module.named_modules():
        for attr in ATTRIBUTES.get(type(sub).__name__, ()):
            value = getattr(sub, attr)
            state[f"{name}:{attr}"] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if getattr(sub, "_optimizer", None) is not None:  # FAMO's Adam on its logits
            state[f"{name}:_optimizer"] = sub._optimizer.state_dict()
    return state


def load_torchjd_state(module: nn.Module, state: dict):
    for name, sub in module.named_modules():
        for attr in ATTRIBUTES.get(type(sub).__name__, ()):
            value = state[f"{name}:{attr}"]
            setattr(sub, attr, value.numpy() if isinstance(getattr(sub, attr), np.ndarray) else value)
        if f"{name}:_optimizer" in state:
            sub._optimizer = Adam([sub._w], lr=sub.lr, weight_decay=sub.weight_decay)
            sub._optimizer.load_state_dict(state[f"{name}:_optimizer"])
        if type(sub).__name__ == "_NashMTLWeighting" and sub.step > 0:
            sub._init_optim_problem()  # built at its first step, which a resumed run has had
        if type(sub).__name__ == "GradVacWeighting" and sub._phi_t is not None:
            sub._state_key = (sub._phi_t.shape[0], sub._phi_t.dtype)
    module.load_state_dict(state["tensors"])  # after the attributes: GradVac's buffer starts as None
