"""Gradient methods: how the step's task losses become gradients (paper section 3.8).

`Sum` is plain multitask training (eq. 1: backpropagate the weighted sum). Methods that
combine per-task gradients of the shared parameters (PCGrad and friends) subclass
`GradientMethod` with the same `backward` signature.
"""

from __future__ import annotations

from torch import Tensor, nn


class GradientMethod:
    def backward(self, losses: dict[str, Tensor], shared: list[nn.Parameter]) -> dict | None:
        """Write gradients into `.grad`; return diagnostics to log, or None."""
        raise NotImplementedError


class Sum(GradientMethod):
    def backward(self, losses, shared):
        sum(losses.values()).backward()
        return None
