"""The report on synthetic sweeps with known answers (rows that differ by a known amount,
identical rows, unpaired and failed seeds, single-task baselines, claims) and on a real
tiny one."""

import csv
import json
import statistics

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from conftest import run_train
from mtbert import stats
from mtbert.claims import FAILS, HOLDS, OPEN, ClaimsError, judge, load_claims
from mtbert.report import PAPER, report


def fake_job(path, experiment, seed, status="completed", dev=None, overrides=(), tasks=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "sampler": {"tasks": tasks}}))
    task_overrides = [f"experiment={experiment}", f"seed={seed}", *overrides]
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {
        "runtime": {"choices": {"experiment": experiment}},
        "overrides": {"task": task_overrides}}}))
    if status is None:
        return  # a job that never wrote results.json
    results = {"status": status, "experiment": experiment, "seed": seed, "dev": dev,
               "best_epoch": 1, "steps": 100, "examples_seen": {"sst": 3200, "para": 3200},
               "train_seconds": 120.0, "error": "RuntimeError: boom\nsecond line" if status == "failed" else None}
    (path / "results.json").write_text(json.dumps(results))
    events = [{"step": 50, "event": "eval", "examples_seen": {"sst": 1600}, "dev": dev},
              {"step": 100, "event": "eval", "examples_seen": {"sst": 3200}, "dev": dev}]
    (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, events)) + "\n")


def dev(sst, para, sts):
    return {"sst_acc": sst, "para_acc": para, "sts_pearson": sts, "mean": (sst + para + sts) / 3,
            "overall": 0.0}


def test_report_on_synthetic_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", "rr_over", 0, dev=dev(0.40, 0.70, 0.80))
    fake_job(sweep / "1", "rr_over", 1, dev=dev(0.44, 0.74, 0.86))
    results = json.loads((sweep / "1" / "results.json").read_text())
    (sweep / "1" / "results.json").write_text(json.dumps({**results, "skipped_steps": 3}))
    fake_job(sweep / "2", "rr_over", 2, status="failed")
    fake_job(sweep / "3", "rr_under", 0, dev=dev(0.30, 0.60, 0.50))
    fake_job(sweep / "4", "rr_under", 2, status=None)  # seed 1 never ran, seed 2 has no results
    table = report([sweep], tmp_path / "out")
    lines = table.splitlines()
    assert lines[4].startswith("| rr_under |") and lines[5].startswith("| rr_over |"), "Table 1 order"
    over, under = lines[5], lines[4]
    sst = [0.40, 0.44]
    low, high = scipy_stats.t.interval(0.95, 1, statistics.fmean(sst), scipy_stats.sem(sst))
    assert f"{statistics.fmean(sst):.3f} [{low:.3f}, {high:.3f}] ({PAPER['rr_over'][0]:.3f})" in over
    assert "| 2/3 |" in over and "seed 2 failed: RuntimeError: boom second line" in over
    assert "seed 1 skipped 3 of 100 steps (non-finite loss)" in over
    assert "| 1/2 |" in under and "seed 2 missing" in under and "seed 1 missing" in under
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    assert float(rows["rr_over"]["para_acc"]) == pytest.approx(0.72)
    assert float(rows["rr_over"]["mean_paper"]) == PAPER["rr_over"][3]
    assert json.loads(rows["rr_over"]["examples_seen"]) == {"para": 3200, "sst": 3200}
    assert json.loads(rows["rr_over"]["sst_acc_seeds"]) == {"0": 0.40, "1": 0.44}
    assert (rows["rr_over"]["sst_acc_min"], rows["rr_over"]["sst_acc_max"]) == ("0.4", "0.44")
    for png in ("bars.png", "seeds.png", "curves.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_rows_named_by_what_tells_them_apart(tmp_path):
    fake_job(tmp_path / "s" / "0", None, 0, dev=dev(0.4, 0.7, 0.8), overrides=["sampler=annealed", "budget=cpu"])
    fake_job(tmp_path / "s" / "1", None, 0, dev=dev(0.4, 0.7, 0.8), overrides=["sampler=adaptive", "budget=cpu"])
    table = report([tmp_path / "s"])
    assert "| sampler=adaptive |" in table and "| sampler=annealed |" in table
    assert (tmp_path / "s" / "table.md").is_file()


def test_tuned_values_name_a_row_in_three_digits_unless_that_merges_rows(tmp_path):
    tuned = ["optim.lr.encoder=6.370159637769102e-05", "optim.lr.shared=0.0009079068091925258"]
    fake_job(tmp_path / "s" / "0", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.8), overrides=tuned)
    fake_job(tmp_path / "s" / "1", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.8))
    assert "| rro_hp_cs optim.lr.encoder=6.37e-05 optim.lr.shared=0.000908 |" in report([tmp_path / "s"])
    close = ["optim.lr.encoder=6.370159637769102e-05", "optim.lr.shared=0.0009079068091925259"]
    fake_job(tmp_path / "t" / "0", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.8), overrides=tuned)
    fake_job(tmp_path / "t" / "1", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.8), overrides=close)
    table = report([tmp_path / "t"])
    assert "| rro_hp_cs optim.lr.shared=0.0009079068091925258 |" in table
    assert "| rro_hp_cs optim.lr.shared=0.0009079068091925259 |" in table


def test_an_ablation_of_a_paper_row_gets_no_paper_numbers(tmp_path):
    fake_job(tmp_path / "s" / "0", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.8))
    fake_job(tmp_path / "s" / "1", "rro_hp_cs", 0, dev=dev(0.4, 0.7, 0.7), overrides=["loss=baseline"])
    report([tmp_path / "s"])
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "s" / "table.csv"))}
    assert float(rows["rro_hp_cs"]["sts_pearson_paper"]) == PAPER["rro_hp_cs"][2]
    assert rows["rro_hp_cs loss=baseline"]["sts_pearson_paper"] == ""


def test_a_table_without_paper_rows_has_no_paper_column(tmp_path):
    fake_job(tmp_path / "s" / "0", None, 0, dev=dev(0.4, 0.7, 0.8), overrides=["sampler=temperature"])
    fake_job(tmp_path / "s" / "1", None, 0, dev=dev(0.5, 0.7, 0.8), overrides=["sampler=annealed"])
    intro, _, header, _, row = report([tmp_path / "s"]).splitlines()[:5]
    assert intro.endswith("(with 2 seeds or more).")
    assert header.startswith("| row | SST acc | Quora acc | STS r | mean | seeds |")
    assert row.startswith("| sampler=annealed | 0.500 | 0.700 | 0.800 | 0.667 | 1/1 |")


def test_an_added_task_gets_its_own_column(tmp_path):
    fake_job(tmp_path / "s" / "0", "rr_over", 0, dev={**dev(0.4, 0.7, 0.8), "nli_mnli_acc": 0.61})
    header, _, row = report([tmp_path / "s"]).splitlines()[2:5]
    assert header.startswith("| row | SST acc (paper) | Quora acc (paper) | STS r (paper) | nli_mnli_acc (paper) |")
    assert "| 0.610 (-) | 0.633 (0.465) |" in row
    assert next(csv.DictReader(open(tmp_path / "s" / "table.csv")))["nli_mnli_acc"] == "0.61"


def test_report_of_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no jobs"):
        report([tmp_path])


def test_tiny_multirun_with_a_single_task_baseline_end_to_end(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_train("-m", "experiment=rr_under,rr_over,single_sst", "model=tiny", "budget=smoke", "logger=none",
              "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path, data=data_dir)
    table = report([sweep])
    results = [json.loads((sweep / n / "results.json").read_text()) for n in ("0", "1", "2")]
    assert [r["experiment"] for r in results] == ["rr_under", "rr_over", "single_sst"]
    assert set(results[2]["examples_seen"]) == {"sst"}
    assert results[2]["dev"] == {"sst_acc": results[2]["dev"]["sst_acc"], "mean": None, "overall": None}
    for r in results:
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['experiment']} |"))
        assert f"{r['dev']['sst_acc']:.3f} (" in row and "| 1/1 |" in row
    baseline = results[2]["dev"]["sst_acc"]
    over = (results[1]["dev"]["sst_acc"] - baseline) / baseline * 100
    assert f"| rr_over | {over:+.2f} | {over:+.2f} | 0 | {over:+.2f} |" in table  # over the one task with a baseline


def sweep_of(tmp_path, rows: dict, seeds=range(5), name="sweep"):
    """One job per row and seed; `rows` maps an experiment to a function seed -> dev."""
    n = 0
    for experiment, dev_of in rows.items():
        for seed in seeds:
            fake_job(tmp_path / name / str(n), experiment, seed, dev=dev_of(seed))
            n += 1
    return tmp_path / name


def comparisons(out):
    return {(r["row"], r["metric"]): r for r in csv.DictReader(open(out / "comparisons.csv"))}


def test_rows_that_differ_by_a_known_amount(tmp_path):
    """rr_over = rr_under + 0.05 + noise(sd 0.005) per seed, seed effects shared: the paired
    test finds it, its interval holds 0.05, and the figures match scipy's ttest_rel."""
    rng = np.random.default_rng(0)
    seed_effect, noise = rng.normal(0, 0.03, 5), rng.normal(0, 0.005, 5)
    under = {s: dev(0.3 + seed_effect[s], 0.6, 0.5) for s in range(5)}
    over = {s: dev(0.35 + seed_effect[s] + noise[s], 0.6, 0.5) for s in range(5)}
    text = report([sweep_of(tmp_path, {"rr_under": under.get, "rr_over": over.get})], tmp_path / "out")
    c = comparisons(tmp_path / "out")[("rr_over", "sst_acc")]
    a, b = [over[s]["sst_acc"] for s in range(5)], [under[s]["sst_acc"] for s in range(5)]
    expected = scipy_stats.ttest_rel(a, b)
    ci = expected.confidence_interval()
    assert float(c["p"]) == pytest.approx(expected.pvalue) and float(c["p"]) < 0.001
    assert float(c["low"]) == pytest.approx(ci.low) and float(c["high"]) == pytest.approx(ci.high)
    assert float(c["low"]) < 0.05 < float(c["high"])
    assert float(c["p_signflip"]) == pytest.approx(2 / 2 ** 5)  # every seed agrees: the exact floor
    assert json.loads(c["seeds"]) == [0, 1, 2, 3, 4]
    # the unpaired test would miss it: the seed effect (sd 0.03) dwarfs the gap's noise
    assert scipy_stats.ttest_ind(a, b).pvalue > expected.pvalue * 10
    assert "| rr_over | SST acc | 0,1,2,3,4 | +0.05" in text and "| differs |" in text
    # identical metrics: no difference, p 1
    para = comparisons(tmp_path / "out")[("rr_over", "para_acc")]
    assert float(para["mean"]) == 0 and float(para["p"]) == 1.0
    assert "| rr_over | Quora acc | 0,1,2,3,4 | +0.0000 [+0.0000, +0.0000] | 1 |" in text


def test_unpaired_and_failed_seeds_are_named_not_guessed(tmp_path):
    sweep = tmp_path / "s"
    fake_job(sweep / "0", "rr_under", 0, dev=dev(0.3, 0.6, 0.5))
    fake_job(sweep / "1", "rr_under", 1, dev=dev(0.31, 0.6, 0.5))
    fake_job(sweep / "2", "rr_over", 2, dev=dev(0.4, 0.7, 0.8))
    fake_job(sweep / "3", "rr_over", 3, dev=dev(0.41, 0.7, 0.8))
    fake_job(sweep / "4", "rro_hp_cs", 0, dev=dev(0.5, 0.7, 0.8))
    fake_job(sweep / "5", "rro_hp_cs", 1, status="failed")
    text = report([sweep], tmp_path / "out")
    assert "0 seed(s) in common (seeds [2, 3] against [0, 1])" in text
    assert "1 seed(s) in common (seeds [0] against [0, 1])" in text  # the failed seed is not paired
    assert "seed 1 failed" in text


def test_holm_on_known_pvalues():
    assert stats.holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]  # 2 x 0.5, capped at 1; never below an earlier one
    assert stats.holm([0.04, 0.02]) == [0.04, 0.04]  # 2 x 0.02, then max(0.04, 1 x 0.04)


def test_detectable_difference_has_the_stated_power():
    """At the reported detectable Δ a simulated paired t-test on n seeds rejects 80% of the time."""
    n, sd = 5, 0.01
    delta = stats.detectable(sd, n)
    rng = np.random.default_rng(1)
    diffs = rng.normal(delta, sd, size=(20000, n))
    power = (scipy_stats.ttest_1samp(diffs, 0, axis=1).pvalue < 0.05).mean()
    assert power == pytest.approx(0.8, abs=0.015)
    assert stats.detectable(sd, 3) > delta > stats.detectable(sd, 10)
    assert stats.detectable(0.0, 3) is None and stats.detectable(sd, 1) is None


def write_predictions(run, task, values):
    (run / "predictions").mkdir(exist_ok=True)
    with open(run / "predictions" / f"{task}-dev-output.csv", "w") as f:
        f.write("id \t Predicted \n" + "".join(f"{i} , {v} \n" for i, v in values.items()))


def test_two_single_runs_get_a_paired_bootstrap_over_dev_examples(tmp_path, data_dir):
    from mtbert.data import RejectedRows, read_split
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from mtbert.config import declared_tasks

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        tasks = declared_tasks(compose("train", overrides=["model=tiny"]))
    sweep = tmp_path / "s"
    fake_job(sweep / "0", "rr_under", 0, dev=dev(0.3, 0.6, 0.5))
    fake_job(sweep / "1", "rr_over", 0, dev=dev(0.4, 0.7, 0.8))
    gold = {}
    for name, task in tasks.items():
        rows = read_split(task, data_dir / task.files["dev"], RejectedRows(), labelled=True)
        gold[name] = dict(zip(rows.ids, rows.labels))
    config = {"seed": 0, "sampler": {"tasks": None}, "data": {"root": str(data_dir), "tasks": {
        n: {"files": dict(t.files), "sentences": t.sentences, "label": t.label, "id": t.id,
            "classes": t.classes, "score_range": list(t.score_range) if t.score_range else None}
        for n, t in tasks.items()}}}
    for run in ("0", "1"):
        (sweep / run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    # run 1 is right on every SST example, run 0 on about a fifth; both identical on Quora
    write_predictions(sweep / "1", "sst", gold["sst"])
    write_predictions(sweep / "0", "sst", {i: (y + 1) % 5 if rng.random() < 0.8 else y for i, y in gold["sst"].items()})
    for run in ("0", "1"):
        write_predictions(sweep / run, "para", gold["para"])
    write_predictions(sweep / "1", "sts", {i: y + rng.normal(0, 0.3) for i, y in gold["sts"].items()})
    write_predictions(sweep / "0", "sts", {i: rng.uniform(0, 5) for i in gold["sts"]})
    text = report([sweep], tmp_path / "out")
    c = comparisons(tmp_path / "out")
    sst, para, sts = c[("rr_over", "sst_acc")], c[("rr_over", "para_acc")], c[("rr_over", "sts_pearson")]
    assert sst["method"] == "paired bootstrap over dev examples (1 seed)"
    assert 0.5 < float(sst["mean"]) < 1 and float(sst["low"]) > 0 and float(sst["p"]) < 0.01
    assert float(para["mean"]) == 0 and float(para["low"]) == 0 == float(para["high"])
    assert float(sts["low"]) > 0 and float(c[("rr_over", "mean")]["low"]) > 0
    assert "bootstrap over dev examples: seed noise not included" in text


def test_delta_m_by_hand_on_two_tasks(tmp_path):
    sweep = tmp_path / "s"
    two = {"sst_acc": 0.5, "sts_pearson": 0.8, "mean": None}
    fake_job(sweep / "0", "rr_over", 0, dev=two)
    fake_job(sweep / "1", "single_sst", 0, dev={"sst_acc": 0.4, "sts_pearson": 0.1, "mean": None}, tasks=["sst"])
    fake_job(sweep / "2", "single_sts", 0, dev={"sst_acc": 0.2, "sts_pearson": 1.0, "mean": None}, tasks=["sts"])
    text = report([sweep], tmp_path / "out")
    expected = 100 * ((0.5 - 0.4) / 0.4 + (0.8 - 1.0) / 1.0) / 2  # +25% and -20%: +2.5%
    assert f"| rr_over | {expected:+.2f} | {expected:+.2f} | 0 | +25.00 | -20.00 |" in text
    assert "single-task baseline: trains sst only" in text
    assert stats.delta_m({"a": 0.5, "b": 0.8}, {"a": 0.4, "b": 1.0}) == pytest.approx(expected)


def test_delta_m_by_seed_pairs_each_seed_with_the_baselines_same_seed(tmp_path):
    """Seed by seed, on the seeds every baseline has (single_sst lacks seed 2): a different
    number from the Δm of the seed means, with a t-interval over the seeds."""
    sweep = tmp_path / "s"
    multi = {0: (0.50, 0.80), 1: (0.44, 0.86), 2: (0.47, 0.83)}
    sst, sts = {0: 0.40, 1: 0.40}, {0: 1.0, 1: 0.9, 2: 0.8}
    for seed, (a, b) in multi.items():
        fake_job(sweep / f"m{seed}", "rr_over", seed, dev={"sst_acc": a, "sts_pearson": b, "mean": None})
        fake_job(sweep / f"b{seed}", "single_sts", seed, dev={"sst_acc": 0.2, "sts_pearson": sts[seed], "mean": None},
                 tasks=["sts"])
        if seed in sst:
            fake_job(sweep / f"a{seed}", "single_sst", seed, dev={"sst_acc": sst[seed], "sts_pearson": 0.1, "mean": None},
                     tasks=["sst"])
    text = report([sweep], tmp_path / "out")
    by_seed = [100 * ((multi[s][0] - sst[s]) / sst[s] + (multi[s][1] - sts[s]) / sts[s]) / 2 for s in (0, 1)]
    ci = scipy_stats.ttest_1samp(by_seed, 0).confidence_interval(0.95)
    of_means = 100 * ((0.47 - 0.40) / 0.40 + (0.83 - 0.9) / 0.9) / 2
    assert f"| rr_over | {of_means:+.2f} | {np.mean(by_seed):+.2f} [{ci.low:+.2f}, {ci.high:+.2f}] | 0, 1 |" in text


CLAIMS = """
- claim: over beats under
  checks: [{a: rr_over, b: rr_under, direction: greater}]
- claim: under beats over
  metric: sst_acc
  checks: [{a: rr_under, b: rr_over}]
- claim: gs changes nothing
  checks: [{a: rro_hp_cs_gs, b: rro_hp_cs, direction: equal, margin: 0.01}]
- claim: a large gain
  checks: [{a: rr_over, b: rr_under, by: 0.5}]
"""


def test_claims_that_hold_and_that_do_not(tmp_path):
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    claims = load_claims(tmp_path / "claims.yaml")
    noise = np.random.default_rng(0).normal(0, 0.002, 4)
    values = {
        "rr_under": {"mean": {s: 0.40 + noise[s] for s in range(4)}, "sst_acc": {s: 0.3 for s in range(4)}},
        "rr_over": {"mean": {s: 0.45 - noise[s] / 2 for s in range(4)}, "sst_acc": {s: 0.35 + noise[s] for s in range(4)}},
        "rro_hp_cs": {"mean": {s: 0.6 + noise[s] for s in range(4)}},
        "rro_hp_cs_gs": {"mean": {s: 0.6 + noise[s] * 0.9 for s in range(4)}},
    }
    verdicts = [c.verdict for c in judge(claims, values)]
    assert verdicts == [HOLDS, FAILS, HOLDS, FAILS]
    values["rro_hp_cs_gs"]["mean"] = {s: 0.6 + noise[s] + 0.01 * (-1) ** s for s in range(4)}
    assert judge(claims, values)[2].verdict == OPEN  # too noisy to tell
    text = report([sweep_of(tmp_path, {"rr_under": lambda s: dev(0.3, 0.6, 0.5)}, seeds=[0])],
                  tmp_path / "out", claims_file=tmp_path / "claims.yaml")
    assert "- **over beats under**: not tested.\n  - rr_over > rr_under (mean): row(s) ['rr_over'] not in the report." in text
    assert "Not tested here (none of their rows is in this report): gs changes nothing." in text


def test_claims_file_errors_name_the_claim_and_key(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("- claim: x\n  checks: [{a: r1, b: r2, direction: bigger}]\n")
    with pytest.raises(ClaimsError, match=r"claim 1, check 1: direction must be 'greater' or 'equal'"):
        load_claims(path)
    path.write_text("- claim: x\n  checks: [{a: r1, b: r2, metrc: mean}]\n")
    with pytest.raises(ClaimsError, match=r"claim 1, check 1: expected keys a, b"):
        load_claims(path)


def test_paper_claims_file_is_valid():
    from mtbert.claims import PAPER_CLAIMS
    claims = load_claims(PAPER_CLAIMS)
    rows = {c.a for claim in claims for c in claim.checks} | {c.b for claim in claims for c in claim.checks}
    assert set(PAPER) <= rows | {"milestone_baseline"} and "rro_hp_cs loss=baseline model.pair_encoding.sts=siamese" in rows


def test_readings_name_the_row_the_validation_rows_rank_first(tmp_path):
    """The follow-up row is chosen on the held-out rows, among the multitask rows, over the
    seeds they all completed: not on dev (where `b` leads), not a single-task row, and not `a`,
    whose mean over all its seeds leads only through seed 1, which `c` lacks."""
    sweep = tmp_path / "s"
    scores = {"a": (0.75, 0.70), "b": (0.70, 0.80), "c": (0.90, 0.70), "single_sst": (0.95, 0.40)}
    for i, (experiment, (validation, mean)) in enumerate(scores.items()):
        for seed in (0, 1) if experiment != "c" else (0,):
            path = sweep / f"{i}{seed}"
            fake_job(path, experiment, seed, dev=dev(mean, mean, mean),
                     tasks=["sst"] if experiment == "single_sst" else None)
            score = validation + seed / 100 + (0.5 if (experiment, seed) == ("a", 1) else 0)
            results = json.loads((path / "results.json").read_text())
            (path / "results.json").write_text(json.dumps({**results, "validation": {"mean": score}}))
    report([sweep], tmp_path / "out", claims_file=None)
    readings = (tmp_path / "out" / "readings.md").read_text()
    assert ("- Highest mean validation score over seeds 0, which all 3 multitask rows completed: c, 0.900; "
            "its dev mean over them 0.700.") in readings
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    assert float(rows["b"]["validation"]) == pytest.approx(0.705)
