"""The sampling planners (ImportanceSampling, SVGD, SMC, MPPI, CEM) and
``WeightedParticles``, checked against a linear-quadratic problem whose Boltzmann
posterior is Gaussian in closed form.

The problem is exact in pre-tanh space u = atanh(a), where tanh's Jacobian is shared
by prior and posterior and so cancels:

    prior      p(u_t) = N(0, σ_p²)                  (ConstantTanhGaussianPrior(0, σ_p))
    world      s' = s + u,  r = −C_S s² − C_U u²    (``ShiftWorld``, deterministic)
    leaf       Q(s, a) = −C_Q (s + u)²              (``QuadraticLeaf``)

so the trajectory posterior Π_t p(u_t) exp(G/α) over u_{0:H-1}, with G the discounted
return of ``_sampling.sequence_returns``, is a Gaussian whose mean and covariance
``exact_posterior`` computes from G's gradient and Hessian (G written out by hand).
At H = 1 it is Eq. 11 with the model-free value Q.
"""

import math
from functools import partial

import pytest
import torch

from mbvi.errors import ConfigError
from mbvi.planners import CEM, MPPI, SMC, SVGD, Direct, ImportanceSampling, InferenceEngine
from mbvi.planners._sampling import (
    multinomial_resample,
    particle_metrics,
    plan_world,
    rbf_kernel,
    sequence_returns,
    systematic_resample,
)
from mbvi.variational.distributions import TanhGaussian, atanh
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.values import ValueEstimate
from mbvi.variational.world_model import Step, WorldModel

C_S, C_U, C_Q, SIGMA_P, ALPHA, GAMMA, S0 = 0.5, 0.2, 1.0, 0.6, 1.0, 0.9, 1.0
F64 = torch.float64


class ShiftWorld(WorldModel):
    """s' = s + atanh(a), r = −C_S s² − C_U atanh(a)²: linear-quadratic in u."""

    def step(self, s, a, propagation="ts1", generator=None) -> Step:
        u = atanh(a)
        reward = -C_S * s.pow(2).sum(-1) - C_U * u.pow(2).sum(-1)
        return Step(s + u, reward, torch.zeros_like(reward))


class QuadraticLeaf(ValueEstimate):
    """Q(s, a) = −C_Q (s + atanh(a))²: the value of the state the action leads to."""

    def forward(self, s, a, frozen=False):
        return -C_Q * (s.unsqueeze(-2) + atanh(a)).pow(2).sum(-1)


def _prior(dtype=F64):
    prior = ConstantTanhGaussianPrior(0.0, SIGMA_P)
    prior.build(1, 1)
    return prior.to(dtype)


def model_free_objective(b: int) -> TrajectoryObjective:
    """Eq. 11 with Q = ``QuadraticLeaf`` at b identical states s = S0 (replicates)."""
    s = torch.full((b, 1), S0, dtype=F64)
    return TrajectoryObjective(s, QuadraticLeaf(), _prior(), ALPHA)


def model_based_objective(b: int) -> TrajectoryObjective:
    """The agent's objective over a bound ``ModelBasedValue`` of the toy world."""
    value = ModelBasedValue(model=ShiftWorld(), leaf=QuadraticLeaf(), horizon=1)
    value.build(1, 1)
    prior = _prior()
    value.bind(prior, None, lambda: ALPHA, GAMMA)
    s = torch.full((b, 1), S0, dtype=F64)
    return TrajectoryObjective(s, partial(value, frozen=True), prior, ALPHA)


def exact_posterior(horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [H], covariance [H,H]) of the Gaussian posterior over u_{0:H-1}."""

    def g(u):  # the return of one trajectory, by hand
        s, total = torch.tensor(S0, dtype=F64), 0.0
        for t in range(horizon - 1):
            total = total + GAMMA**t * (-C_S * s**2 - C_U * u[t] ** 2)
            s = s + u[t]
        return total + GAMMA ** (horizon - 1) * (-C_Q * (s + u[-1]) ** 2)

    zero = torch.zeros(horizon, dtype=F64)
    grad = torch.autograd.functional.jacobian(g, zero)
    hess = torch.autograd.functional.hessian(g, zero)  # G(u) = G(0) + grad·u + ½ uᵀ hess u
    precision = torch.eye(horizon, dtype=F64) / SIGMA_P**2 - hess / ALPHA
    cov = torch.linalg.inv(precision)
    return cov @ grad / ALPHA, cov


def _engine(engine: InferenceEngine) -> InferenceEngine:
    engine.build(1, 1)
    return engine.to(F64)


def _moments(post: WeightedParticles) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and variance of u per state, each [B]."""
    u, w = post.u()[..., 0], post.weights
    mean = (w * u).sum(-1)
    return mean, (w * (u - mean.unsqueeze(-1)).pow(2)).sum(-1)


def _assert_matches(post: WeightedParticles, mean: float, var: float, z: float = 4.0):
    """The replicate states' estimates, averaged, equal the exact moments within z
    standard errors of that average (the SE estimated from the replicates' spread).
    Self-normalised weights add an O(1/ESS) bias, below 1% here."""
    est_mean, est_var = _moments(post)
    b = est_mean.shape[0]
    for name, est, exact in (("mean", est_mean, mean), ("variance", est_var, var)):
        se = est.std() / math.sqrt(b)
        assert abs(est.mean() - exact) < z * se + 1e-3 * abs(exact), (name, est.mean(), exact, se)
        assert se < 0.05 * math.sqrt(var), (name, se)  # the check is not vacuous


class FixedProposal(InferenceEngine):
    """An 'amortised' engine whose posterior is a fixed tanh-Gaussian, wider than the
    target and off-centre, so that only correct p/q weights recover the posterior."""

    def __init__(self, loc=0.3, scale=0.9):
        super().__init__()
        self.loc, self.scale = loc, scale
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def infer(self, s, objective=None):
        shape = (s.shape[0], self.act_dim)
        loc = torch.full(shape, self.loc, dtype=s.dtype) + 0.0 * self.bias
        return TanhGaussian(loc, torch.full(shape, math.log(self.scale), dtype=s.dtype))

    def loss(self, s, objective):
        posterior = self.infer(s)
        j, metrics = objective(posterior, 4)
        return -j.mean(), {**metrics, "loc": posterior.loc.detach(),
                           "log_scale": posterior.log_scale.detach()}  # fmt: skip


# ---- analytic: each engine against the closed-form posterior -----------------------------


@pytest.mark.parametrize("proposal", [None, "fixed"])
def test_importance_sampling_matches_the_boltzmann_posterior(proposal):
    torch.manual_seed(0)
    mean, cov = exact_posterior(1)
    q = FixedProposal() if proposal else None
    engine = _engine(ImportanceSampling(n_particles=2000, proposal=q))
    post = engine.infer(model_free_objective(64).states, model_free_objective(64))
    _assert_matches(post, float(mean[0]), float(cov[0, 0]))
    assert not post.collapsed.any()


def test_importance_weights_estimate_the_kl_to_the_prior():
    """KL(π‖p) of two Gaussians in u (= the KL of the tanh-Gaussians) against the
    particles' estimator Σ w (log K w + log q − log p), within 4 SE of the replicates'
    average (the estimator's O(1/K) bias is ~1e-3 here)."""
    torch.manual_seed(1)
    mean, cov = exact_posterior(1)
    m, v = float(mean[0]), float(cov[0, 0])
    exact = 0.5 * (v / SIGMA_P**2 + m**2 / SIGMA_P**2 - 1.0 - math.log(v / SIGMA_P**2))
    objective = model_free_objective(64)
    post = _engine(ImportanceSampling(2000)).infer(objective.states, objective)
    kl = post.kl(objective.prior_dist)
    torch.testing.assert_close(kl, post.kl_to_prior(objective.prior, objective.states))
    se = kl.std() / math.sqrt(kl.shape[0])
    assert abs(kl.mean() - exact) < 4 * se + 3e-3, (kl.mean(), exact, se)


def test_svgd_matches_the_boltzmann_posterior():
    """SVGD's K particles are no independent sample; the tolerance is what K
    independent draws would give: 3 SE of one state's mean (σ/√K) and variance
    (σ²√(2/K)), applied to the replicates' average."""
    torch.manual_seed(2)
    mean, cov = exact_posterior(1)
    m, v, k = float(mean[0]), float(cov[0, 0]), 64
    objective = model_free_objective(16)
    post = _engine(SVGD(n_particles=k, steps=150, step_size=0.05)).infer(
        objective.states, objective
    )
    est_mean, est_var = _moments(post)
    assert abs(est_mean.mean() - m) < 3 * math.sqrt(v / k), (est_mean.mean(), m)
    assert abs(est_var.mean() - v) < 3 * v * math.sqrt(2 / k), (est_var.mean(), v)
    torch.testing.assert_close(post.weights, torch.full_like(post.weights, 1 / k))


@pytest.mark.parametrize(
    "kw",
    [{}, {"resample": "multinomial", "ess_threshold": 0.5}, {"proposal": "fixed"}],
    ids=["systematic-every-step", "multinomial-adaptive", "proposal"],
)
def test_smc_matches_the_trajectory_posterior_marginal(kw):
    """SMC over H = 3 actions through the model: its weighted first actions follow the
    marginal of a_0 under the trajectory posterior (the first row of the joint)."""
    torch.manual_seed(3)
    mean, cov = exact_posterior(3)
    if kw.get("proposal"):
        kw = {**kw, "proposal": FixedProposal()}
    objective = model_based_objective(64)
    post = _engine(SMC(n_particles=2000, horizon=3, **kw)).infer(objective.states, objective)
    _assert_matches(post, float(mean[0]), float(cov[0, 0]))


def test_smc_at_one_action_is_importance_sampling():
    objective = model_free_objective(4)
    torch.manual_seed(4)
    smc = _engine(SMC(n_particles=32, horizon=1)).infer(objective.states, objective)
    torch.manual_seed(4)
    ims = _engine(ImportanceSampling(n_particles=32)).infer(objective.states, objective)
    torch.testing.assert_close(smc.particles, ims.particles)
    torch.testing.assert_close(smc.log_weights, ims.log_weights)


def optimal_plan(horizon: int) -> torch.Tensor:
    """argmax over u_{0:H-1} of the planners' score G + α Σ_t log p(a_t), with p the
    prior's density of the *action* a = tanh(u) (so the tanh Jacobian does not cancel
    here): Newton's method from the posterior mean, [H]."""
    mean, _ = exact_posterior(horizon)

    def score(u):
        s, total = torch.tensor(S0, dtype=F64), 0.0
        for t in range(horizon - 1):
            total = total + GAMMA**t * (-C_S * s**2 - C_U * u[t] ** 2)
            s = s + u[t]
        total = total + GAMMA ** (horizon - 1) * (-C_Q * (s + u[-1]) ** 2)
        log_p = -0.5 * (u / SIGMA_P) ** 2 - torch.log1p(-(torch.tanh(u) ** 2))
        return total + ALPHA * log_p.sum()

    u = mean.clone()
    for _ in range(30):
        grad = torch.autograd.functional.jacobian(score, u)
        u = u - torch.linalg.solve(torch.autograd.functional.hessian(score, u), grad)
    assert torch.autograd.functional.jacobian(score, u).abs().max() < 1e-10
    return u


def test_cem_finds_the_optimal_plan():
    """CEM reaches the best sequence of H = 3 actions through the model (every step
    of the plan) and acts on its first action."""
    torch.manual_seed(5)
    best = optimal_plan(3)
    engine = _engine(CEM(population=256, elites=32, iterations=12, horizon=3))
    objective = model_based_objective(8)
    state = engine.init_plan_state(8, dtype=F64)
    post = engine.infer(objective.states, objective, state)
    torch.testing.assert_close(state["plan"], best.expand(8, 3).unsqueeze(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(
        post.mean_action(), torch.tanh(best[0]).expand(8, 1), atol=0.03, rtol=0
    )


def test_mppi_finds_the_optimal_plan():
    """At a small temperature MPPI's plan is the best sequence plus the noise of a
    weighted mean of its last population: over 32 replicate states the average plan
    is the best one within 4 SE (from the replicates' spread), plus 0.01 for the
    O(λ) pull of a non-quadratic score; no single plan strays beyond 0.1."""
    torch.manual_seed(5)
    best = optimal_plan(3)
    engine = _engine(MPPI(population=1024, iterations=12, temperature=0.1, horizon=3))
    objective = model_based_objective(32)
    state = engine.init_plan_state(32, dtype=F64)
    engine.infer(objective.states, objective, state)
    plans = state["plan"][..., 0]  # [B,H]
    se = plans.std(0) / math.sqrt(plans.shape[0])
    assert ((plans.mean(0) - best).abs() < 4 * se + 0.01).all(), (plans.mean(0), best, se)
    assert (plans - best).abs().max() < 0.1


def test_sequence_returns_score_the_hand_written_return():
    """One sequence's score is G + α Σ log p(a_t), G as in ``exact_posterior``."""
    objective = model_based_objective(1)
    world = plan_world(objective.value, "test", 3, None, 0.5)
    assert world.gamma == GAMMA  # the bound value's γ wins
    u = torch.tensor([[[[0.3], [-0.2], [0.1]]]], dtype=F64)
    s, g = S0, 0.0
    for t in range(2):
        g += GAMMA**t * (-C_S * s**2 - C_U * float(u[0, 0, t, 0]) ** 2)
        s += float(u[0, 0, t, 0])
    g += GAMMA**2 * (-C_Q * (s + float(u[0, 0, 2, 0])) ** 2)
    log_p = objective.prior_dist.log_prob_u(u[0, :, :, :].transpose(0, 1)).sum()
    got = sequence_returns(objective, world, torch.tanh(u), u)
    torch.testing.assert_close(got, torch.tensor([[g + ALPHA * float(log_p)]], dtype=F64))


def test_one_action_model_free_score_is_action_values():
    objective = model_free_objective(3)
    world = plan_world(objective.value, "test", 1, None, GAMMA)
    u = torch.randn(3, 5, 1, 1, dtype=F64)
    got = sequence_returns(objective, world, torch.tanh(u), u)
    torch.testing.assert_close(got, objective.action_values(torch.tanh(u[:, :, 0]), u[:, :, 0]))


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
