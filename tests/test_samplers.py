from collections import Counter

import pytest

from mtbert.samplers import RandomSequential, RoundRobinOver, RoundRobinUnder

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


def test_training_task_subset():
    sampler = RandomSequential(tasks=["sst"])
    assert sampler.tasks == ["sst"]
    assert count(sampler, {"sst": 5})[1] == Counter({"sst": 5})


@pytest.mark.parametrize("sigma", [0, -3, 2.5, "ten"])
def test_rr_over_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sampler.sigma must be a positive integer"):
        RoundRobinOver(sigma)


def test_empty_task_list_rejected():
    with pytest.raises(ValueError, match="sampler.tasks"):
        RoundRobinUnder(tasks=[])
