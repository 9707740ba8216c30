"""Non-amortised gradient refinement: the amortisation-gap reference, checked against
the closed-form optimum of ``quadratic.py``."""

from functools import partial

import pytest
import torch

from mbvi.errors import ConfigError
from mbvi.planners import GradientRefinement
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import UniformPrior
from mbvi.variational.values import TwinQ

try:  # tests/ imported as a package (tests/__init__.py) or as a plain folder
    from tests.quadratic import exact_j, make_objective, optimum
except ModuleNotFoundError:
    from quadratic import exact_j, make_objective, optimum

S, A = 3, 2


def _engine(**kw) -> GradientRefinement:
    engine = GradientRefinement(**kw)
    engine.build(S, A)
    return engine


@pytest.mark.parametrize(
    "kw, option",
    [({"steps": 0}, "steps"), ({"n_samples": 0}, "n_samples"), ({"lr": 0.0}, "lr"),
     ({"init_log_scale": -20.0}, "init_log_scale")],
)  # fmt: skip
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(ConfigError, match=option):
        GradientRefinement(**kw)


def test_uniform_prior_without_init_params_is_a_config_error():
    prior = UniformPrior()
    prior.build(S, A)
    with pytest.raises(ConfigError, match="init_loc and init_log_scale"):
        _engine().check_prior(prior)
    s = torch.randn(2, S)
    with pytest.raises(ConfigError, match="init_loc and init_log_scale"):
        _engine().infer(s, TrajectoryObjective(s, lambda s, a: -a.pow(2).sum(-1), prior, 1.0))


def test_refining_the_optimum_loses_almost_nothing():
    """The amortisation gap starts refinement at an engine's estimate: at an optimal
    one it must stay near 0, not drift below (a constant Adam step loses ~4e-3 here)."""
    torch.manual_seed(0)
    objective, m = make_objective(256, S, A)
    loc_star, log_scale_star = optimum(m)
    refined = _engine().refine(
        objective.states, objective, init=TanhGaussian(loc_star, log_scale_star)
    )
    change = exact_j(m, refined.loc, refined.log_scale) - exact_j(m, loc_star, log_scale_star)
    assert change.mean() > -2e-3, change.mean()


def test_converges_to_the_closed_form_optimum():
    torch.manual_seed(0)
    objective, m = make_objective(64, S, A, dtype=torch.float64)
    posterior = _engine(steps=300, lr=0.03, n_samples=256).infer(objective.states, objective)
    loc_star, log_scale_star = optimum(m)
    assert (posterior.loc - loc_star).abs().max() < 0.06
    assert (posterior.log_scale - log_scale_star).abs().max() < 0.06
    gap = exact_j(m, loc_star, log_scale_star) - exact_j(m, posterior.loc, posterior.log_scale)
    assert gap.max() < 5e-3 and gap.min() > -1e-12  # J̃* is the maximum


def test_objective_improves_with_more_steps():
    objective, m = make_objective(32, S, A, dtype=torch.float64)
    j = []
    for steps in (1, 10, 30, 100):
        torch.manual_seed(0)
        posterior = _engine(steps=steps).infer(objective.states, objective)
        j.append(exact_j(m, posterior.loc, posterior.log_scale).mean().item())
    assert all(b > a for a, b in zip(j, j[1:], strict=False)), j
    assert j[-1] > exact_j(m, *optimum(m)).mean().item() - 0.01, j


def test_refine_from_a_given_posterior():
    torch.manual_seed(0)
    objective, m = make_objective(16, S, A, dtype=torch.float64)
    bad = TanhGaussian(-optimum(m)[0], torch.full_like(m, -2.0))
    refined = _engine(steps=100).refine(objective.states, objective, init=bad)
    assert (exact_j(m, refined.loc, refined.log_scale) > exact_j(m, bad.loc, bad.log_scale)).all()
    assert not refined.loc.requires_grad
    with pytest.raises(ValueError, match="init must be"):
        _engine().refine(objective.states, objective, init=TanhGaussian(m[:3], m[:3]))


def test_value_parameters_untouched_and_loss_reports_kl():
    q = TwinQ(hidden=(16, 16))
    q.build(S, A)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    prior = UniformPrior()
    prior.build(S, A)
    s = torch.randn(5, S)
    engine = _engine(steps=5, n_samples=8, init_loc=0.0, init_log_scale=0.0)
    engine.infer(s, TrajectoryObjective(s, q, prior, 0.5))  # an unfrozen value is still untouched
    loss, metrics = engine.loss(s, TrajectoryObjective(s, partial(q, frozen=True), prior, 0.5))
    assert loss.item() == 0.0 and metrics["kl"].shape == (5,)
    assert all(p.grad is None for p in q.parameters())
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
