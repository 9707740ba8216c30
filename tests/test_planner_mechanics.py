"""The sampling planners' machinery: resampling, weight collapse, bad options, warm
starts and amortised proposals (on the problem of ``tests.lq_problem``)."""

import math

import pytest
import torch

from mbvi.errors import ConfigError
from mbvi.planners import CEM, MPPI, SMC, SVGD, Direct, ImportanceSampling
from mbvi.planners._sampling import (
    multinomial_resample,
    particle_metrics,
    rbf_kernel,
    systematic_resample,
)
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles
from mbvi.variational.priors import UniformPrior
from tests.lq_problem import (
    ALPHA,
    F64,
    S0,
    QuadraticLeaf,
    ShiftWorld,
    _engine,
    _prior,
    model_based_objective,
    model_free_objective,
)

# ---- resampling ------------------------------------------------------------------------


def _random_log_weights(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    log_w = 2.0 * torch.randn(b, k, generator=g, dtype=F64)
    return log_w - log_w.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("resampler", [systematic_resample, multinomial_resample])
def test_resampling_preserves_the_weighted_mean_in_expectation(resampler):
    """E[mean of the resampled x] = Σ w x: averaged over 4000 independent resamplings
    of one weighted population, within 4 SE (from the resamplings' spread)."""
    torch.manual_seed(6)
    log_w = _random_log_weights(1, 50, 0).expand(4000, 50)
    x = torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(1))
    means = x[resampler(log_w)].mean(-1)
    target = (log_w[0].exp() * x).sum()
    se = means.std() / math.sqrt(means.shape[0])
    assert abs(means.mean() - target) < 4 * se, (means.mean(), target, se)


def test_particle_draws_follow_the_weights_and_skip_zero_weights():
    """``WeightedParticles.indices``: 200,000 draws over 8 particles (two of zero
    weight) match the weights within 5 binomial SE each, and never pick a zero."""
    torch.manual_seed(8)
    w = torch.tensor([0.3, 0.0, 0.05, 0.2, 0.0, 0.25, 0.15, 0.05], dtype=F64)
    post = WeightedParticles(torch.zeros(1, 8, 1, dtype=F64), w.log().unsqueeze(0))
    n = 200_000
    freq = torch.bincount(post.indices(n)[0], minlength=8).to(F64) / n
    se = (w * (1 - w) / n).sqrt()
    assert (freq[w == 0] == 0).all(), freq
    assert ((freq - w).abs() <= 5 * se + 1e-12).all(), (freq, w)


def test_systematic_resampling_gives_floor_or_ceil_of_k_w():
    torch.manual_seed(7)
    k = 40
    log_w = _random_log_weights(500, k, 2)
    counts = torch.zeros(500, k, dtype=F64).scatter_add_(
        1, systematic_resample(log_w), torch.ones(500, k, dtype=F64)
    )
    expected = k * log_w.exp()
    assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()
    assert (counts.sum(-1) == k).all()


def test_rbf_kernel_uses_the_median_bandwidth():
    x = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=F64)
    kern, h = rbf_kernel(x)
    # squared distances 0,1,9 / 1,0,4 / 9,4,0: median 1, h = 1 / log 4
    assert float(h) == pytest.approx(1.0 / math.log(4.0))
    assert float(kern[0, 0, 2]) == pytest.approx(math.exp(-9.0 * math.log(4.0)))


# ---- weight collapse -----------------------------------------------------------------


class BrokenValue:
    """Q̂ = −inf (or NaN) everywhere: every weight vanishes."""

    def __init__(self, fill):
        self.fill = fill

    def __call__(self, s, a):
        return torch.full(a.shape[:-1], self.fill, dtype=a.dtype)


@pytest.mark.parametrize("fill", [-math.inf, math.nan])
@pytest.mark.parametrize("name", ["importance", "smc", "mppi", "cem"])
def test_weight_collapse_falls_back_to_uniform_and_is_counted(name, fill):
    torch.manual_seed(8)
    engine = {
        "importance": ImportanceSampling(16),
        "smc": SMC(16, horizon=2, model=ShiftWorld()),
        "mppi": MPPI(16, 2, horizon=2, model=ShiftWorld()),
        "cem": CEM(16, 4, 2, horizon=2, model=ShiftWorld()),
    }[name]
    engine = _engine(engine)
    s = torch.full((3, 1), S0, dtype=F64)
    objective = TrajectoryObjective(s, BrokenValue(fill), _prior(), ALPHA)
    post = engine.infer(s, objective)
    assert post.collapsed.all()
    torch.testing.assert_close(post.weights, torch.full_like(post.weights, 1 / post.n_particles))
    assert torch.isfinite(post.mean_action()).all() and torch.isfinite(post.sample(5)).all()
    _, metrics = engine.loss(s, objective)
    assert float(metrics["collapsed"]) == 1.0


def test_nan_particles_are_dropped_not_averaged():
    a = torch.tensor([[[0.1], [0.5], [-0.3]]])
    post = WeightedParticles(a, torch.tensor([[0.0, math.nan, 0.0]]))
    assert not post.collapsed.any()
    torch.testing.assert_close(post.weights, torch.tensor([[0.5, 0.0, 0.5]]))
    torch.testing.assert_close(post.mean_action(), torch.tensor([[-0.1]]))
    best = WeightedParticles(a, torch.tensor([[0.0, 2.0, 1.0]]), mode="best")
    torch.testing.assert_close(best.mean_action(), torch.tensor([[0.5]]))
    with pytest.raises(NotImplementedError, match="no density"):
        post.log_prob(a)
    with pytest.raises(NotImplementedError, match="no proposal density"):
        post.kl(TanhGaussian(torch.zeros(1, 1), torch.zeros(1, 1)))


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ImportanceSampling(n_particles=0), "ImportanceSampling: n_particles must be >= 1"),
        (lambda: SVGD(n_particles=0), "SVGD: n_particles must be >= 1"),
        (lambda: SVGD(step_size=0.0), "SVGD: step_size must be > 0"),
        (lambda: SMC(n_particles=0), "SMC: n_particles must be >= 1"),
        (lambda: SMC(horizon=0), "SMC: horizon must be >= 1"),
        (lambda: SMC(ess_threshold=0.0), r"SMC: ess_threshold must lie in \(0, 1\]"),
        (lambda: SMC(ess_threshold=1.5), r"SMC: ess_threshold must lie in \(0, 1\]"),
        (lambda: SMC(resample="stratified"), "SMC: resample must be one of systematic"),
        (lambda: MPPI(population=0), "MPPI: population must be >= 1"),
        (lambda: MPPI(horizon=0), "MPPI: horizon must be >= 1"),
        (lambda: MPPI(temperature=0.0), "MPPI: temperature must be > 0"),
        (lambda: MPPI(temperature=-1.0), "MPPI: temperature must be > 0"),
        (lambda: MPPI(elites=300, population=256), r"MPPI: elites must lie in \[1, population"),
        (lambda: CEM(population=0, elites=1), "CEM: population must be >= 1"),
        (lambda: CEM(horizon=0), "CEM: horizon must be >= 1"),
        (lambda: CEM(elites=0), r"CEM: elites must lie in \[1, population=256\]"),
        (lambda: CEM(momentum=1.0), r"CEM: momentum must lie in \[0, 1\)"),
        (lambda: CEM(init_std=0.0), "CEM: init_std must be > 0"),
        (lambda: ImportanceSampling(mode="median"), "mode must be 'mean'"),
    ],
)
def test_bad_options_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("engine", [SMC(horizon=3), MPPI(horizon=2), CEM(horizon=2)])
def test_planning_ahead_with_a_model_free_value_asks_for_a_model(engine):
    engine = _engine(engine)
    objective = model_free_objective(2)
    name = type(engine).__name__
    message = (
        f"{name}: a horizon of .* is model-free; use a model-based value .* or pass an "
        f"explicit model to {name}"
    )
    with pytest.raises(ConfigError, match=message):
        engine.check_value(objective.value)  # at configuration time
    with pytest.raises(ConfigError, match=message):
        engine.infer(objective.states, objective)
    engine.check_value(model_based_objective(2).value)  # a model-based value is fine


# ---- warm start ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MPPI, CEM])
def test_plan_state_shifts_and_resets(cls):
    torch.manual_seed(9)
    engine = _engine(cls(population=32, iterations=2, horizon=4))
    objective = model_based_objective(3)
    state = engine.init_plan_state(3, dtype=F64)
    engine.infer(objective.states, objective, state)
    plan = state["plan"].clone()
    torch.testing.assert_close(state["mean"][:, :-1], plan[:, 1:])
    assert (state["mean"][:, -1] == 0).all()
    # The next call starts from the shifted plan: with no search noise and one round
    # it must return exactly that plan's first action.
    start = state["mean"].clone()
    engine.init_std = 1e-12
    engine.infer(objective.states, objective, state)
    torch.testing.assert_close(state["plan"][:, 0], start[:, 0], atol=1e-9, rtol=0)
    # One row's episode ends: only that row starts afresh.
    engine.reset_plan_state(state, torch.tensor([False, True, False]))
    assert (state["mean"][1] == 0).all() and (state["mean"][0] != 0).any()
    engine.reset_plan_state(state)
    fresh = engine.init_plan_state(3, dtype=F64)
    assert state.keys() == fresh.keys()
    for key in fresh:
        torch.testing.assert_close(state[key], fresh[key])
    with pytest.raises(ValueError, match=r"plan state mean must be \[2, 4, 1\]"):
        engine.infer(objective.states[:2], objective.subset(slice(0, 2)), state)


# ---- with an amortised proposal ---------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda p: ImportanceSampling(8, proposal=p), lambda p: SVGD(8, 2, proposal=p),
             lambda p: SMC(8, 2, proposal=p, model=ShiftWorld()),
             lambda p: MPPI(8, 1, horizon=2, proposal=p, model=ShiftWorld()),
             lambda p: CEM(8, 2, 1, horizon=2, proposal=p, model=ShiftWorld())],
    ids=["importance", "svgd", "smc", "mppi", "cem"],
)  # fmt: skip
def test_a_proposal_trains_through_loss_and_serves_the_td_target(make):
    proposal = Direct(hidden=(8,))
    engine = _engine(make(proposal))
    assert engine.amortised and not _engine(make(None)).amortised
    objective = model_free_objective(5)
    s = objective.states
    torch.manual_seed(10)
    loss, metrics = engine.loss(s, objective)
    torch.manual_seed(10)
    expected, _ = proposal.loss(s, objective)
    torch.testing.assert_close(loss, expected)
    td = engine.td_posterior(s, objective)
    torch.testing.assert_close(td.loc, proposal.infer(s).loc)
    # a plain planner's loss is zero, with the particles' summary as metrics
    plain = _engine(make(None))
    loss, metrics = plain.loss(s, objective)
    assert loss == 0 and metrics["kl"].shape == (5,) and metrics["loc"].shape == (5, 1)


def test_particle_metrics_fall_back_to_the_moment_matched_kl():
    """SVGD's particles carry no proposal density: the metric KL is the moment-matched
    tanh-Gaussian's, in closed form against a tanh-Gaussian prior."""
    objective = model_free_objective(4)
    post = _engine(SVGD(16, 5)).infer(objective.states, objective)
    metrics = particle_metrics(post, objective)
    fitted = post.moment_match()
    torch.testing.assert_close(metrics["kl"], fitted.kl(objective.prior_dist))
    uniform = UniformPrior()
    uniform.build(1, 1)
    flat = TrajectoryObjective(objective.states, QuadraticLeaf(), uniform.to(F64), ALPHA)
    assert torch.isfinite(particle_metrics(post, flat)["kl"]).all()
