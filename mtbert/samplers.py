"""Task scheduling: which tasks' batches make up each optimizer step (paper section 3.2).

A sampler sees only the number of batches in one pass over each training task and
yields, step by step, the tasks whose next batch goes into that step. Every task's
stream is reshuffled at the start of each epoch, as `for batch in loader` would be.
Algorithms 1-3 are the paper's; the samplers that draw one task per step at random
(`Drawn` and its subclasses) are the study extended.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch


class TaskSampler:
    """Base class. `tasks` restricts training to some tasks (None: all declared tasks).
    `every_task`: each step holds a batch of every training task."""

    every_task = False

    def __init__(self, tasks: Sequence[str] | None = None):
        self.tasks = list(tasks) if tasks is not None else None
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks must name at least one task (or be null for all)")

    def check(self, tasks: list[str]):
        """Raise ValueError if this sampler cannot schedule these training tasks."""

    def steps_per_epoch(self, sizes: dict[str, int]) -> int:
        raise NotImplementedError

    def epoch(self, sizes: dict[str, int], generator: torch.Generator | None = None,
              step: int = 0, total_steps: int = 1) -> Iterator[tuple[str, ...]]:
        """The tasks of each step in one epoch; `sizes` maps task -> batches per pass.

        `generator` (seeded by the run), the run's current `step` and `total_steps` serve
        samplers that draw at random or change over training.
        """
        raise NotImplementedError

    def observe(self, scores: dict[str, float | None]):
        """Dev scores per training task after each evaluation (for adaptive samplers)."""

    def state_dict(self) -> dict:
        """What the sampler learnt during training (for resuming)."""
        return {}

    def load_state_dict(self, state: dict):
        pass


class RandomSequential(TaskSampler):
    """Algorithm 1: every batch of the first task, then of the second, ... one per step."""

    def steps_per_epoch(self, sizes):
        return sum(sizes.values())

    def epoch(self, sizes, generator=None, step=0, total_steps=1):
        for task, n in sizes.items():
            for _ in range(n):
                yield (task,)


class RoundRobin(TaskSampler):
    """Rounds of one batch of every task. A round is one step on the tasks' summed loss
    (the paper's eq. 1), or with `per_task` one step per task in turn (as MT-DNN trains):
    the same examples, three times the updates."""

    def __init__(self, per_task: bool = False, tasks: Sequence[str] | None = None):
        super().__init__(tasks)
        self.per_task = per_task

    @property
    def every_task(self) -> bool:
        return not self.per_task

    def rounds(self, sizes: dict[str, int]) -> int:
        raise NotImplementedError

    def steps_per_epoch(self, sizes):
        return self.rounds(sizes) * (len(sizes) if self.per_task else 1)

    def epoch(self, sizes, generator=None, step=0, total_steps=1):
        for _ in range(self.rounds(sizes)):
            if self.per_task:
                yield from ((task,) for task in sizes)
            else:
                yield tuple(sizes)


class RoundRobinUnder(RoundRobin):
    """Algorithm 2: rounds until the shortest loader is spent.

    The pseudocode's `j <= len(shortest)` would over-run the shortest loader by one;
    we take the text's reading: stop when it is exhausted.
    """

    def rounds(self, sizes):
        return min(sizes.values())


class RoundRobinOver(RoundRobin):
    """Algorithm 3: `sigma` rounds per epoch; a task whose loader runs out is reshuffled
    and drawn again. `sigma=None` takes the longest loader's length, so that every
    example of the largest task is seen once per epoch."""

    def __init__(self, sigma: int | None = None, per_task: bool = False, tasks: Sequence[str] | None = None):
        super().__init__(per_task, tasks)
        if sigma is not None and (not isinstance(sigma, int) or sigma <= 0):
            raise ValueError(f"sigma must be a positive integer or null, got {sigma!r}")
        self.sigma = sigma

    def rounds(self, sizes):
        return self.sigma or max(sizes.values())


class Drawn(TaskSampler):
    """One task per step, drawn with probability proportional to `weights`.

    An epoch is `steps` steps (null: as many as there are batches in one pass over all
    tasks, the length of Algorithm 1's epoch), so an epoch sees the same number of
    batches under every drawn sampler.
    """

    def __init__(self, steps: int | None = None, tasks: Sequence[str] | None = None):
        super().__init__(tasks)
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"steps must be a positive integer or null, got {steps!r}")
        self.steps = steps

    def weights(self, sizes: dict[str, int], progress: float) -> dict[str, float]:
        raise NotImplementedError

    def probabilities(self, sizes: dict[str, int], progress: float = 0.0) -> dict[str, float]:
        w = self.weights(sizes, progress)
        total = sum(w.values())
        return {t: v / total for t, v in w.items()}

    def steps_per_epoch(self, sizes):
        return self.steps or sum(sizes.values())

    def epoch(self, sizes, generator=None, step=0, total_steps=1):
        names = list(sizes)
        for i in range(self.steps_per_epoch(sizes)):
            p = self.probabilities(sizes, min(1.0, (step + i) / total_steps))
            draw = torch.multinomial(torch.tensor([p[t] for t in names]), 1, generator=generator)
            yield (names[int(draw)],)


class Proportional(Drawn):
    """p_t proportional to the task's dataset size: every example equally likely."""

    def weights(self, sizes, progress):
        return {t: float(n) for t, n in sizes.items()}


class Temperature(Drawn):
    """p_t proportional to N_t^(1/T): T=1 is proportional, large T approaches uniform."""

    def __init__(self, temperature: float = 2.0, steps: int | None = None,
                 tasks: Sequence[str] | None = None):
        super().__init__(steps, tasks)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def weights(self, sizes, progress):
        return {t: n ** (1 / self.temperature) for t, n in sizes.items()}


class Annealed(Drawn):
    """Stickland & Murray (2019): p_t proportional to N_t^alpha, alpha annealed from 1 to
    `final_alpha` over training, always from the raw sizes."""

    def __init__(self, final_alpha: float = 0.2, steps: int | None = None,
                 tasks: Sequence[str] | None = None):
        super().__init__(steps, tasks)
        if not 0 <= final_alpha <= 1:
            raise ValueError(f"final_alpha must lie in [0, 1], got {final_alpha}")
        self.final_alpha = final_alpha

    def weights(self, sizes, progress):
        alpha = 1 - (1 - self.final_alpha) * progress
        return {t: n ** alpha for t, n in sizes.items()}


class Adaptive(Drawn):
    """Jean et al. (2019): sample more from the tasks furthest below their target score.

    p_t is proportional to (target_t / score_t)^power, the ratio clipped to
    [1, `max_ratio`]; re-estimated at each evaluation, uniform before the first.
    """

    def __init__(self, targets: dict[str, float], power: float = 1.0, max_ratio: float = 10.0,
                 steps: int | None = None, tasks: Sequence[str] | None = None):
        super().__init__(steps, tasks)
        bad = {t: v for t, v in targets.items() if not v > 0}
        if bad:
            raise ValueError(f"targets must be > 0, got {bad}")
        self.targets, self.power, self.max_ratio = dict(targets), power, max_ratio
        self.scores: dict[str, float | None] = {}

    def check(self, tasks):
        missing = sorted(set(tasks) - set(self.targets))
        if missing:
            raise ValueError(f"targets has no target for task(s) {missing}; add one "
                             f"per trained task, e.g. '+sampler.targets.{missing[0]}=0.8'")

    def observe(self, scores):
        self.scores = dict(scores)

    def state_dict(self):
        return {"scores": dict(self.scores)}

    def load_state_dict(self, state):
        self.scores = dict(state["scores"])

    def weights(self, sizes, progress):
        weights = {}
        for t in sizes:
            score = self.scores.get(t)
            if score is None or math.isnan(score):
                weights[t] = 1.0
                continue
            ratio = self.targets[t] / max(score, self.targets[t] / self.max_ratio)
            weights[t] = max(ratio, 1.0) ** self.power
        return weights
