"""The sampling planners (ImportanceSampling, SVGD, SMC, MPPI, CEM) against the
closed-form posterior of the linear-quadratic problem in ``tests.lq_problem``."""

import math

import pytest
import torch

from mbvi.planners import CEM, MPPI, SMC, SVGD, ImportanceSampling
from mbvi.planners._sampling import (
    plan_world,
    sequence_returns,
)
from tests.lq_problem import (
    ALPHA,
    C_Q,
    C_S,
    C_U,
    F64,
    GAMMA,
    S0,
    SIGMA_P,
    FixedProposal,
    _assert_matches,
    _engine,
    _moments,
    exact_posterior,
    model_based_objective,
    model_free_objective,
)

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
