"""Claims as data, and their verdicts: holds, does not hold, or not resolved at this power.

A claims file (`mtbert/paper_claims.yaml` holds the paper's) is a YAML list; each claim is a
sentence and the checks that decide it, each check row `a` against row `b` (row names as
the report prints them) on a metric:

    - claim: RR-over beats random sequential
      metric: mean                       # default for its checks
      checks:
        - {a: rr_over, b: random_sequential, direction: greater}   # a - b > by (default 0)
        - {a: rro_hp_cs_gs, b: rro_hp_cs, direction: equal, margin: 0.01}   # |a - b| < margin

A check is a paired t-test over the seeds both rows completed: `greater` tests the mean
difference against `by`, `equal` against ±`margin` (two one-sided tests when the estimate
lies inside the margin, a one-sided test beyond it otherwise). p-values are Holm-corrected
across the checks of the file that the report can test (both rows present, 2 seeds or more
in common): a family that grows as the study's runs come in, and not the family of the
report's paired comparisons, so a comparison in both has a Holm p in each. A check supports
or contradicts its claim when its corrected p < 0.05; a claim holds when all its checks
support it, does not hold when one contradicts it, and is otherwise not resolved at this
power, saying so when an unresolved estimate leans against the claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtbert import stats
from mtbert.stats import Comparison

HOLDS, FAILS, OPEN, UNTESTED = "holds", "does not hold", "not resolved at this power", "not tested"
PAPER_CLAIMS = Path(__file__).with_name("paper_claims.yaml")


class ClaimsError(ValueError):
    pass


@dataclass
class Check:
    a: str
    b: str
    metric: str = "mean"
    direction: str = "greater"
    by: float = 0.0
    margin: float = 0.01
    comparison: Comparison | str | None = None  # the paired comparison, or why there is none
    p: float | None = None
    p_holm: float | None = None
    supports: bool | None = None  # the estimate's side: for the claim or against it
    missing: bool = False  # a row of the check is not in the report

    @property
    def sentence(self) -> str:
        if self.direction == "greater":
            return f"{self.a} > {self.b}" + (f" + {self.by:g}" if self.by else "") + f" ({self.metric})"
        return f"|{self.a} - {self.b}| < {self.margin:g} ({self.metric})"

    @property
    def verdict(self) -> str:
        if self.p_holm is None:
            return UNTESTED if self.missing else OPEN
        if self.p_holm >= stats.ALPHA:
            return OPEN
        return HOLDS if self.supports else FAILS

    @property
    def against(self) -> str | None:
        """How an unresolved estimate leans against the claim, so that "not resolved" is not
        read as "nearly holds"; None where it does not lean against it."""
        c = self.comparison
        if self.verdict != OPEN or self.supports is not False or not isinstance(c, Comparison):
            return None
        if self.direction == "equal":
            return f"the estimate lies outside ±{self.margin:g} (Δ {c.mean:+.4f})"
        if c.mean <= 0 <= self.by:
            return f"the estimate points the other way (Δ {c.mean:+.4f})"
        return f"the estimate falls short of the claimed {self.by:+g} (Δ {c.mean:+.4f})"

    @property
    def verdict_text(self) -> str:
        return self.verdict + (f"; {self.against}" if self.against else "")

    @property
    def numbers(self) -> str:
        """The figures behind the verdict, as the report prints them (a tested check only)."""
        c = self.comparison
        return (f"Δ {c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}] over seeds {c.seeds}, p {self.p:.3g}, "
                f"Holm {self.p_holm:.3g}")


@dataclass
class Claim:
    text: str
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = [c.verdict for c in self.checks]
        for verdict in (FAILS, UNTESTED, OPEN):
            if verdict in verdicts:
                return verdict
        return HOLDS

    @property
    def verdict_text(self) -> str:
        """The verdict, with the unresolved checks whose estimate leans against the claim."""
        leaning = [c for c in self.checks if c.against]
        if self.verdict != OPEN or not leaning:
            return self.verdict
        if len(self.checks) == 1:
            return self.checks[0].verdict_text
        return f"{OPEN}; " + "; ".join(f"{c.sentence}: {c.against}" for c in leaning)


CHECK_KEYS = {"a", "b", "metric", "direction", "by", "margin"}


def load_claims(path: Path) -> list[Claim]:
    """Read and validate a claims file; errors name the file, the claim and the key."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClaimsError(f"cannot read claims file {path}: {e}") from None
    if not isinstance(entries, list):
        raise ClaimsError(f"{path}: expected a list of claims, got {type(entries).__name__}")
    claims = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}, claim {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("claim"), str):
            raise ClaimsError(f"{where}: each claim needs a `claim:` sentence and `checks:`")
        unknown = set(entry) - {"claim", "metric", "checks"}
        if unknown:
            raise ClaimsError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: claim, metric, checks")
        checks = entry.get("checks")
        if not isinstance(checks, list) or not checks:
            raise ClaimsError(f"{where}: `checks` must be a non-empty list of {{a, b, direction}}")
        claim = Claim(entry["claim"])
        for j, spec in enumerate(checks, 1):
            unknown = set(spec) - CHECK_KEYS if isinstance(spec, dict) else None
            if unknown is None or unknown or not {"a", "b"} <= set(spec):
                raise ClaimsError(f"{where}, check {j}: expected keys a, b and optionally "
                                  f"{sorted(CHECK_KEYS - {'a', 'b'})}; got {spec!r}")
            check = Check(**{"metric": entry.get("metric", "mean"), **spec})
            if check.direction not in ("greater", "equal"):
                raise ClaimsError(f"{where}, check {j}: direction must be 'greater' or 'equal', "
                                  f"got {check.direction!r}")
            if not check.margin > 0:
                raise ClaimsError(f"{where}, check {j}: margin must be > 0, got {check.margin}")
            claim.checks.append(check)
        claims.append(claim)
    return claims


def judge(claims: list[Claim], values: dict[str, dict[str, dict[int, float]]]) -> list[Claim]:
    """Decide every check from `values` (row -> metric -> seed -> value), Holm across all."""
    checks = [c for claim in claims for c in claim.checks]
    for check in checks:
        missing = [r for r in (check.a, check.b) if r not in values]
        if missing:
            check.comparison, check.missing = f"row(s) {missing} not in the report", True
            continue
        check.comparison = stats.paired(values[check.a].get(check.metric, {}),
                                        values[check.b].get(check.metric, {}))
        if isinstance(check.comparison, Comparison):
            check.p, check.supports = _test(check, check.comparison.diffs)
    for check, p in zip(checks, stats.holm([c.p for c in checks])):
        check.p_holm = p
    return claims


def _test(check: Check, diffs: list[float]) -> tuple[float, bool]:
    """p of the check's test, and whether the estimate lies on the claim's side."""
    mean = sum(diffs) / len(diffs)
    if check.direction == "greater":
        return stats.ttest(diffs, check.by), mean > check.by
    if abs(mean) < check.margin:
        return stats.equivalence_p(diffs, check.margin), True
    if mean > 0:
        return stats.ttest(diffs, check.margin, "greater"), False
    return stats.ttest(diffs, -check.margin, "less"), False


def family(claims: list[Claim]) -> list[Check]:
    """The checks Holm's correction ran over: those with a test (both rows, 2 seeds in common)."""
    return [c for claim in claims for c in claim.checks if c.p is not None]


def markdown(claims: list[Claim]) -> str:
    lines = []
    for claim in claims:
        lines.append(f"- **{claim.text}**: {claim.verdict_text}.")
        for check in claim.checks:
            c = check.comparison
            if isinstance(c, str):
                lines.append(f"  - {check.sentence}: {c}.")
                continue
            lines.append(f"  - {check.sentence}: {check.numbers}"
                         + (f", detectable Δ {c.detectable:.4f}" if c.detectable else "")
                         + f": {check.verdict_text}.")
    return "\n".join(lines)
