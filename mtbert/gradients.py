"""Gradient methods: how the step's task losses become gradients (paper section 3.8).

`Sum` is plain multitask training (eq. 1: backpropagate the weighted sum). `PCGrad` is
gradient surgery (Yu et al. 2020) and `Aggregated` any torchjd aggregator (UPGrad, MGDA,
...): both combine the per-task gradients of the shared parameters that `TaskGradients`
collects. A head (and a task's own layers, adapter or gate: `mtbert.sharing`) is reached
by its own task's loss only, so it always gets that task's gradient unchanged; `heads`
below names all of them.

Unlike Pytorch-PCGrad, which the paper used, a parameter that no task reaches (a frozen
encoder, BERT's unused pooler) keeps `.grad = None`, so AdamW neither moves nor decays
it, and the per-group learning rates and schedule act on the real optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from functools import cached_property

import torch
from torch import Tensor, nn

from mtbert import distributed
from mtbert.stateful import load_torchjd_state, torchjd_state


class TaskGradients:
    """The step's task gradients on the shared parameters: row i of `matrix` [T, P] is
    task i's gradient, flattened, held in `storage` (at least T x P elements). The only
    extra memory is this one vector per task.

    Each task's loss is backpropagated alone; the gradients it leaves on the shared
    parameters move into its row (added to it, for the micro-batches of an accumulated
    step), while those on its head stay. Expects the shared parameters' gradients cleared
    (`zero_grad(set_to_none=True)`).
    """

    def __init__(self, tasks: list[str], shared: list[nn.Parameter], storage: Tensor):
        self.tasks, self.params = list(tasks), shared
        self.sizes = [p.numel() for p in shared]
        self.matrix = storage[:len(tasks) * sum(self.sizes)].view(len(tasks), sum(self.sizes))
        self.reached = [False] * len(shared)
        self.filled = [False] * len(tasks)  # a row's first gradient is copied in, later ones added

    def add(self, losses: dict[str, Tensor]):
        """Backpropagate each task's loss alone and move its shared gradients into its row."""
        for n, (task, loss) in enumerate(losses.items()):
            i = self.tasks.index(task)
            loss.backward(retain_graph=n < len(losses) - 1)  # the tasks' graphs may overlap
            for k, (p, row) in enumerate(zip(self.params, self.matrix[i].split(self.sizes))):
                if p.grad is not None:
                    row.view_as(p).add_(p.grad) if self.filled[i] else row.view_as(p).copy_(p.grad)
                    self.reached[k] = True
                    p.grad = None
                elif not self.filled[i]:
                    row.zero_()
            self.filled[i] = True

    def average(self):
        """Each task's gradient over the ranks."""
        distributed.average_([self.matrix])

    def scale(self, weights: Tensor):
        """Row i times weights[i]: a loss weighting applied to the gradients it would have scaled."""
        self.matrix.mul_(weights.to(self.matrix)[:, None])

    def of(self, param: nn.Parameter) -> Tensor | None:
        """Each task's gradient on one shared parameter [T, *shape], or None if none reached it."""
        for k, p in enumerate(self.params):
            if p is param:
                if not self.reached[k]:
                    return None
                start = sum(self.sizes[:k])
                return self.matrix[:, start:start + self.sizes[k]].view(len(self.tasks), *p.shape)
        return None

    @cached_property
    def gram(self) -> Tensor:
        """[T, T] dot products of the task gradients, in float64, on their device."""
        return (self.matrix @ self.matrix.T).double()

    def write(self, combined: Tensor):
        """Set each reached shared parameter's `.grad` to its slice of `combined` [P]."""
        for p, g, reached in zip(self.params, combined.split(self.sizes), self.reached):
            if reached:
                p.grad = g.view_as(p)

    def diagnostics(self, combined: Tensor, projections: Tensor | None) -> dict:
        """Norms and pairwise cosines of the task gradients (null where a norm is 0), and
        how far the method's combined gradient is from their plain sum (Adam's): the norm
        of the difference relative to the sum's (`change`), their cosine and norm ratio; and
        the weights the method gave the task gradients, the least-squares coefficients of
        the combined gradient on them (exact for every update in their span; GradDrop's,
        masked per coordinate, is not)."""
        gram = self.gram.cpu()
        total = self.matrix.sum(0).double()
        combined = combined.double()
        weights = torch.linalg.pinv(gram) @ (self.matrix.double() @ combined).cpu()
        total_norm = total.norm().item()
        update = ({"change": (combined - total).norm().item() / total_norm,
                   "cos": (combined @ total).item() / (combined.norm().item() * total_norm or math.nan),
                   "norm_ratio": combined.norm().item() / total_norm}
                  if total_norm > 0 else {"change": None, "cos": None, "norm_ratio": None})
        norms = gram.diagonal().sqrt().tolist()
        cos = {}
        for i in range(len(self.tasks)):
            for j in range(i + 1, len(self.tasks)):
                denominator = norms[i] * norms[j]
                cos[f"{self.tasks[i]}|{self.tasks[j]}"] = (
                    gram[i, j].item() / denominator if denominator > 0 else math.nan)
        return {"cos": cos, "norm": dict(zip(self.tasks, norms)),
                "projections": None if projections is None else int(projections),
                "update": update, "weights": dict(zip(self.tasks, weights.tolist())),
                "params": self.matrix.shape[1]}


class GradientMethod:
    """Turns the step's task losses into `.grad` on every parameter.

    A subclass says how it combines the task gradients (`combine`) and on which steps that
    is just their sum (`sums`), for which one backward of the summed loss is enough.
    `seed` is the run seed, for methods that make random choices; `tasks` the training
    tasks' names, as a loss weighting gets them. `every_task`: the method needs every task's loss in each step.
    """

    every_task = True

    def __init__(self, seed: int = 0, tasks: list[str] = ()):
        """Every method is built with the run's seed and its training tasks
        (`mtbert.build.Setup`); a method keeps what it needs of them."""

    @property
    def name(self) -> str:
        """What messages call the method: the paper's name."""
        return type(self).__name__

    def backward(self, losses: dict[str, Tensor], shared: list[nn.Parameter], heads: list[nn.Parameter] = (),
                 diagnose: bool = False) -> dict | None:
        """Write gradients into `.grad`, averaged over the ranks (the only place a step
        averages gradients); with `diagnose`, return the task gradients' diagnostics (a
        `grad` event's fields). `collect`, then `apply`."""
        return self.apply(self.collect(losses, shared, heads, diagnose), diagnose)

    def collect(self, losses: dict[str, Tensor], shared: list[nn.Parameter], heads: list[nn.Parameter] = (),
                diagnose: bool = False) -> TaskGradients | None:
        """Backpropagate the step's losses and average the gradients over the ranks: the
        task gradients still to combine, or None where the summed loss was enough and
        `.grad` holds the result. Apart from `apply`, so that fp16's loss scaling can
        unscale and check what the method is about to combine (`step_gradients`)."""
        if not diagnose and self.sums(losses):
            sum(losses.values()).backward()
            distributed.average_([p.grad for p in [*shared, *heads] if p.grad is not None])
            return None
        grads = TaskGradients(list(losses), shared, self.storage(len(losses), shared))
        grads.add(losses)
        grads.average()
        distributed.average_([p.grad for p in heads if p.grad is not None])
        return grads

    def collect_by_task(self, task_losses: Iterable[dict[str, Tensor]], tasks: list[str], shared: list[nn.Parameter],
                        heads: list[nn.Parameter], diagnose: bool = False) -> TaskGradients | None:
        """`collect` with one task's graph alive at a time: `task_losses` yields each task's
        loss as its forward ends, and its backward runs before the next task's forward, so a
        step holds one task's activations instead of every task's. The gradients are
        `collect`'s, bit for bit. A task gradient is its own backward either way. A sum is one
        backward of the summed loss, which adds the tasks' gradients at each parameter in the
        order autograd reaches them, the last task's graph first (it runs the newest nodes
        first): so the gradients of all but the last two tasks are set aside and added after
        theirs, last to first."""
        if diagnose or not self.sums(tasks):
            return self.accumulate(task_losses, tasks, shared, heads, per_task=True)
        params = [*shared, *heads]
        set_aside = []
        for n, losses in enumerate(task_losses):
            sum(losses.values()).backward()
            if n < len(tasks) - 2:
                set_aside.append([p.grad for p in params])
                for p in params:
                    p.grad = None
        for grads in reversed(set_aside):
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        distributed.average_([p.grad for p in params if p.grad is not None])
        return None

    def accumulate(self, micro_losses: Iterable[dict[str, Tensor]], tasks: list[str], shared: list[nn.Parameter],
                   heads: list[nn.Parameter], per_task: bool) -> TaskGradients | None:
        """`collect` for a step in micro-batches (`trainer.accumulate`), each one's losses its
        share of the whole batch's: the task gradients of the whole batch, kept apart where the
        method combines them or a loss weighting scales them (`per_task`), else summed in
        `.grad`; averaged over the ranks once, after the last micro-batch."""
        if not per_task:
            for losses in micro_losses:
                sum(losses.values()).backward()
            distributed.average_([p.grad for p in [*shared, *heads] if p.grad is not None])
            return None
        grads = TaskGradients(tasks, shared, self.storage(len(tasks), shared))
        for losses in micro_losses:
            grads.add(losses)
        grads.average()
        distributed.average_([p.grad for p in heads if p.grad is not None])
        return grads

    def apply(self, grads: TaskGradients | None, diagnose: bool = False) -> dict | None:
        """Combine the collected task gradients into the shared parameters' `.grad`."""
        if grads is None:
            return None
        combined, projections = self.combine(grads)
        grads.write(combined)
        return grads.diagnostics(combined, projections) if diagnose else None

    def sums(self, losses: dict[str, Tensor]) -> bool:
        return False

    def storage(self, tasks: int, shared: list[nn.Parameter]) -> Tensor:
        """Room for the task gradients, kept from step to step: on a CPU, fresh memory of
        this size costs more in page faults than the backward's copies into it."""
        like = shared[0] if shared else torch.empty(0)
        size = tasks * sum(p.numel() for p in shared)
        kept = getattr(self, "_storage", None)
        if (kept is None or kept.numel() < size
                or (kept.dtype, kept.device) != (like.dtype, like.device)):
            self._storage = kept = torch.empty(size, dtype=like.dtype, device=like.device)
        return kept

    def state_dict(self) -> dict:
        """What a method keeps from step to step, for exact resumes: nothing, for most."""
        return {}

    def load_state_dict(self, state: dict):
        pass

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor | None]:
        """The shared parameters' gradient [P], and the number of projections (a 0-d
        tensor, or None): nothing here waits for the device."""
        raise NotImplementedError


class Sum(GradientMethod):
    every_task = False

    def sums(self, losses):
        return True

    def combine(self, grads):
        return grads.matrix.sum(0), None


class PCGrad(GradientMethod):
    """Gradient surgery (Yu et al. 2020, Algorithm 1).

    For each task i, the other tasks j are visited in random order; where the projected
    g_i conflicts with the original g_j (g_i . g_j < 0), g_i loses its component along
    g_j. A projected gradient is a linear combination of the task gradients, so it is
    tracked as coefficients and every dot product comes from the Gram matrix: the T x P
    task gradients are touched twice, for the Gram matrix and for the combination. The
    conflict test is a `torch.where` on the device, not a Python branch, so the step
    never waits for a GPU.
    """

    def __init__(self, reduction: str = "sum", seed: int = 0, tasks: list[str] = ()):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(seed)

    def sums(self, losses):
        return len(losses) == 1

    def state_dict(self):
        return {"generator": self.generator.get_state()}  # the task orders still to draw

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def coefficients(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Row i: projected g_i over the original task gradients; and the projections made."""
        tasks = gram.shape[0]
        coefficients = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
        projections = torch.zeros((), dtype=torch.long, device=gram.device)
        for i in range(tasks):
            for j in torch.randperm(tasks, generator=self.generator).tolist():
                if j == i:
                    continue
                dot = gram[j] @ coefficients[i]  # (projected g_i) . g_j
                conflict = dot < 0  # g_j = 0 gives dot = 0: no conflict, and where() drops 0/0
                coefficients[i, j] -= torch.where(conflict, dot / gram[j, j], 0)
                projections += conflict
        return coefficients, projections

    def combine(self, grads):
        coefficients, projections = self.coefficients(grads.gram)
        weights = coefficients.sum(0) / (len(grads.tasks) if self.reduction == "mean" else 1)
        return weights.to(grads.matrix) @ grads.matrix, projections


class Aggregated(GradientMethod):
    """A torchjd aggregator (`torchjd.aggregation`: UPGrad, MGDA, CAGrad, Nash-MTL, ...)
    applied to the matrix of task gradients, as in Jacobian descent. An aggregator given
    partial is built here, with `n_tasks` when it asks for it (Nash-MTL)."""

    def __init__(self, aggregator, seed: int = 0, tasks: list[str] = ()):
        if not isinstance(aggregator, nn.Module):
            takes_tasks = "n_tasks" in inspect.signature(aggregator).parameters
            aggregator = aggregator(n_tasks=len(tasks)) if takes_tasks else aggregator()
        self.aggregator = aggregator

    @property
    def name(self) -> str:
        return type(self.aggregator).__name__

    def combine(self, grads):
        return self.aggregator(grads.matrix), None

    def state_dict(self):
        return {"aggregator": torchjd_state(self.aggregator)}

    def load_state_dict(self, state):
        load_torchjd_state(self.aggregator, state["aggregator"])
