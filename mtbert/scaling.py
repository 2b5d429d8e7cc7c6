"""fp16 loss scaling (torch.amp.GradScaler) around a step whose task gradients are combined.

A gradient method that combines per-task gradients must see them unscaled: MGDA, CAGrad
and Nash-MTL are not scale-invariant. So the scaler does not unscale the optimizer's
`.grad`, which will hold the combination, but the step's gradients before it: the task
gradients of the shared parameters and the heads' own (or, where the summed loss was
enough, every `.grad`), presented as GradScaler reads an optimizer. Its `step` runs only
when they are all finite: the method combines them and the real optimizer steps. They are
averaged over the ranks before the check, so every rank skips the same steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class StepGradients:
    """The step's gradients as GradScaler sees an optimizer (`param_groups` of tensors with
    a `.grad`); `step()` combines and applies them."""

    def __init__(self, grads: list[Tensor], step: Callable[[], None]):
        holders = []
        for g in grads:
            holder = g.detach()  # a tensor of the gradient's shape, whose .grad is the gradient itself
            holder.grad = g
            holders.append(holder)
        self.param_groups = [{"params": holders}]
        self._step = step

    def step(self) -> bool:
        self._step()
        return True


def scaled_step(scaler: torch.amp.GradScaler, grads: list[Tensor], step: Callable[[], None]) -> bool:
    """Unscale `grads` in place, run `step` if they are finite, update the scale; whether the
    step was taken (an overflow skips it, and the scale backs off)."""
    view = StepGradients(grads, step)
    scaler.unscale_(view)
    taken = scaler.step(view) is not None
    scaler.update()
    return taken


def step_gradients(grads, shared: list[nn.Parameter], heads: list[nn.Parameter]) -> list[Tensor]:
    """What the scaler checks: the task gradients still to combine (`GradientMethod.collect`)
    and the heads' gradients, or every `.grad` where the summed loss was enough."""
    if grads is None:
        return [p.grad for p in [*shared, *heads] if p.grad is not None]
    return [grads.matrix, *(p.grad for p in heads if p.grad is not None)]
