"""The learned world model: the ensemble recovers a known linear-Gaussian system (mean
and variance), its normalisers and elites are saved, elites follow hold-out error,
early stopping stops and keeps the best weights, and ``step`` keeps the world-model
contract (shapes, elites only, gradients to the actions)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mbvi.errors import ConfigError
from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.dynamics_module import DynamicsModule, holdout_mask, transition_keys
from mbvi.variational.rollouts import frozen_module
from tests.conftest import accelerator

S, A = 3, 2
NOISE = torch.tensor([0.05, 0.1, 0.2])  # std of each state dim's transition noise
REWARD_NOISE = 0.1
G = torch.Generator().manual_seed(1)
A_TRUE = 0.9 * torch.eye(S) + 0.05 * torch.randn(S, S, generator=G)
B_TRUE = 0.3 * torch.randn(A, S, generator=G)
W_TRUE = torch.tensor([1.0, -0.5, 0.3])


def linear_gaussian(n: int, seed: int):
    """s' = s A + a B + NOISE·ε, r = s·w + REWARD_NOISE·ε, never terminated."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, S, generator=g)
    a = torch.rand(n, A, generator=g) * 2 - 1
    s2 = s @ A_TRUE + a @ B_TRUE + NOISE * torch.randn(n, S, generator=g)
    r = s @ W_TRUE + REWARD_NOISE * torch.randn(n, generator=g)
    return s, a, r, s2, torch.zeros(n)


def small_model(members: int = 4, elites: int = 2, **kwargs) -> DynamicsEnsemble:
    torch.manual_seed(0)
    model = DynamicsEnsemble(members=members, elites=elites, hidden=(64, 64), **kwargs)
    model.build(S, A)
    return model


@pytest.fixture(scope="module")
def fitted():
    """(model, fitter, metrics) after one fit on 5,000 transitions."""
    model = small_model()
    fitter = DynamicsModule(model, batch_size=128, max_epochs=100, patience=10)
    metrics = fitter.fit_transitions(*linear_gaussian(5000, seed=2))
    return model, fitter, metrics


# ---- learning ------------------------------------------------------------------------
def test_the_ensemble_recovers_the_mean_and_variance_of_a_linear_gaussian_system(fitted):
    model, _, metrics = fitted
    s, a, _, _, _ = linear_gaussian(2000, seed=3)
    with torch.no_grad():
        pred = model.predict(s, a)
    # every member, averaged over fresh on-distribution rows, per dim
    mean_err = ((pred.next_mean - (s @ A_TRUE + a @ B_TRUE)) / NOISE).abs().mean(1)
    assert mean_err.max() < 0.2, mean_err  # within a fifth of the noise std
    std_ratio = (pred.next_std / NOISE).mean(1)  # the noise std, to within 8%
    torch.testing.assert_close(std_ratio, torch.ones_like(std_ratio), atol=0.08, rtol=0)
    reward_err = ((pred.reward_mean - s @ W_TRUE) / REWARD_NOISE).abs().mean(1)
    assert reward_err.max() < 0.3, reward_err
    reward_ratio = (pred.reward_std / REWARD_NOISE).mean(1)
    torch.testing.assert_close(reward_ratio, torch.ones_like(reward_ratio), atol=0.1, rtol=0)
    assert metrics["model/epochs"] >= 10


def test_the_members_differ_off_the_data(fitted):
    model, _, _ = fitted
    far = torch.full((1, S), 6.0)
    with torch.no_grad():
        pred = model.predict(far, torch.ones(1, A))
    spread = pred.next_mean.std(0).mean()
    near = model.predict(*linear_gaussian(200, seed=4)[:2]).next_mean.std(0).mean()
    assert spread > 5 * near, (spread, near)


# ---- saving ----------------------------------------------------------------------------
def test_normalisers_elites_and_bounds_survive_a_state_dict_round_trip(fitted):
    model = copy.deepcopy(fitted[0])
    model.set_elites([1, 3])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = DynamicsEnsemble(members=4, elites=2, hidden=(64, 64))
    fresh.build(S, A)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("in_mean", "in_std", "out_mean", "out_std", "elite_idx"):
        torch.testing.assert_close(getattr(fresh, name), getattr(model, name))
    assert not torch.equal(fresh.in_std, torch.ones_like(fresh.in_std))
    torch.testing.assert_close(fresh.max_logvar, model.max_logvar)
    s, a = linear_gaussian(50, seed=5)[:2]
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(s, a).next_std, model.predict(s, a).next_std)
        for prop in ("mean", "expectation"):
            g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
            torch.testing.assert_close(
                fresh.step(s, a, prop, g1).next_state, model.step(s, a, prop, g2).next_state
            )
    assert model.max_logvar.requires_grad and model.min_logvar.requires_grad


# ---- elites, hold-out split, early stopping ---------------------------------------------
def test_elites_are_the_members_with_the_lowest_holdout_error(fitted):
    model, fitter, _ = fitted
    broken = copy.deepcopy(model)
    with torch.no_grad():  # members 0 and 2 predict nonsense
        for i in (0, 2):
            broken.net.weights[-1][i].add_(torch.randn_like(broken.net.weights[-1][i]))
    judge = DynamicsModule(broken)
    out = judge.validation_step(linear_gaussian(500, seed=6))
    per_member = out["model/holdout_mse_per_member"]
    assert per_member[[0, 2]].min() > 3 * per_member[[1, 3]].max()
    judge.choose_elites(per_member)
    assert broken.elite_idx.tolist() == [1, 3]


def test_the_holdout_split_is_fixed_as_the_data_grows():
    fitter = DynamicsModule(small_model(), holdout_fraction=0.2)
    _, held_small = fitter.split(1000)
    _, held_large = fitter.split(5000)
    assert torch.equal(held_large[held_large < 1000], held_small)
    assert 0.15 < held_large.numel() / 5000 < 0.25
    # by content: a transition stays on its side wherever it sits in the buffer
    s, a = linear_gaussian(3000, seed=8)[:2]
    whole = holdout_mask(transition_keys(s, a), 0.2)
    assert torch.equal(holdout_mask(transition_keys(s[1000:], a[1000:]), 0.2), whole[1000:])


def test_early_stopping_stops_and_restores_the_best_weights():
    # targets unrelated to the inputs, few rows, a fast optimiser: the hold-out NLL
    # bottoms out and rises as the members memorise the noise
    s, a, r, _, term = linear_gaussian(300, seed=9)
    s2 = torch.randn(300, S, generator=torch.Generator().manual_seed(10))
    model = small_model()
    fitter = DynamicsModule(model, lr=1e-2, batch_size=32, max_epochs=200, patience=3,
                            holdout_fraction=0.3)  # fmt: skip
    metrics = fitter.fit_transitions(s, a, r, s2, term)
    assert metrics["model/epochs"] < 200
    assert len(fitter.history) == metrics["model/epochs"] + 1  # with the score before epoch 1
    best = min(fitter.history)
    assert fitter.history[-1] > best + 1e-3  # stopped after getting worse
    _, hold = fitter.split(300, transition_keys(s, a))
    now = fitter.holdout_metrics(s[hold], a[hold], r[hold], s2[hold])
    assert float(now["model/holdout_nll"]) == pytest.approx(metrics["model/holdout_nll"])
    assert metrics["model/holdout_nll"] <= best + 1e-4


def test_the_optimiser_state_persists_across_fits_and_checkpoints():
    data = linear_gaussian(400, seed=11)
    fitter = DynamicsModule(small_model(), batch_size=100, max_epochs=2, patience=5)
    assert fitter.optimizer_state() is None
    fitter.fit_transitions(*data)
    first = fitter.optimizer_state()
    steps = int(first["state"][0]["step"])
    fitter.fit_transitions(*data)
    assert int(fitter.optimizer_state()["state"][0]["step"]) > steps
    buffer = io.BytesIO()
    torch.save(fitter.optimizer_state(), buffer)
    buffer.seek(0)
    resumed = DynamicsModule(copy.deepcopy(fitter.model), batch_size=100, max_epochs=2)
    resumed.load_optimizer_state(torch.load(buffer, weights_only=True))
    saved, loaded = fitter.optimizer_state(), resumed.optimizer_state()
    torch.testing.assert_close(loaded["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert torch.equal(loaded["bootstrap_generator"], saved["bootstrap_generator"])


def test_a_trainer_fits_the_normalisers_logs_and_chooses_elites(tmp_path):
    s, a, r, s2, term = linear_gaussian(600, seed=12)

    class Data(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.train_transitions = (s[:500], a[:500], r[:500], s2[:500], term[:500])

        def train_dataloader(self):
            return DataLoader(TensorDataset(*self.train_transitions), batch_size=100)

        def val_dataloader(self):
            return DataLoader(TensorDataset(s[500:], a[500:], r[500:], s2[500:], term[500:]),
                              batch_size=100)  # fmt: skip

    model = small_model()
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), accelerator=accelerator(),
    )  # fmt: skip
    fitter, chosen = DynamicsModule(model), []
    choose = fitter.choose_elites
    fitter.choose_elites = lambda mse: (chosen.append(mse.cpu()), choose(mse))
    trainer.fit(fitter, datamodule=Data())
    assert trainer.global_step == 10 and len(chosen) == 2  # elites after each epoch
    model = model.cpu()
    torch.testing.assert_close(model.in_mean, torch.cat([s[:500], a[:500]], -1).mean(0))
    for key in ("model/train_nll", "model/holdout_nll", "model/holdout_mse"):
        assert key in trainer.callback_metrics
    errors = model.holdout_errors(s[500:], a[500:], r[500:], s2[500:])
    assert model.elite_idx.tolist() == errors.argsort()[:2].sort().values.tolist()


# ---- the world-model contract ---------------------------------------------------------
@pytest.mark.parametrize("propagation", ["ts1", "mean", "expectation"])
def test_step_shapes_and_gradients_reach_the_actions(propagation):
    model = small_model()
    s = torch.randn(37, S)  # not a multiple of the elites: the last group is padded
    a = torch.zeros(37, A, requires_grad=True)
    step = model.step(s, a, propagation)
    assert step.next_state.shape == (37, S) and step.reward.shape == (37,)
    assert torch.equal(step.terminated, torch.zeros(37))
    (step.next_state.sum() + step.reward.sum()).backward()
    assert a.grad.abs().sum(-1).gt(0).all()
    # run with detached parameters, as inference does: still differentiable in a
    model.zero_grad(set_to_none=True)
    a2 = torch.zeros(37, A, requires_grad=True)
    frozen_module(model)(s, a2, propagation).reward.sum().backward()
    assert a2.grad.abs().sum() > 0 and all(p.grad is None for p in model.net.parameters())


def test_expectation_gradient_matches_finite_differences():
    model = small_model().double()
    model.fit_normalisers(*(x.double() for x in linear_gaussian(100, seed=13)[:4]))
    s = torch.randn(4, S, dtype=torch.float64)
    a = (torch.rand(4, A, dtype=torch.float64) * 2 - 1).requires_grad_()

    def f(act):
        out = model.step(s, act, "expectation")
        return out.next_state.pow(2).sum() + out.reward.sum()

    (grad,) = torch.autograd.grad(f(a), a)
    eps, numeric = 1e-6, torch.zeros_like(a)
    with torch.no_grad():
        for i in range(4):
            for j in range(A):
                d = torch.zeros_like(a)
                d[i, j] = eps
                numeric[i, j] = (f(a + d) - f(a - d)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def test_ts1_draws_from_the_elites_only():
    model = small_model(members=4, elites=1)
    model.set_elites([2])
    with torch.no_grad():  # noise well below the members' disagreement
        model.max_logvar.fill_(-12.0), model.min_logvar.fill_(-20.0)
    s, a = torch.randn(4000, S), torch.rand(4000, A) * 2 - 1
    with torch.no_grad():
        pred = model.predict(s, a)
        step = model.step(s, a, "ts1", torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.step(s, a, "mean").next_state, pred.next_mean[2])
    z = (step.next_state - pred.next_mean[2]) / pred.next_std[2]  # member 2's own noise
    zr = (step.reward - pred.reward_mean[2]) / pred.reward_std[2]
    for x in (z, zr):
        assert x.mean().abs() < 0.05 and (x.std() - 1).abs() < 0.05
    other = (step.next_state - pred.next_mean[0]) / pred.next_std[0]
    assert other.std() > 3


def test_mean_propagation_puts_each_row_through_one_random_elite():
    model = small_model(members=4, elites=2)
    model.set_elites([3, 1])
    s, a = torch.randn(1001, S), torch.rand(1001, A) * 2 - 1
    with torch.no_grad():
        means = model.predict(s, a).next_mean  # [E,M,S]
        nxt = model.step(s, a, "mean", torch.Generator().manual_seed(1)).next_state
    close = (means - nxt).abs().amax(-1) < 1e-5  # [E,M]: which member each row matches
    assert close.sum(0).eq(1).all() and not close[[0, 2]].any()
    assert abs(int(close[1].sum()) - int(close[3].sum())) <= 1  # near-equal groups
    # a different draw puts rows through different members
    with torch.no_grad():
        again = model.step(s, a, "mean", torch.Generator().manual_seed(2)).next_state
    assert not torch.equal(nxt, again)


def test_termination_comes_from_the_rule_or_a_learned_head():
    class AboveOne(torch.nn.Module):
        def forward(self, s, a, s_next):
            return (s_next[:, 0] > 1).float()

    model = DynamicsEnsemble(members=2, elites=1, hidden=(32,))
    model.build(S, A, AboveOne())
    assert "termination" in dict(model.named_children())
    s, a = torch.randn(300, S), torch.zeros(300, A)
    out = model.step(s, a, "mean")
    assert torch.equal(out.terminated, (out.next_state[:, 0] > 1).float())

    s, a, r, s2, _ = linear_gaussian(2000, seed=14)
    term = (s2[:, 0] > 1).float()
    learned = small_model(learned_termination=True)
    DynamicsModule(learned, lr=3e-3, batch_size=128, max_epochs=15).fit_transitions(
        s, a, r, s2, term
    )
    assert any(k.startswith("term_head.") for k in learned.state_dict())
    with torch.no_grad():
        p = learned._terminated(s, a, s2)
    assert ((p > 0.5).float() == term).float().mean() > 0.95
    _, metrics = learned.loss(s, a, r, s2, term)
    assert metrics["termination_bce"] < 0.2


# ---- configuration ---------------------------------------------------------------------
def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="members must be >= 1, got 0"):
        DynamicsEnsemble(members=0, elites=1)
    with pytest.raises(
        ConfigError,
        match=r"elites must be between 1 and members=3, got 5; lower elites or raise members",
    ):
        DynamicsEnsemble(members=3, elites=5)
    with pytest.raises(ConfigError, match="elites must be between 1 and members=3, got 0"):
        DynamicsEnsemble(members=3, elites=0)
    with pytest.raises(ConfigError, match=r"holdout_fraction must be in \(0, 1\), got 1.0"):
        DynamicsModule(small_model(), holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="patience must be >= 1, got 0"):
        DynamicsModule(small_model(), patience=0)
    with pytest.raises(ConfigError, match="call model.build"):
        DynamicsModule(DynamicsEnsemble()).fit_transitions(*linear_gaussian(10, seed=0))


def test_the_ensemble_loads_without_lightning():
    code = ("import sys, mbvi.models, mbvi.planners.direct; from mbvi.models import DynamicsEnsemble; "
            "assert 'lightning' not in sys.modules, 'lightning was imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_and_loss_on_cuda():
    model = small_model().cuda()
    data = [x.cuda() for x in linear_gaussian(300, seed=15)]
    DynamicsModule(model, max_epochs=2).fit_transitions(*data)
    a = data[1].clone().requires_grad_()
    g = torch.Generator(device="cuda").manual_seed(0)
    model.step(data[0], a, "ts1", g).reward.sum().backward()
    assert a.grad.device.type == "cuda" and a.grad.abs().sum() > 0


def test_ts1_steps_fewer_rows_than_elites():
    """TS-1 with fewer rows than elites (a two-state batch through five elites) pads the
    groups by cycling the rows and returns one transition per row."""
    model = DynamicsEnsemble(members=7, elites=5, hidden=(8,))
    model.build(3, 1)
    for m in (1, 2, 4, 6):
        s, a = torch.randn(m, 3), torch.rand(m, 1) * 2 - 1
        out = model.step(s, a, "ts1")
        assert out.next_state.shape == (m, 3) and out.reward.shape == (m,)
        assert torch.isfinite(out.next_state).all()


def test_each_row_meets_every_elite_equally_often_when_groups_are_padded():
    """7 rows through 3 elites: groups of 3, one padded. Over 600 draws every row goes
    through each elite a third of the time (within 5 binomial SE), so the padded group
    biases no elite (a fixed elite for the padded group would get 1/7 of the rows)."""
    model = small_model(members=4, elites=3)
    model.set_elites([0, 2, 3])
    s, a = torch.randn(7, S), torch.rand(7, A) * 2 - 1
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(4, 7)
    with torch.no_grad():
        means = model.predict(s, a).next_mean  # [E,M,S]
        for _ in range(600):
            nxt = model.step(s, a, "mean", g).next_state
            counts += ((means - nxt).abs().amax(-1) < 1e-5).float()
    assert counts.sum(0).eq(600).all() and counts[1].eq(0).all()
    freq, se = counts[[0, 2, 3]] / 600, (1 / 3 * 2 / 3 / 600) ** 0.5
    assert ((freq - 1 / 3).abs() < 5 * se).all(), freq
