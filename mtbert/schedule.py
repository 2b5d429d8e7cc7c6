"""Training schedule (paper section 4.3): which parameters train when, and the LR decay.

The paper trains heads only for 5 epochs, everything for 20, heads only for 5, and
multiplies every learning rate by 0.7 at epochs 5 and 25 with MultiStepLR. Phase lengths
here are relative and scaled to the run's optimizer steps, so `[5, 20, 5]` is exactly the
paper's schedule under its 30-epoch budget and keeps its proportions under shorter ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

TRAINABLE = ("all", "heads")


@dataclass
class Phase:
    train: str  # "all": encoder and heads; "heads": the encoder is frozen
    length: float


class Schedule:
    """Phases with relative lengths, and LR x `gamma` at each phase boundary."""

    def __init__(self, phases: list[dict] | None = None, gamma: float = 1.0):
        self.phases = [Phase(**p) for p in phases] if phases else [Phase("all", 1.0)]
        for i, phase in enumerate(self.phases):
            if phase.train not in TRAINABLE:
                raise ValueError(f"phases[{i}].train must be one of {TRAINABLE}, "
                                 f"got {phase.train!r}")
            if phase.length <= 0:
                raise ValueError(f"phases[{i}].length must be > 0, got {phase.length}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        self.gamma = gamma

    def boundaries(self, total_steps: int) -> list[int]:
        """The first step of each phase after the first."""
        total = sum(p.length for p in self.phases)
        edges, acc = [], 0.0
        for phase in self.phases[:-1]:
            acc += phase.length
            edges.append(round(total_steps * acc / total))
        return edges

    def trains_encoder(self, step: int, total_steps: int) -> bool:
        phase = sum(step >= edge for edge in self.boundaries(total_steps))
        return self.phases[phase].train == "all"

    def lr_scheduler(self, optimizer: Optimizer, total_steps: int) -> LRScheduler:
        """Stepped once per optimizer step."""
        return MultiStepLR(optimizer, milestones=self.boundaries(total_steps), gamma=self.gamma)
