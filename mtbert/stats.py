"""Whether two rows of a table differ: intervals over seeds, paired tests, power, Δm.

Seeds are the unit of replication: a row's interval is Student's t over its seeds, and two
rows are compared on the seeds they share (the same seed gives both the same initial
weights and data order), by a paired t-test with Holm's correction across a table's
comparisons. With few seeds the exact sign-flip permutation test cannot reach p < 0.05
(its smallest p is 2 / 2^n: 0.25 for 3 seeds), so it is reported beside the t-test, not
instead of it. Two single runs are compared by a paired bootstrap over the dev examples
instead, which shows how much of a gap the dev set's size alone explains. All
distributions come from scipy.stats.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8


def interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean over seeds; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(1 - ALPHA)
    return float(ci.low), float(ci.high)


def detectable(sd: float, n: int) -> float | None:
    """The smallest true mean difference a two-sided paired t-test on `n` pairs with
    this spread of differences finds with probability POWER at level ALPHA."""
    if n < 2 or not sd > 0:
        return None
    df, crit = n - 1, stats.t.ppf(1 - ALPHA / 2, n - 1)

    def power(nc):  # the far tail is negligible, and scipy gives NaN there for large nc
        return stats.nct.sf(crit, df, nc) + np.nan_to_num(stats.nct.cdf(-crit, df, nc)) - POWER

    return float(optimize.brentq(power, 0.0, 100.0)) * sd / math.sqrt(n)


@dataclass
class Comparison:
    """Row a minus row b on one metric, paired by seed (or by dev example, `method`)."""

    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float | None
    high: float | None
    p: float | None
    p_signflip: float | None = None
    detectable: float | None = None
    method: str = "paired t over seeds"
    p_holm: float | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


def ttest(diffs: list[float], popmean: float = 0.0, alternative: str = "two-sided") -> float:
    """p of a one-sample t-test of the differences against `popmean`. Differences with no
    spread make t infinite: p is then 0, or 1 where they equal `popmean` or lie on the
    side the alternative excludes."""
    d = np.asarray(diffs, dtype=float)
    if np.ptp(d) > 0:
        return float(stats.ttest_1samp(d, popmean, alternative=alternative).pvalue)
    side = np.sign(d[0] - popmean)
    return 0.0 if side and alternative in ("two-sided", {1: "greater", -1: "less"}[side]) else 1.0


def paired(a: dict[int, float], b: dict[int, float]) -> Comparison | str:
    """Compare two rows' per-seed values on the seeds they share; a reason (str) when
    fewer than 2 seeds pair up."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return (f"{len(seeds)} seed(s) in common (seeds {sorted(a)} against {sorted(b)}): "
                "at least 2 are needed to compare over seeds")
    d = np.array([a[s] - b[s] for s in seeds])
    low, high = interval(d.tolist())
    flip = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis),
                                  permutation_type="samples", n_resamples=np.inf)
    return Comparison(seeds, d.tolist(), float(d.mean()), low, high, ttest(d),
                      float(flip.pvalue), detectable(float(d.std(ddof=1)), len(d)))


def equivalence_p(diffs: list[float], margin: float) -> float:
    """Two one-sided t-tests (TOST): p for 'the true difference lies within ±margin'."""
    return max(ttest(diffs, -margin, "greater"), ttest(diffs, margin, "less"))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error); None entries are left out."""
    known = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def bootstrap_examples(gold: dict[str, np.ndarray], a: dict[str, np.ndarray],
                       b: dict[str, np.ndarray], metric: dict[str, str],
                       resamples: int = 1000, seed: int = 0) -> dict[str, Comparison]:
    """Paired bootstrap over dev examples: each task's examples are resampled, and both
    runs are scored on the same resample (accuracy or Pearson r); `mean` averages the
    tasks' differences resample by resample (the tasks are resampled independently)."""
    out, distributions = {}, []
    for task, y in gold.items():
        score = _accuracy if metric[task] == "acc" else _pearson

        def diff(pa, pb, yy, axis=-1):
            return score(pa, yy, axis) - score(pb, yy, axis)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of constant values
            res = stats.bootstrap((a[task], b[task], y), diff, paired=True, vectorized=True,
                                  n_resamples=resamples, batch=50, method="percentile",
                                  confidence_level=1 - ALPHA, random_state=seed)
        dist = res.bootstrap_distribution
        distributions.append(dist)
        out[f"{task}_{metric[task]}"] = _from_distribution(float(diff(a[task], b[task], y)), dist)
    if len(distributions) > 1:
        total = np.mean(distributions, axis=0)
        out["mean"] = _from_distribution(float(np.mean([c.mean for c in out.values()])), total)
    return out


def _from_distribution(observed: float, dist: np.ndarray) -> Comparison:
    dist = dist[np.isfinite(dist)]
    low, high = np.quantile(dist, [ALPHA / 2, 1 - ALPHA / 2])
    p = min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean()))  # two-sided, percentile
    return Comparison([], [], observed, float(low), float(high), float(p),
                      method="paired bootstrap over dev examples (1 seed)")


def _accuracy(pred, gold, axis=-1):
    return np.mean(pred == gold, axis=axis)


def _pearson(pred, gold, axis=-1):
    return stats.pearsonr(pred, gold, axis=axis).statistic


def delta_m(row: dict[str, float], baselines: dict[str, float]) -> float | None:
    """Δm (Maninis et al. 2019; LibMTL): the mean relative change, in percent, of each
    task's metric over its single-task baseline (every metric here is higher-better)."""
    keys = [k for k in baselines if row.get(k) is not None and baselines[k]]
    if not keys:
        return None
    return 100 * float(np.mean([(row[k] - baselines[k]) / abs(baselines[k]) for k in keys]))
