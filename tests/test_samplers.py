from collections import Counter

import pytest

import torch

from mtbert.samplers import (Adaptive, Annealed, Drawn, Proportional, RandomSequential,
                             RoundRobinOver, RoundRobinUnder, Temperature)

SIZES = {"sst": 267, "para": 423, "sts": 189}  # batches per pass at batch 32 on the real data


def count(sampler, sizes=SIZES):
    steps = list(sampler.epoch(sizes))
    assert len(steps) == sampler.steps_per_epoch(sizes)
    return steps, Counter(t for step in steps for t in step)


def test_random_sequential_is_algorithm_1():
    steps, batches = count(RandomSequential())
    assert batches == Counter(SIZES), "every batch of every task, once"
    assert all(len(s) == 1 for s in steps)
    order = [s[0] for s in steps]
    assert order == ["sst"] * 267 + ["para"] * 423 + ["sts"] * 189, "one loader after the other"


def test_rr_under_is_algorithm_2():
    steps, batches = count(RoundRobinUnder())
    assert len(steps) == 189 and batches == Counter({"sst": 189, "para": 189, "sts": 189})
    assert all(s == ("sst", "para", "sts") for s in steps)


@pytest.mark.parametrize("sigma, expected", [(50, 50), (1000, 1000), (None, 423)])
def test_rr_over_is_algorithm_3(sigma, expected):
    steps, batches = count(RoundRobinOver(sigma))
    assert batches == Counter({t: expected for t in SIZES})


@pytest.mark.parametrize("sampler, rounds", [(RoundRobinUnder(per_task=True), 189),
                                             (RoundRobinOver(per_task=True), 423)])
def test_round_robin_per_task_steps_through_the_same_batches_one_task_at_a_time(sampler, rounds):
    steps, batches = count(sampler)
    assert batches == Counter({t: rounds for t in SIZES}), "the same examples as a round a step"
    assert steps == [("sst",), ("para",), ("sts",)] * rounds


def test_training_task_subset():
    sampler = RandomSequential(tasks=["sst"])
    assert sampler.tasks == ["sst"]
    assert count(sampler, {"sst": 5})[1] == Counter({"sst": 5})


@pytest.mark.parametrize("sigma", [0, -3, 2.5, "ten"])
def test_rr_over_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive integer"):
        RoundRobinOver(sigma)


def test_empty_task_list_rejected():
    with pytest.raises(ValueError, match="tasks must name at least one task"):
        RoundRobinUnder(tasks=[])


def draw_counts(sampler, sizes, steps=6000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sampler.steps = steps
    return Counter(s[0] for s in sampler.epoch(sizes, g, **kw))


def test_proportional_and_temperature_proportions():
    sizes = {"sst": 100, "para": 300, "sts": 600}
    counts = draw_counts(Proportional(), sizes)
    for t, n in sizes.items():
        assert counts[t] / 6000 == pytest.approx(n / 1000, abs=0.02)
    counts = draw_counts(Temperature(temperature=2.0), sizes)
    z = sum(n ** 0.5 for n in sizes.values())
    for t, n in sizes.items():
        assert counts[t] / 6000 == pytest.approx(n ** 0.5 / z, abs=0.02)
    assert Drawn.steps_per_epoch(Proportional(), sizes) == 1000, "default: one pass of batches"


def test_annealed_goes_from_proportional_to_flat():
    sizes = {"a": 100, "b": 900}
    sampler = Annealed(final_alpha=0.2)
    assert sampler.probabilities(sizes, 0.0)["a"] == pytest.approx(0.1)
    end = sampler.probabilities(sizes, 1.0)["a"]
    assert end == pytest.approx(100 ** 0.2 / (100 ** 0.2 + 900 ** 0.2))
    early = draw_counts(Annealed(), sizes, steps=2000, step=0, total_steps=10**9)
    late = draw_counts(Annealed(), sizes, steps=2000, step=10**9, total_steps=10**9)
    assert early["a"] / 2000 == pytest.approx(0.1, abs=0.03)
    assert late["a"] / 2000 == pytest.approx(end, abs=0.03)


def test_adaptive_favours_tasks_below_target():
    sampler = Adaptive(targets={"sst": 0.5, "para": 0.8})
    sizes = {"sst": 10, "para": 10}
    assert sampler.probabilities(sizes) == {"sst": 0.5, "para": 0.5}, "uniform before evaluations"
    sampler.observe({"sst": 0.25, "para": 0.8})  # sst at half its target, para on target
    assert sampler.probabilities(sizes)["sst"] == pytest.approx(2 / 3)
    counts = draw_counts(sampler, sizes)
    assert counts["sst"] / 6000 == pytest.approx(2 / 3, abs=0.02)
    sampler.observe({"sst": -0.3, "para": None})  # a negative score is capped, None is neutral
    assert sampler.probabilities(sizes)["sst"] == pytest.approx(10 / 11)
    with pytest.raises(ValueError, match=r"no target for task\(s\) \['sts'\]"):
        sampler.check(["sst", "para", "sts"])
    sampler.check(["sst", "para"])


def test_drawn_samplers_are_seeded():
    sizes = {"a": 5, "b": 7, "c": 9}
    assert draw_counts(Temperature(), sizes, seed=3) == draw_counts(Temperature(), sizes, seed=3)
