"""The paper's names and numbers, in one place: how its three metrics are labelled and its
Table 1, which the report prints beside ours. Tasks are data (`data.tasks`); only these
comparisons with the paper name SST, Quora and STS."""

from __future__ import annotations

PAPER_METRICS = ("sst_acc", "para_acc", "sts_pearson")  # the paper's three tasks' metrics, in Table 1's order
LABELS = {"sst_acc": "SST acc", "para_acc": "Quora acc", "sts_pearson": "STS r", "mean": "mean"}

# Table 1 of the paper: SST acc, Quora acc, STS Pearson, average of the three.
PAPER_KEYS = (*PAPER_METRICS, "mean")
PAPER = {
    "milestone_baseline": (0.316, 0.369, -0.009, 0.225),
    "random_sequential": (0.304, 0.670, 0.212, 0.395),
    "rr_under": (0.301, 0.632, 0.181, 0.371),
    "rr_over": (0.432, 0.691, 0.272, 0.465),
    "rro_hp_cs": (0.497, 0.864, 0.387, 0.582),
    "rro_hp_cs_gs": (0.497, 0.860, 0.378, 0.578),
}


def label(key: str) -> str:
    """A metric as tables and plots name it: the paper's label, or the key of an added task."""
    return LABELS.get(key, key)
