"""Task scheduling: which tasks' batches make up each optimizer step (paper section 3.2).

A sampler sees only the number of batches in one pass over each training task and
yields, step by step, the tasks whose next batch goes into that step. Every task's
stream is reshuffled at the start of each epoch, as `for batch in loader` would be.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class TaskSampler:
    """Base class. `tasks` restricts training to some tasks (None: all declared tasks)."""

    def __init__(self, tasks: Sequence[str] | None = None):
        self.tasks = list(tasks) if tasks is not None else None
        if self.tasks is not None and not self.tasks:
            raise ValueError("sampler.tasks must name at least one task (or be null for all)")

    def steps_per_epoch(self, sizes: dict[str, int]) -> int:
        raise NotImplementedError

    def epoch(self, sizes: dict[str, int]) -> Iterator[tuple[str, ...]]:
        """The tasks of each step in one epoch; `sizes` maps task -> batches per pass."""
        raise NotImplementedError


class RandomSequential(TaskSampler):
    """Algorithm 1: every batch of the first task, then of the second, ... one per step."""

    def steps_per_epoch(self, sizes):
        return sum(sizes.values())

    def epoch(self, sizes):
        for task, n in sizes.items():
            for _ in range(n):
                yield (task,)


class RoundRobinUnder(TaskSampler):
    """Algorithm 2: one batch of every task per step, until the shortest loader is spent.

    The pseudocode's `j <= len(shortest)` would over-run the shortest loader by one;
    we take the text's reading: stop when it is exhausted.
    """

    def steps_per_epoch(self, sizes):
        return min(sizes.values())

    def epoch(self, sizes):
        for _ in range(self.steps_per_epoch(sizes)):
            yield tuple(sizes)


class RoundRobinOver(TaskSampler):
    """Algorithm 3: one batch of every task per step for `sigma` steps; a task whose
    loader runs out is reshuffled and drawn again. `sigma=None` takes the longest loader's
    length, so that every example of the largest task is seen once per epoch."""

    def __init__(self, sigma: int | None = None, tasks: Sequence[str] | None = None):
        super().__init__(tasks)
        if sigma is not None and (not isinstance(sigma, int) or sigma <= 0):
            raise ValueError(f"sampler.sigma must be a positive integer or null, got {sigma!r}")
        self.sigma = sigma

    def steps_per_epoch(self, sizes):
        return self.sigma or max(sizes.values())

    def epoch(self, sizes):
        for _ in range(self.steps_per_epoch(sizes)):
            yield tuple(sizes)
