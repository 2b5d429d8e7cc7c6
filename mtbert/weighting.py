"""Loss weighting: how much each task's loss counts in a step, before the gradient method.

`Equal` leaves eq. 1's losses (lambda_t from `loss.weights`) as they are. `Scalarized`
runs a torchjd scalarizer S (UW, DWA, FAMO, ...) on the step's loss values and hands the
gradient method each task's loss times dS/dL_t: by the chain rule the model's gradient is
exactly S's, the task losses stay apart (so PCGrad and the aggregators still see one
gradient per task), and the weights applied are what is logged. `GradNorm` (Chen et al.
2018), which torchjd lacks, learns its weights from the task gradients' norms on one
shared weight matrix.

The loop calls `check` once it knows the run's length, `weigh` before the backward,
`after_step` after the optimizer step (with a function that recomputes the step's losses
on the same batches, for methods that learn from the losses after the update, like FAMO)
and `end_epoch`. Weights are computed from the losses averaged over all ranks, and rank
0's are used everywhere, so N processes weigh exactly as one process with the whole batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtbert import distributed
from mtbert.stateful import load_torchjd_state, torchjd_state

Losses = dict[str, Tensor]


def global_values(losses: Losses) -> Tensor:
    """The step's task losses as one fp32 vector, averaged over the ranks."""
    values = torch.stack([loss.detach().float() for loss in losses.values()])
    distributed.average_([values])
    return values


class Weighting:
    """Base class, and a method's hooks. `every_task`: the method needs every training
    task's loss in each step (refused with samplers that give one task per step).
    `reweights`: its weights are not all 1, so an accumulated step keeps the task
    gradients apart to scale them (`weigh_accumulated`)."""

    every_task = True
    reweights = True

    def __init__(self, tasks: list[str], lr: float | None = None):
        self.tasks, self.lr = list(tasks), lr
        self.applied: Tensor | None = None  # the last step's weights, for the grad events

    @property
    def name(self) -> str:
        """What messages call the method: the paper's name."""
        return type(self).__name__

    def bind(self, model: nn.Module):
        """Called once the model is built, for methods that read its parameters."""

    def parameters(self) -> list[nn.Parameter]:
        """Weights learnt by the model's optimizer, in their own group at `lr`."""
        return []

    def to(self, device: torch.device) -> Weighting:
        return self

    def check(self, total_steps: int, steps_per_epoch: int):
        """Refuse (ValueError) a run too short for the method to do anything."""

    def weigh(self, losses: Losses) -> Losses:
        raise NotImplementedError

    def weigh_accumulated(self, values: Losses, grads) -> Tensor | None:
        """For a step accumulated over micro-batches: the weights from the whole batch's
        loss values (detached) and task gradients (`gradients.TaskGradients`), to scale the
        gradients with, as `weigh` scales the losses of a step in one piece."""
        self.weigh(values)
        return self.applied

    def after_step(self, recompute: Callable[[], Losses]):
        pass

    def end_epoch(self):
        pass

    def logged(self) -> dict[str, float] | None:
        return None if self.applied is None else dict(zip(self.tasks, self.applied.tolist()))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass

    def weighted(self, losses: Losses, weights: Tensor) -> Losses:
        distributed.broadcast_(weights)  # a method that draws (RLW) draws once, on rank 0
        self.applied = weights
        return {t: w * loss for (t, loss), w in zip(losses.items(), weights)}


class Equal(Weighting):
    """Eq. 1 as it stands: each loss times its lambda_t, summed."""

    every_task = False
    reweights = False

    def weigh(self, losses):
        return losses

    def weigh_accumulated(self, values, grads):
        return None


class Scalarized(Weighting):
    """A torchjd scalarizer (`torchjd.scalarization`: UW, DWA, FAMO, IMTLL, ...).

    `scalarizer` is given partial (Hydra's `_partial_`) and built here with one entry per
    training task when it takes a `shape`. Its parameters (UW's log-variances, IMTL-L's
    scales) join the model's optimizer at `lr`; with `lr: null` none do (FAMO steps its
    own logits in `update`, which this class calls after each step with the recomputed
    losses). A scalarizer with `step` (DWA) is stepped at the end of each of its periods:
    every `period` optimizer steps, or each of the sampler's epochs with `period: null`.
    """

    def __init__(self, scalarizer: Callable[..., nn.Module], tasks: list[str], lr: float | None = None,
                 period: int | None = None):
        super().__init__(tasks, lr)
        takes_shape = "shape" in inspect.signature(scalarizer).parameters
        self.scalarizer = scalarizer(shape=len(self.tasks)) if takes_shape else scalarizer()
        self.stepped = hasattr(self.scalarizer, "step")
        if period is not None and not (self.stepped and isinstance(period, int) and period >= 1):
            raise ValueError(f"period must be a whole number >= 1 of optimizer steps, for a scalarizer "
                             f"stepped per epoch (DWA); got {period!r} for {self.name}")
        self.period = period
        self.steps = 0  # optimizer steps since the period began

    @property
    def name(self) -> str:
        return type(self.scalarizer).__name__

    def check(self, total_steps, steps_per_epoch):
        """DWA keeps equal weights for its first two periods: a run of two periods or fewer
        would be `weighting=equal` under another name."""
        period = self.period or steps_per_epoch
        if self.stepped and total_steps <= 2 * period:
            per = f"weighting.period={self.period}" if self.period else f"an epoch, {steps_per_epoch} steps"
            raise ValueError(
                f"period: {self.name} keeps equal weights for its first two periods ({per} each), and this run "
                f"has {total_steps} steps, so it would do nothing. Set weighting.period below {total_steps / 2:g} "
                f"(e.g. weighting.period={max(1, total_steps // 8)}) or train more epochs")

    def parameters(self):
        return list(self.scalarizer.parameters()) if self.lr is not None else []

    def to(self, device):
        self.scalarizer.to(device)
        return self

    def weigh(self, losses):
        values = global_values(losses).requires_grad_()
        learnt = self.parameters()
        weights, *grads = torch.autograd.grad(self.scalarizer(values), [values, *learnt])
        for p, g in zip(learnt, grads):
            p.grad = g
        return self.weighted(losses, weights)

    def after_step(self, recompute):
        if hasattr(self.scalarizer, "update"):
            with torch.no_grad():
                self.scalarizer.update(global_values(recompute()))
        if self.period:
            self.steps += 1
            if self.steps == self.period:
                self.steps = 0
                self.scalarizer.step()

    def end_epoch(self):
        if self.stepped and not self.period:
            self.scalarizer.step()

    def state_dict(self):
        return {**torchjd_state(self.scalarizer), "steps": self.steps}

    def load_state_dict(self, state):
        load_torchjd_state(self.scalarizer, state)
        self.steps = int(state["steps"])


class GradNorm(Weighting):
    """GradNorm (Chen et al. 2018): weights w_t, summing to T, learnt so that each task's
    weighted gradient norm on one shared weight matrix W, G_t = w_t ||grad_W L_t||, moves
    towards mean(G) r_t^alpha, where r_t is the task's loss ratio L_t / L_t(0) over the mean
    ratio (a task that trains slower gets a larger gradient).

    The gradient of sum_t |G_t - target_t| in w_t, the target held constant as in the paper,
    is sign(G_t - target_t) ||grad_W L_t||; the model's optimizer applies it at `lr`, then
    the weights are renormalised to sum to T. W is `parameter` (a model parameter's name),
    by default the encoder's last shared weight matrix outside its pooler: the last layer every
    task's loss reaches (the shared layer's where no encoder weight trains shared: a frozen
    LoRA base). While the schedule freezes the encoder the weights stay as they are.
    """

    def __init__(self, tasks: list[str], alpha: float = 1.5, lr: float = 0.025, parameter: str | None = None):
        super().__init__(tasks, lr)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha, self.parameter = alpha, parameter
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.initial: Tensor | None = None  # L_t(0): the first step's losses

    def bind(self, model):
        if self.parameter is None:  # of the shared parameters that train (a frozen LoRA base does not)
            shared = {id(p) for p in model.shared_parameters() if p.requires_grad}
            matrices = [n for n, p in model.named_parameters() if id(p) in shared and p.dim() == 2 and "pooler" not in n]
            self.parameter = ([n for n in matrices if n.startswith("encoder.")] or matrices)[-1]
        try:
            self.layer = model.get_parameter(self.parameter)
        except AttributeError:
            raise ValueError(f"parameter={self.parameter!r} is not a parameter of the model; "
                             "null takes the encoder's last weight matrix") from None

    def parameters(self):
        return [self.weights]

    def to(self, device):
        self.weights.data = self.weights.data.to(device)
        return self

    def weigh(self, losses):
        grads = None
        if self.layer.requires_grad:
            grads = [torch.autograd.grad(loss, self.layer, retain_graph=True, allow_unused=True)[0]
                     for loss in losses.values()]
            grads = [torch.zeros_like(self.layer) if g is None else g.float() for g in grads]
            distributed.average_(grads)
        return self.weighted(losses, self.learn(global_values(losses), grads))

    def weigh_accumulated(self, values, grads):
        layer = grads.of(self.layer) if grads is not None and self.layer.requires_grad else None
        self.weighted(values, self.learn(global_values(values), None if layer is None else list(layer.float())))
        return self.applied

    def learn(self, values: Tensor, grads: list[Tensor] | None) -> Tensor:
        """This step's weights; with the task gradients on W (over the ranks), the gradient
        that moves them towards the targets."""
        if self.initial is None:
            self.initial = values.clone()
        weights = self.weights.detach().clone()
        if grads is not None:
            norms = torch.stack([g.norm() for g in grads])
            ratios = values / self.initial
            target = (weights * norms).mean() * (ratios / ratios.mean()) ** self.alpha
            self.weights.grad = torch.sign(weights * norms - target) * norms
        return weights

    def after_step(self, recompute):
        with torch.no_grad():
            self.weights.clamp_(min=1e-6)
            self.weights.mul_(len(self.tasks) / self.weights.sum())

    def state_dict(self):
        return {"weights": self.weights.detach().clone(), "initial": self.initial}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.weights.copy_(state["weights"])
        self.initial = state["initial"]
