"""The report's honesty about how runs were made (issue 32): rows selected on dev marked,
provenance per row, rows mixing runs made differently refused unless --allow-mixed, claims
that lean against themselves saying so, and readings generated, never copied by hand."""

import csv
import json
import re
import shlex
from functools import partial
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from mtbert.claims import OPEN, judge, load_claims
from mtbert.report import MixedRunsError, label, main, report
from test_report import dev, fake_job, sweep_of

ROOT = Path(__file__).resolve().parents[1]
XEON = {"type": "cpu", "name": "Intel(R) Xeon(R) Platinum 8481C", "isa": "AVX512"}
H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


def made(precision="bf16", device=XEON, commit="0123456789abcdef", dirty=False, selected_on="validation"):
    """The results.json fields of a run from this version of mtbert."""
    return {"selected_on": selected_on, "precision": precision, "device": device["type"], "provenance": {
        "code": {"commit": commit, "dirty": dirty, "version": "0.1.0"},
        "versions": {"python": "3.11.9", "torch": "2.5.1", "transformers": "4.46.0", "torchjd": "0.4.0"},
        "device": device, "threads": 2, "precision": precision, "precision_reason": "auto"}}


def stamp(run, **fields):
    path = run / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def two_seeds(sweep, experiment, first: dict, second: dict):
    for seed, fields in enumerate((first, second)):
        run = sweep / f"{experiment}{seed}"
        fake_job(run, experiment, seed, dev=dev(0.4 + seed / 100, 0.7, 0.8))
        stamp(run, **fields)


def provenance_rows(table: str) -> dict[str, str]:
    section = table.split("## Provenance")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {line.split(" | ")[0][2:]: line for line in lines}


def test_a_row_mixing_precision_is_refused_naming_both_runs_unless_allowed(tmp_path, capsys):
    sweep = tmp_path / "s"
    two_seeds(sweep, "rr_over", made("bf16"), made("fp32"))
    two_seeds(sweep, "rr_under", made(), made())
    with pytest.raises(MixedRunsError) as refused:
        report([sweep], tmp_path / "out")
    message = str(refused.value)
    assert f"`rr_over` mixes precision: bf16 in {sweep / 'rr_over0'}; fp32 in {sweep / 'rr_over1'}" in message
    assert "rr_under" not in message and "--allow-mixed" in message
    assert not (tmp_path / "out").exists(), "nothing written for a refused report"
    with pytest.raises(SystemExit, match="error: rows whose runs were made differently"):
        main([str(sweep), "--out", str(tmp_path / "out")])

    main([str(sweep), "--out", str(tmp_path / "out"), "--allow-mixed"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.startswith("## Warning: rows mixing runs made differently")
    assert f"- `rr_over` mixes precision: bf16 in {sweep / 'rr_over0'}; fp32 in {sweep / 'rr_over1'}" in table
    assert "| rr_over | validation | bf16 / fp32 | Intel(R) Xeon(R) Platinum 8481C (AVX512) | 0123456789 |" in table
    assert "rr_over mixes runs made differently in precision (bf16, fp32)" in (tmp_path / "out" / "readings.md").read_text()
    assert "## Warning" in capsys.readouterr().out


@pytest.mark.parametrize("second, field", [
    (made(device=H100), "device"), (made(commit="fedcba9876543210"), "code"),
    (made(dirty=True), "code"), (made(selected_on="dev"), "selected on")])
def test_every_field_of_how_a_run_was_made_can_mix_a_row(tmp_path, second, field):
    two_seeds(tmp_path / "s", "rr_over", made(), second)
    with pytest.raises(MixedRunsError, match=f"`rr_over` mixes {field}: "):
        report([tmp_path / "s"], tmp_path / "out")


def test_dirty_runs_of_one_commit_do_not_mix_and_a_gpu_row_shows_its_capability(tmp_path):
    sweep = tmp_path / "s"
    two_seeds(sweep, "rr_over", made(dirty=True), made(dirty=True))
    two_seeds(sweep, "rr_under", made("fp32", H100), made("fp32", H100))
    table = report([sweep], tmp_path / "out")
    rows = provenance_rows(table)
    assert rows["rr_over"] == "| rr_over | validation | bf16 | Intel(R) Xeon(R) Platinum 8481C (AVX512) | 0123456789+dirty |"
    assert rows["rr_under"] == "| rr_under | validation | fp32 | NVIDIA H100 80GB HBM3 (capability 9.0) | 0123456789 |"
    assert "The rows differ in precision, device, code:" in table  # between rows: said, not refused
    line = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}["rr_under"]
    assert (line["selected_on"], line["precision"], line["code"]) == ("validation", "fp32", "0123456789")
    assert "selected on dev" not in table  # every run chose on held-out rows


def test_old_runs_without_provenance_show_unknown_and_count_as_selected_on_dev(tmp_path):
    sweep = tmp_path / "s"
    fake_job(sweep / "0", "rr_over", 0, dev=dev(0.4, 0.7, 0.8))
    fake_job(sweep / "1", "rr_over", 1, dev=dev(0.41, 0.7, 0.8))
    fake_job(sweep / "2", "rr_under", 0, dev=dev(0.3, 0.7, 0.8))
    stamp(sweep / "2", precision="fp32", device="cpu")  # a version that recorded only these
    table = report([sweep], tmp_path / "out")
    rows = provenance_rows(table)
    assert rows["rr_over"] == "| rr_over | dev | unknown | unknown | unknown |"
    assert rows["rr_under"] == "| rr_under | dev | fp32 | cpu (unknown model) | unknown |"
    over = next(line for line in table.splitlines() if line.startswith("| rr_over |"))
    assert over.endswith("| selected on dev (2 of 2 seeds) |")
    csv_row = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}["rr_over"]
    assert [csv_row[k] for k in ("selected_on", "precision", "device", "code")] == ["dev"] + ["unknown"] * 3
    readings = (tmp_path / "out" / "readings.md").read_text()
    assert ("Selected on dev, so dev both chose and scores their checkpoints: rr_under (1 of 1 seeds), "
            "rr_over (2 of 2 seeds).") in readings
    # an old run beside a new one of the same row is mixing: the old one's facts are unknown
    fake_job(sweep / "3", "rr_over", 2, dev=dev(0.42, 0.7, 0.8))
    stamp(sweep / "3", **made())
    with pytest.raises(MixedRunsError, match=r"`rr_over` mixes selected on: dev in .*; validation in "):
        report([sweep], tmp_path / "out")


def test_curves_show_the_split_that_chose_the_checkpoint(tmp_path, monkeypatch):
    """Eval events of a run selected on validation hold `validation`: the curves plot them
    and say so; a sweep of old runs plots dev and says that."""
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(
        (path.name, fig._suptitle.get_text() if fig._suptitle else "", [ax.get_ylabel() for ax in fig.axes],
         [len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()])))
    sweep = tmp_path / "s"
    fake_job(sweep / "0", "rr_over", 0, dev=dev(0.4, 0.7, 0.8))
    stamp(sweep / "0", **made())
    events = [{"step": s, "event": "eval", "examples_seen": {"sst": 100 * s}, "validation": dev(0.3, 0.6, 0.7)}
              for s in (1, 2, 3)]
    events.append({"step": 3, "event": "dev", "dev": dev(0.4, 0.7, 0.8), "dev_last": dev(0.4, 0.7, 0.8)})
    (sweep / "0" / "metrics.jsonl").write_text("\n".join(map(json.dumps, events)) + "\n")
    report([sweep], tmp_path / "out")
    name, title, ylabels, points = saved[-1]
    assert name == "curves.png" and "held-out validation rows" in title
    assert ylabels[0] == "SST acc on validation" and points == [3]
    report([sweep_of(tmp_path, {"rr_over": lambda s: dev(0.4, 0.7, 0.8)}, seeds=[0], name="old")], tmp_path / "o2")
    name, title, ylabels, points = saved[-1]
    assert "dev sets" in title and ylabels[0] == "SST acc on dev" and points == [2]


CLAIMS = """
- claim: over beats under
  checks: [{a: rr_over, b: rr_under, direction: greater}]
- claim: under changes nothing
  checks: [{a: rr_under, b: random_sequential, direction: equal, margin: 0.01}]
"""


def noisy_sweep(tmp_path, name="s"):
    """rr_over a little below rr_under (-0.004 in the mean, noise sd 0.01: not resolved),
    random_sequential 0.02 above rr_under."""
    noise = np.random.default_rng(3).normal(0, 0.01, 5)
    values = {"rr_under": lambda s: dev(0.40, 0.70, 0.80),
              "rr_over": lambda s: dev(0.40 - 0.012 + 3 * noise[s], 0.70, 0.80),
              "random_sequential": lambda s: dev(0.46 + 3 * noise[s], 0.70, 0.80)}
    return sweep_of(tmp_path, values, name=name)


def test_a_claim_whose_estimate_points_the_other_way_says_so(tmp_path):
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    text = report([noisy_sweep(tmp_path)], tmp_path / "out", claims_file=tmp_path / "claims.yaml",
                  reference="rr_under")
    means = {c["row"]: float(c["mean"]) for c in csv.DictReader(open(tmp_path / "out" / "comparisons.csv"))
             if c["metric"] == "mean"}
    assert means["rr_over"] < 0, "the estimate points against 'over beats under'"
    pointing = f"not resolved at this power; the estimate points the other way (Δ {means['rr_over']:+.4f})"
    assert f"- **over beats under**: {pointing}." in text
    outside = f"not resolved at this power; the estimate lies outside ±0.01 (Δ {-means['random_sequential']:+.4f})"
    assert f"- **under changes nothing**: {outside}." in text
    claims = load_claims(tmp_path / "claims.yaml")
    values = {"rr_over": {"mean": {0: 0.53, 1: 0.50, 2: 0.55}}, "rr_under": {"mean": {0: 0.50, 1: 0.50, 2: 0.50}}}
    claims[0].checks[0].by = 0.05  # a positive estimate short of the claimed gain
    check = judge(claims[:1], values)[0].checks[0]
    assert check.verdict == OPEN and check.against == "the estimate falls short of the claimed +0.05 (Δ +0.0267)"
    values["rr_over"]["mean"] = {0: 0.58, 1: 0.54, 2: 0.56}  # on the claim's side: nothing to add
    assert judge(claims[:1], values)[0].verdict_text == OPEN


def test_the_claims_section_names_its_family_and_the_comparisons_it_shares(tmp_path):
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    text = report([noisy_sweep(tmp_path)], tmp_path / "out", claims_file=tmp_path / "claims.yaml",
                  reference="rr_under")
    assert "Holm's correction across the 8 tests of this table (a family apart from the claims')" in text
    family = ("Holm's correction runs across the 2 checks tested here (rr_over > rr_under (mean); "
              "|rr_under - random_sequential| < 0.01 (mean)), a family of its own. The paired comparisons "
              "against rr_under are another family (8 tests), so the same comparison can appear in both "
              "sections with two different Holm-adjusted p-values, because the families differ: "
              "rr_over > rr_under (mean), Holm ")
    assert family in text
    assert "|rr_under - random_sequential| < 0.01 (mean), Holm " in text.split(family)[1].split("\n")[0]


def test_readings_regenerated_from_the_same_runs_equal_the_written_ones(tmp_path):
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    sweep = noisy_sweep(tmp_path)
    table = report([sweep], tmp_path / "a", claims_file=tmp_path / "claims.yaml", reference="rr_under")
    written = (tmp_path / "a" / "readings.md").read_text()
    report([sweep], tmp_path / "b", claims_file=tmp_path / "claims.yaml", reference="rr_under")
    assert (tmp_path / "b" / "readings.md").read_text() == written
    lines = [line for line in written.splitlines() if line.startswith("- ")]
    assert len(lines) == 1 + 8 + 2  # the dev-selection caveat, 2 rows x 4 metrics, 2 claims
    for c in csv.DictReader(open(tmp_path / "a" / "comparisons.csv")):
        shown = f"{float(c['mean']):+.4f} [{float(c['low']):+.4f}, {float(c['high']):+.4f}]"
        assert shown in table  # the numbers exactly as the table gives them
        verdict = "differs" if float(c["p_holm"]) < 0.05 else "no difference detected"
        assert (f"- {c['row']} − rr_under, {label(c['metric'])}: Δ {shown}, Holm p {float(c['p_holm']):.3g} (5 seeds): "
                f"{verdict}.") in lines
    assert any(line.startswith('- Claim "over beats under": not resolved at this power; the estimate points '
                               "the other way (Δ -") for line in lines)


COMMITTED = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments").rglob("readings.md"))


@pytest.mark.slow
@pytest.mark.parametrize("readings", COMMITTED, ids=str)
def test_committed_write_ups_are_what_their_command_regenerates(readings, tmp_path, monkeypatch):
    """Every committed readings.md names the command that wrote it; run again on the committed
    runs, it writes the same readings.md and table.md, every number included."""
    header = readings_header(ROOT / readings)
    assert header is not None, f"{readings} does not name the command that wrote it"
    argv = shlex.split(header)[3:]
    assert argv[argv.index("--out") + 1] == str(readings.parent)
    monkeypatch.chdir(ROOT)
    main([*argv, "--out", str(tmp_path)])
    without_out = partial(re.sub, r" --out [^\s`]+", "")  # where it was written is all that may differ
    for name in ("readings.md", "table.md"):
        committed, regenerated = (ROOT / readings.parent / name).read_text(), (tmp_path / name).read_text()
        assert without_out(regenerated) == without_out(committed), f"{readings.parent / name}"


def readings_header(path) -> str | None:
    match = re.search(r"^Generated by `(python -m mtbert\.report [^`]+)`", path.read_text(), re.M)
    return match and match.group(1)
