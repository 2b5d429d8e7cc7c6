"""Loss weightings against their papers' formulas on hand-made losses, their state across a
save, what they log, and the guard against combinations that would do nothing."""

import json
import math
from functools import partial

import pytest
import torch
from torch import nn
from torchjd.scalarization import DWA, FAMO, UW

from conftest import compose_config, write_cs224n
from mtbert.errors import ConfigError
from mtbert.build import Setup
from mtbert.rundir import RunDir
from mtbert.trainer import train
from mtbert.weighting import GradNorm, Scalarized

TASKS = ["sst", "para", "sts"]


def losses_of(x: torch.Tensor) -> dict:
    """Three task losses of one parameter vector, with known gradients."""
    return {"sst": (x ** 2).sum(), "para": 3 * x[0], "sts": (x[1] - 2) ** 2}


def test_uw_is_the_sum_of_exp_minus_s_times_l_plus_s():
    """Kendall et al.: sum_t 0.5 exp(-s_t) L_t + 0.5 s_t (torchjd's 1/2 convention); the
    model's gradient and the log-variances' gradients are that sum's."""
    uw = Scalarized(partial(UW), TASKS, lr=1e-3)
    s = torch.tensor([0.3, -0.5, 1.2])
    with torch.no_grad():
        uw.scalarizer.log_var.copy_(s)
    x = torch.tensor([1.0, 0.5, -2.0], requires_grad=True)
    weighted = uw.weigh(losses_of(x))
    sum(weighted.values()).backward()

    y = x.detach().clone().requires_grad_()
    s_ref = s.clone().requires_grad_()
    values = torch.stack(list(losses_of(y).values()))
    (0.5 * torch.exp(-s_ref) * values + 0.5 * s_ref).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(uw.scalarizer.log_var.grad, s_ref.grad)
    torch.testing.assert_close(uw.applied, 0.5 * torch.exp(-s))
    assert uw.parameters() == [uw.scalarizer.log_var]


def test_dwa_weights_are_t_softmax_of_loss_ratios_over_temperature():
    dwa = Scalarized(partial(DWA, temperature=2.0), TASKS)
    epochs = [[4.0, 2.0, 1.0], [2.0, 1.5, 0.9]]
    for epoch in epochs:
        for _ in range(2):  # two steps per epoch, same losses: the epoch's mean
            dwa.weigh({t: torch.tensor(v, requires_grad=True) for t, v in zip(TASKS, epoch)})
            torch.testing.assert_close(dwa.applied, torch.ones(3))  # equal for two epochs
        dwa.end_epoch()
    dwa.weigh({t: torch.tensor(1.0, requires_grad=True) for t in TASKS})
    ratios = torch.tensor(epochs[1]) / torch.tensor(epochs[0])
    torch.testing.assert_close(dwa.applied, 3 * torch.softmax(ratios / 2.0, 0))


def test_dwa_with_a_period_steps_its_history_every_period_optimizer_steps():
    """`weighting.period=2`: DWA's epoch is two optimizer steps, whatever the sampler's epoch."""
    dwa = Scalarized(partial(DWA, temperature=2.0), TASKS, period=2)
    periods = [[4.0, 2.0, 1.0], [2.0, 1.5, 0.9]]
    for losses in periods:
        for _ in range(2):
            dwa.weigh({t: torch.tensor(v, requires_grad=True) for t, v in zip(TASKS, losses)})
            torch.testing.assert_close(dwa.applied, torch.ones(3))
            dwa.end_epoch()  # the sampler's epoch no longer steps it
            dwa.after_step(lambda: {})
    dwa.weigh({t: torch.tensor(1.0, requires_grad=True) for t in TASKS})
    ratios = torch.tensor(periods[1]) / torch.tensor(periods[0])
    torch.testing.assert_close(dwa.applied, 3 * torch.softmax(ratios / 2.0, 0))


@pytest.mark.parametrize("period, total, per_epoch, refused", [
    (None, 400, 423, True), (None, 400, 267, True), (None, 400, 100, False),
    (200, 400, 1000, True), (50, 400, 1000, False)])
def test_dwa_refuses_a_run_too_short_for_its_weights_to_move(period, total, per_epoch, refused):
    """Equal weights for two periods: a run of two periods or fewer is weighting=equal."""
    dwa = Scalarized(partial(DWA), TASKS, period=period)
    if not refused:
        dwa.check(total, per_epoch)
        return
    with pytest.raises(ValueError, match=r"^period: DWA keeps equal weights .* weighting.period=50\)"):
        dwa.check(total, per_epoch)


def test_a_period_is_refused_for_a_scalarizer_without_epochs():
    with pytest.raises(ValueError, match="period must be a whole number >= 1 .* for UW"):
        Scalarized(partial(UW), TASKS, lr=1e-3, period=10)


def test_dwa_in_a_one_epoch_run_is_refused_naming_the_key(tmp_path):
    data = write_cs224n(tmp_path / "data", n=24)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "weighting=dwa", "trainer.max_seconds=null",
                         data=data, cache=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^weighting.period: DWA keeps equal weights"):
        train(cfg, RunDir(tmp_path / "run"))


def test_famo_learns_from_the_losses_recomputed_after_the_step():
    """The loop's after_step hook hands FAMO the losses after the update: its logits move
    as torchjd's FAMO used by hand moves them."""
    famo, ref = Scalarized(partial(FAMO), TASKS), FAMO(3)
    before, after = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.6, 1.9, 0.45])
    famo.weigh({t: v.clone().requires_grad_() for t, v in zip(TASKS, before)})
    famo.after_step(lambda: dict(zip(TASKS, after)))
    ref(before)
    ref.update(after)
    torch.testing.assert_close(famo.scalarizer._w, ref._w)
    assert not torch.equal(ref._w.detach(), torch.zeros(3)), "the logits moved"
    famo.weigh({t: v.clone().requires_grad_() for t, v in zip(TASKS, after)})
    z = torch.softmax(ref._w.detach(), 0)
    torch.testing.assert_close(famo.applied, z / after / (z / after).sum())  # c z_t / L_t


class Toy(nn.Module):
    """An 'encoder' weight matrix every task reaches, and a head per task."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(3, 3, bias=False)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})

    def shared_parameters(self):  # as MultitaskBert says what its tasks share
        return list(self.encoder.parameters())

    def losses(self, x):
        h = torch.tanh(self.encoder(x))
        return {t: (self.heads[t](h) ** 2).mean() * (i + 1) for i, t in enumerate(TASKS)}


def test_gradnorm_one_update_of_its_weights_by_hand():
    model, x = Toy(), torch.randn(8, 3)
    gn = GradNorm(TASKS, alpha=1.5, lr=0.1)
    gn.bind(model)
    assert gn.parameter == "encoder.weight"
    opt = torch.optim.SGD(gn.parameters(), lr=0.1)
    gn.weigh(model.losses(x))  # step 0: records L(0); every ratio is 1
    opt.step()
    gn.after_step(lambda: {})
    opt.zero_grad()
    with torch.no_grad():
        model.encoder.weight.mul_(0.7)  # the losses change unevenly
    w = gn.weights.detach().clone()

    losses = model.losses(x)
    norms = torch.stack([torch.autograd.grad(loss, model.encoder.weight, retain_graph=True)[0].norm()
                         for loss in losses.values()])
    values = torch.stack([loss.detach() for loss in losses.values()])
    ratio = values / gn.initial
    target = (w * norms).mean() * (ratio / ratio.mean()) ** 1.5
    expected = w - 0.1 * torch.sign(w * norms - target) * norms
    expected = expected * 3 / expected.sum()

    weighted = gn.weigh(losses)
    for t, loss in weighted.items():
        torch.testing.assert_close(loss, w[TASKS.index(t)] * losses[t])
    opt.step()
    gn.after_step(lambda: {})
    torch.testing.assert_close(gn.weights.detach(), expected)
    assert not torch.allclose(expected, w), "the weights moved"
    assert math.isclose(gn.weights.sum().item(), 3.0, rel_tol=1e-6)


def test_gradnorm_names_an_unknown_parameter():
    with pytest.raises(ValueError, match="parameter='encoder.nope' is not a parameter"):
        GradNorm(TASKS, parameter="encoder.nope").bind(Toy())


@pytest.mark.parametrize("overrides, names", [
    (("sampler=sequential", "optim=pcgrad"), ("optim (PCGrad)", "RandomSequential", "optim=adam")),
    (("sampler=annealed", "weighting=uw"), ("weighting (UW)", "Annealed", "weighting=equal")),
    (("sampler.per_task=true", "optim=upgrad"), ("optim (UPGrad)", "per_task=true", "sampler=rr_over")),
    (("sampler.tasks=[sst]", "weighting=gradnorm"), ("only ['sst'] trains", "weighting=equal")),
])
def test_a_method_that_would_do_nothing_is_refused_before_training(overrides, names, tmp_path):
    data = write_cs224n(tmp_path / "data", n=8)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", *overrides, data=data, cache=tmp_path / "c")
    with pytest.raises(ConfigError) as e:
        Setup(cfg, RunDir(tmp_path / "run"))
    for name in names:
        assert name in str(e.value)


def test_weights_are_logged_in_grad_events(tmp_path):
    data = write_cs224n(tmp_path / "data", n=24)
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", "weighting=uw", "optim=pcgrad",
                         "diagnostics.grad_every=1", "trainer.max_steps=3", "trainer.max_seconds=null",
                         "data.batch_size=4", data=data, cache=tmp_path / "cache")
    run = RunDir(tmp_path / "run")
    train(cfg, run)
    run.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grads = [e for e in events if e["event"] == "grad"]
    assert len(grads) == 3
    for e in grads:
        assert set(e["loss_weights"]) == set(e["weights"]) == set(TASKS)
    assert grads[0]["loss_weights"] == pytest.approx({t: 0.5 for t in TASKS})  # exp(-0) / 2
    assert grads[-1]["loss_weights"] != grads[0]["loss_weights"], "UW's log-variances learn"
    assert (tmp_path / "run" / "grad_conflict.png").exists()


def test_dwa_state_survives_a_checkpoint(tmp_path):
    """DWA's loss history lives outside torchjd's state_dict; a resumed run must have it."""
    from mtbert.rundir import load_checkpoint, save_checkpoint
    dwa, fresh = Scalarized(partial(DWA), TASKS), Scalarized(partial(DWA), TASKS)
    for epoch in ([4.0, 2.0, 1.0], [2.0, 1.5, 0.9]):
        dwa.weigh({t: torch.tensor(v, requires_grad=True) for t, v in zip(TASKS, epoch)})
        dwa.end_epoch()
    save_checkpoint({"weighting": dwa.state_dict()}, tmp_path / "w.pt")  # no pickled objects
    fresh.load_state_dict(load_checkpoint(tmp_path / "w.pt")["weighting"])
    step = {t: torch.tensor(1.0, requires_grad=True) for t in TASKS}
    dwa.weigh(step)
    fresh.weigh(step)
    assert not torch.allclose(dwa.applied, torch.ones(3))
    torch.testing.assert_close(fresh.applied, dwa.applied)


def test_dwa_resumed_mid_period_ends_its_period_on_time(tmp_path):
    """The steps into the current period are saved: a resumed DWA steps when the original does."""
    from mtbert.rundir import load_checkpoint, save_checkpoint

    def feed(dwa, losses):
        for values in losses:
            dwa.weigh({t: torch.tensor(v, requires_grad=True) for t, v in zip(TASKS, values)})
            dwa.after_step(lambda: {})

    dwa, resumed = Scalarized(partial(DWA), TASKS, period=3), Scalarized(partial(DWA), TASKS, period=3)
    feed(dwa, [[4.0, 2.0, 1.0]] * 3 + [[2.0, 1.5, 0.9]])  # one step into the second period
    save_checkpoint({"weighting": dwa.state_dict()}, tmp_path / "w.pt")
    resumed.load_state_dict(load_checkpoint(tmp_path / "w.pt")["weighting"])
    for run in (dwa, resumed):
        feed(run, [[2.0, 1.5, 0.9]] * 2)
        run.weigh({t: torch.tensor(1.0, requires_grad=True) for t in TASKS})
    assert not torch.allclose(dwa.applied, torch.ones(3))  # two periods done: the weights moved
    torch.testing.assert_close(resumed.applied, dwa.applied)
