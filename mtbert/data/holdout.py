"""The held-out selection split: rows of a task's training file that are never trained on
and that choose the run's checkpoint, so the dev sets are read only to report it.

A row's place is decided by a hash of its id, not by its position or the seed: the split
does not move with the seed, the sampler or `data.limit`, and a row added elsewhere in the
file moves at most the row at the edge of its class. Classification tasks keep each
class's share of the file (stratified); regression tasks are one group.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import replace

from mtbert.data import Split
from mtbert.errors import DataError


def held_out_size(setting, task: str, rows: int) -> int:
    """`data.validation`: a count of rows, a fraction of the file, or {task: either}."""
    if isinstance(setting, Mapping):
        setting = setting.get(task)
    if setting is None or setting == 0:
        return 0
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or setting < 0 or (
            isinstance(setting, float) and setting >= 1):
        raise ValueError(f"validation must be a count of rows (an integer), a fraction in (0, 1), "
                         f"{{task: either}} or null, got {setting!r} for task {task}")
    size = round(setting * rows) if isinstance(setting, float) else setting
    if not 0 < size <= rows // 2:
        raise ValueError(f"validation={setting!r} holds out {size} of the {rows} valid rows of {task}'s "
                         f"training file; hold out at least 1 and at most half (a smaller count or fraction)")
    return size


def _rank_key(row_id: str) -> bytes:
    return hashlib.sha256(row_id.encode()).digest()


def held_out_rows(split: Split, size: int) -> set[int]:
    """The indices of the `size` held-out rows: in each class, those whose ids hash lowest,
    as many as the class's share of `size` (largest remainders make the total exact)."""
    labels = split.labels if split.task.classes is not None else [0.0] * len(split)
    groups: dict[float, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    shares = {label: size * len(rows) / len(split) for label, rows in groups.items()}
    quota = {label: math.floor(share) for label, share in shares.items()}
    for label in sorted(shares, key=lambda k: (quota[k] - shares[k], k))[:size - sum(quota.values())]:
        quota[label] += 1
    chosen = set()
    for label, rows in groups.items():
        chosen.update(sorted(rows, key=lambda i: _rank_key(split.ids[i]))[:quota[label]])
    return chosen


def subset(split: Split, indices: list[int]) -> Split:
    texts = [[column[i] for i in indices] for column in split.texts]
    labels = [split.labels[i] for i in indices] if split.labels is not None else None
    return replace(split, ids=[split.ids[i] for i in indices], texts=texts, labels=labels,
                   counts={**split.counts, "kept": len(indices)})


def hold_out(split: Split, size: int, limit: int | None = None) -> tuple[Split, Split | None]:
    """(training rows, held-out rows) of a training file; `limit` keeps the first N training
    rows once the held-out ones are set aside, so the split is the same with or without it."""
    held = held_out_rows(split, size) if size else set()
    train = [i for i in range(len(split)) if i not in held]
    if limit is not None:
        train = train[:limit]
    if not train:
        raise DataError(f"{split.path}: no training rows are left after holding out {size} for validation")
    out = subset(split, train)
    out.counts["validation"] = len(held)
    return out, subset(split, sorted(held)) if held else None
