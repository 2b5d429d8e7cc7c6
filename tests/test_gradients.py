"""Gradient methods: PCGrad against hand-made answers and torchjd, the contract on the
real model (frozen parameters never move, heads get their own task's gradient), and
grad diagnostics end to end."""

import json
import math

import pytest
import torch
from torch import nn
from torchjd.aggregation import MGDA, PCGrad as TorchjdPCGrad, UPGrad

from conftest import compose_config, read_results, run_train, write_cs224n
from mtbert.batching import collate
from mtbert.gradients import Aggregated, PCGrad, Sum, TaskGradients
from mtbert.rundir import RunDir
from mtbert.build import Setup


def linear_losses(grads: list[list[float]], theta: nn.Parameter) -> dict:
    """Losses g_t . theta: task t's gradient on theta is exactly g_t."""
    return {f"t{i}": torch.tensor(g, dtype=theta.dtype) @ theta for i, g in enumerate(grads)}


def surgery(grads, method=None, seed=0):
    """The shared gradient `method` writes for task gradients `grads`, and its diagnostics."""
    theta = nn.Parameter(torch.zeros(len(grads[0]), dtype=torch.float64))
    diagnostics = (method or PCGrad(seed=seed)).backward(linear_losses(grads, theta), [theta],
                                                         diagnose=True)
    return theta.grad, diagnostics


@pytest.mark.parametrize("grads, expected, projections", [
    # conflicting: g1' = g1 + g2/2 = (.5, .5), g2' = g2 + g1 = (0, 1)
    ([[1, 0], [-1, 1]], [0.5, 1.5], 2),
    ([[1, 0], [0, 2]], [1, 2], 0),                    # orthogonal: untouched
    ([[1, 1], [2, 0]], [3, 1], 0),                    # aligned: untouched
    ([[1, 0], [-2, 0]], [0, 0], 2),                   # opposite: both cancelled
    # 3-D: one conflicting pair and a third task orthogonal to both
    ([[1, 0, 0], [-1, 1, 0], [0, 0, 1]], [0.5, 1.5, 1], 2),
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1, 1, 1], 0),
    ([[1, 1, 0], [1, 0, 1], [0, 1, 1]], [2, 2, 2], 0),
])
def test_pcgrad_known_answers(grads, expected, projections):
    grads = [[float(x) for x in g] for g in grads]
    total, diagnostics = surgery(grads)
    assert total.tolist() == pytest.approx(expected)
    assert diagnostics["projections"] == projections
    mean, _ = surgery(grads, PCGrad(reduction="mean"))
    assert mean.tolist() == pytest.approx([x / len(grads) for x in expected])


def test_pcgrad_three_way_conflict_follows_the_drawn_order():
    # g1 conflicts with g2 and g3; g2 . g3 = 0. g1 ends at (1/6, 1/6, 1/3) in either order;
    # g2 at (-1/3, 2/3, 1/3) after g1 then g3 (g1 made it conflict with g3), at (0, 1, 0)
    # after g3 then g1; g3 likewise at (-1/2, -1/2, 1) or (0, -1, 1).
    grads = [[1.0, 0, 0], [-1, 1, 0], [-1, -1, 1]]
    g1 = torch.tensor([1 / 6, 1 / 6, 1 / 3])
    g2 = {(0, 2): torch.tensor([-1 / 3, 2 / 3, 1 / 3]), (2, 0): torch.tensor([0.0, 1, 0])}
    g3 = {(0, 1): torch.tensor([-1 / 2, -1 / 2, 1]), (1, 0): torch.tensor([0.0, -1, 1])}
    drawn = set()
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        orders = [[j for j in torch.randperm(3, generator=generator).tolist() if j != i]
                  for i in range(3)]
        total, _ = surgery(grads, seed=seed)
        order2, order3 = tuple(orders[1]), tuple(orders[2])
        assert torch.allclose(total, (g1 + g2[order2] + g3[order3]).double())
        drawn |= {order2, order3}
    assert drawn == set(g2) | set(g3), "the seeds drew every order"


def test_pcgrad_agrees_with_torchjd_on_random_gradients():
    generator = torch.Generator().manual_seed(0)
    for tasks in (2, 3, 4):
        for trial in range(20):
            matrix = torch.randn(tasks, 30, generator=generator, dtype=torch.float64)
            # torchjd draws one torch.randperm(T) per task from the global generator, as we
            # do from ours: seeded alike, the orders (and so the results) match for any T
            torch.manual_seed(trial)
            expected = TorchjdPCGrad()(matrix)
            total, _ = surgery(matrix.tolist(), seed=trial)
            assert torch.allclose(total, expected, atol=1e-10)


def test_same_seed_same_surgery():
    grads = torch.randn(4, 12, generator=torch.Generator().manual_seed(1)).tolist()
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        method = PCGrad(seed=seed)
        runs[name] = torch.stack([surgery(grads, method)[0] for _ in range(10)])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"]), "another seed draws other orders"


def test_sum_diagnostics_do_not_change_the_update():
    grads = [[1.0, -2, 0.5], [-1, 1, 3], [0, 0, 0]]
    total, diagnostics = surgery(grads, Sum())
    assert total.tolist() == pytest.approx([0, -1, 3.5])
    assert diagnostics["projections"] is None
    assert diagnostics["norm"] == pytest.approx(
        {"t0": math.sqrt(5.25), "t1": math.sqrt(11), "t2": 0})
    assert diagnostics["cos"]["t0|t1"] == pytest.approx(-1.5 / math.sqrt(5.25 * 11))
    assert math.isnan(diagnostics["cos"]["t0|t2"]), "no cosine with a zero gradient"


@pytest.mark.parametrize("aggregator", [UPGrad(), MGDA()])
def test_torchjd_aggregators_see_the_task_gradients(aggregator):
    grads = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    total, diagnostics = surgery(grads.tolist(), Aggregated(aggregator))
    assert torch.allclose(total, aggregator(grads))
    assert set(diagnostics["cos"]) == {"t0|t1", "t0|t2", "t1|t2"}


def test_heads_keep_their_own_gradient_and_unreached_parameters_none():
    theta = nn.Parameter(torch.zeros(2))
    unused = nn.Parameter(torch.zeros(3))
    heads = [nn.Parameter(torch.zeros(2)) for _ in range(2)]
    losses = {"a": torch.tensor([1.0, 0]) @ theta + torch.tensor([3.0, 4]) @ heads[0],
              "b": torch.tensor([-1.0, 1]) @ theta + torch.tensor([5.0, 6]) @ heads[1]}
    PCGrad().backward(losses, [theta, unused])
    assert theta.grad.tolist() == [0.5, 1.5]
    assert heads[0].grad.tolist() == [3, 4] and heads[1].grad.tolist() == [5, 6]
    assert unused.grad is None


def test_reused_storage_leaves_no_stale_gradient():
    method, theta, other = Sum(), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    method.backward({"a": theta.sum() + 5 * other.sum(), "b": -theta.sum()}, [theta, other],
                    diagnose=True)
    theta.grad = other.grad = None
    diagnostics = method.backward({"a": 2 * theta.sum(), "b": theta.sum()}, [theta, other],
                                  diagnose=True)
    assert theta.grad.tolist() == [3, 3] and other.grad is None
    assert diagnostics["norm"] == pytest.approx({"a": math.sqrt(8), "b": math.sqrt(2)})


def test_reduction_is_checked():
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        PCGrad(reduction="max")


# The real (tiny) model, built by the trainer's Setup.

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    data = write_cs224n(root / "data", n=16)
    cfg = compose_config("model=tiny", "optim=pcgrad", "schedule=paper", "trainer.precision=fp32",
                         "optim.optimizer.weight_decay=0.1", data=data, cache=root / "cache")
    return Setup(cfg, RunDir(root / "run"))


def task_losses(s):
    out = {}
    for t in s.tasks:
        batch = collate(s.train[t], torch.arange(4), s.tokenizer.pad_token_id)
        out[t] = s.weights[t] * s.objectives[t].loss(s.model(t, batch), batch.labels, s.tasks[t])
    return out


def trainable_shared(model):
    return [p for m in (model.encoder, model.shared) for p in m.parameters() if p.requires_grad]


def flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def test_model_gradients_match_an_independent_pcgrad(setup):
    s = setup
    s.model.set_encoder_trainable(True)
    shared = trainable_shared(s.model)
    losses = task_losses(s)
    own = {t: torch.autograd.grad(loss, list(s.model.heads[t].parameters()), retain_graph=True)
           for t, loss in losses.items()}
    per_task = torch.stack([
        flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
        for loss in losses.values()])
    torch.manual_seed(s.cfg.seed)
    expected = TorchjdPCGrad()(per_task)

    s.optimizer.zero_grad(set_to_none=True)
    PCGrad(seed=s.cfg.seed).backward(losses, shared)
    pooler = set(s.model.encoder.pooler.parameters())
    assert all(p.grad is None for p in pooler), "mean pooling never reaches BERT's pooler"
    written = flat([p.grad for p in shared], shared)
    assert torch.allclose(written, expected, rtol=1e-4, atol=1e-7)
    for t, grads in own.items():
        for p, g in zip(s.model.heads[t].parameters(), grads):
            assert torch.equal(p.grad, g), f"head {t} gets its own task's gradient, unchanged"
    s.optimizer.zero_grad(set_to_none=True)


def test_frozen_parameters_stay_bit_identical_over_pcgrad_steps(setup):
    """Heads / all / heads phases with weight decay: a frozen encoder has no gradient, so
    AdamW neither moves nor decays it, and keeps no state for it while it was never trained."""
    s = setup
    encoder = dict(s.model.encoder.named_parameters())
    pooler = {n for n in encoder if n.startswith("pooler.")}
    total, snapshots = 6, []
    for step in range(total):
        s.model.set_encoder_trainable(s.schedule.trains_encoder(step, total))
        snapshots.append({n: p.detach().clone() for n, p in encoder.items()})
        if step == 1:
            assert not any(p in s.optimizer.state for p in encoder.values())
        s.gradient.backward(task_losses(s), trainable_shared(s.model))
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    snapshots.append({n: p.detach().clone() for n, p in encoder.items()})

    def moved(a, b):
        return {n for n in encoder if not torch.equal(snapshots[a][n], snapshots[b][n])}

    assert s.schedule.boundaries(total) == [1, 5]
    assert moved(0, 1) == set(), "frozen in the first phase"
    assert moved(1, 5) == set(encoder) - pooler, "trained in the middle phase (not the pooler)"
    assert moved(5, 6) == set(), "frozen again in the last phase"
    assert not any(encoder[n] in s.optimizer.state for n in pooler)


def test_update_change_against_the_plain_sum_by_hand():
    """a = (1, 0), b = (-1, 1) conflict: PCGrad gives a' = (0.5, 0.5), b' = (0, 1), so the
    update (0.5, 1.5) differs from the sum (0, 1) by (0.5, 0.5)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = {"a": p @ torch.tensor([1.0, 0.0], dtype=torch.float64),
              "b": p @ torch.tensor([-1.0, 1.0], dtype=torch.float64)}
    method = PCGrad()
    grads = TaskGradients(list(losses), [p], method.storage(2, [p]))
    grads.add(losses)
    combined, projections = method.combine(grads)
    update = grads.diagnostics(combined, projections)["update"]
    assert update["change"] == pytest.approx(0.5 ** 0.5)
    assert update["norm_ratio"] == pytest.approx(2.5 ** 0.5)
    assert update["cos"] == pytest.approx(1.5 / 2.5 ** 0.5)
    assert Sum().combine(grads)[0].tolist() == [0.0, 1.0]


# End to end.

def grad_events(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "grad"]


def train_tiny(*overrides, cwd, data, run="run"):
    run_train("model=tiny", "budget=smoke", "schedule=paper", "trainer.max_steps=4",
              "trainer.precision=fp32", "diagnostics.grad_every=1", f"hydra.run.dir={run}",
              *overrides, cwd=cwd, data=data)
    return cwd / run


@pytest.mark.parametrize("optim", ["pcgrad", "mgda"])
def test_train_logs_and_plots_grad_conflict(optim, data_dir, tmp_path):
    run = train_tiny(f"optim={optim}", cwd=tmp_path, data=data_dir)
    results = read_results(run)
    assert results["status"] == "completed" and results["steps"] == 4
    events = grad_events(run)
    assert [e["step"] for e in events] == [0, 1, 2, 3]
    for e in events:
        assert set(e["cos"]) == {"sst|para", "sst|sts", "para|sts"}
        assert set(e["norm"]) == {"sst", "para", "sts"}
        assert all(v is None or -1 <= v <= 1 for v in e["cos"].values())
        assert isinstance(e["projections"], int) if optim == "pcgrad" else e["projections"] is None
        assert e["update"]["change"] is None or e["update"]["change"] >= 0
    # STS reads the pooled encoder output, so while the encoder is frozen its gradient on
    # the shared parameters is zero and its cosines are undefined
    assert events[0]["norm"]["sts"] == 0 and events[0]["cos"]["sst|sts"] is None
    assert (run / "grad_conflict.png").stat().st_size > 10_000
    # the frozen-encoder steps (schedule=paper) have fewer shared parameters with a gradient
    assert events[0]["params"] < events[1]["params"]
    summary = (run / "grad_conflict.md").read_text()
    assert "| encoder frozen | sst / para |" in summary and "| encoder trained | sst / sts |" in summary


def test_same_seed_same_run(data_dir, tmp_path):
    runs = [train_tiny("optim=pcgrad", "trainer.max_steps=3", cwd=tmp_path, data=data_dir, run=name)
            for name in ("a", "b")]
    first, second = (grad_events(r) for r in runs)
    assert first == second and sum(e["projections"] for e in first) > 0
    assert read_results(runs[0])["dev"] == read_results(runs[1])["dev"]
