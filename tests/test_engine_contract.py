"""Every inference engine honours the interface of planners/base.py (DESIGN §3)."""

import pytest
import torch

from mbvi import LearnedPrior, VariationalAgent
from mbvi.errors import ConfigError
from mbvi.planners import (
    CEM,
    MPPI,
    SMC,
    SVGD,
    Direct,
    GradientRefinement,
    ImportanceSampling,
    Iterative,
)
from mbvi.variational.distributions import Posterior, TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from tests.conftest import TINY_AGENT
from tests.toy_world import LinearWorld

OBS, ACT, B = 5, 3, 8


def quadratic_value(s, a):
    """Q(s, a) = −‖a − 0.5‖²: known optimum, no parameters."""
    return -((a - 0.5) ** 2).sum(-1)


ENGINES = {
    "direct": lambda: Direct(hidden=(16, 16)),
    "iterative": lambda: Iterative(
        hidden=(16, 16), iterations=2, n_samples=8, init_loc=0.0, init_log_scale=0.0
    ),
    "gradient": lambda: GradientRefinement(steps=5, n_samples=8, init_loc=0.0, init_log_scale=0.0),
    "importance": lambda: ImportanceSampling(n_particles=16),
    "svgd": lambda: SVGD(n_particles=8, steps=3),
    "smc": lambda: SMC(n_particles=16, horizon=2, model=LinearWorld()),
    "smc+direct": lambda: SMC(
        n_particles=16, horizon=2, model=LinearWorld(), proposal=Direct(hidden=(16, 16))
    ),
    "mppi": lambda: MPPI(population=16, iterations=2, horizon=2, model=LinearWorld()),
    "cem": lambda: CEM(population=16, elites=4, iterations=2, horizon=2, model=LinearWorld()),
}


def summary(posterior: Posterior) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, log_scale) [B,A] naming a posterior: a tanh-Gaussian's own, or the
    tanh-Gaussian moment-matched to weighted particles."""
    if not isinstance(posterior, TanhGaussian):
        posterior = posterior.moment_match()
    return posterior.loc, posterior.log_scale


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    torch.manual_seed(0)
    e = ENGINES[request.param]()
    e.build(OBS, ACT)
    return e


@pytest.fixture(params=[UniformPrior, ConstantTanhGaussianPrior])
def objective_for(request):
    prior = request.param()
    prior.build(OBS, ACT)
    return lambda s: TrajectoryObjective(s, quadratic_value, prior, alpha=0.1)


def test_infer_shapes_bounds_and_inputs_untouched(engine, objective_for):
    s = torch.randn(B, OBS)
    s_copy = s.clone()
    post = engine.infer(s, objective_for(s))
    assert isinstance(post, Posterior)
    mean = post.mean_action()
    assert mean.shape == (B, ACT) and torch.isfinite(mean).all() and (mean.abs() <= 1).all()
    a = post.sample(4)
    assert a.shape == (B, 4, ACT) and torch.isfinite(a).all() and (a.abs() <= 1).all()
    loc, log_scale = summary(post)
    assert loc.shape == log_scale.shape == (B, ACT)
    assert torch.isfinite(loc).all() and torch.isfinite(log_scale).all()
    assert torch.equal(s, s_copy)


def test_deterministic_under_a_seed(engine, objective_for):
    s = torch.randn(B, OBS)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        post = engine.infer(s, objective_for(s))
        runs.append((post.mean_action(), post.sample(3), *summary(post)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_amortised_loss_trains_only_the_engine(engine, objective_for):
    if not engine.amortised:
        pytest.skip("non-amortised engines have no loss")
    s = torch.randn(B, OBS)
    loss, metrics = engine.loss(s, objective_for(s))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert metrics["kl"].shape == (B,)
    loss.backward()
    assert any(p.grad is not None for p in engine.parameters())


def test_loss_metrics_name_the_posterior_of_the_td_target(engine, objective_for):
    """Every engine's loss reports α's ``kl`` and the posterior it is about (a learned
    prior is fitted to it): under one seed, the very posterior that ``td_posterior``
    returns (``infer``'s, except for a planner with an amortised proposal, whose loss
    and TD target are the proposal's), summarised by ``summary``."""
    s = torch.randn(B, OBS)
    torch.manual_seed(2)
    _, metrics = engine.loss(s, objective_for(s))
    torch.manual_seed(2)
    expected = summary(engine.td_posterior(s, objective_for(s)))
    assert metrics["kl"].shape == (B,)
    for name, value in zip(("loc", "log_scale"), expected):
        assert not metrics[name].requires_grad
        torch.testing.assert_close(metrics[name], value.detach())


def test_rejects_states_of_the_wrong_shape(engine, objective_for):
    with pytest.raises(ValueError, match=r"states must have shape \[B, 5\], got \(8, 4\)"):
        s = torch.randn(B, OBS - 1)
        engine.infer(s, objective_for(torch.randn(B, OBS)))


class ForgetfulDirect(Direct):
    """A user's engine whose loss metrics leave out what the agent needs."""

    def __init__(self, drop: tuple[str, ...]):
        super().__init__(hidden=(16, 16))
        self.drop = drop

    def loss(self, s, objective):
        loss, metrics = super().loss(s, objective)
        return loss, {k: v for k, v in metrics.items() if k not in self.drop}


@pytest.mark.parametrize(
    "drop, prior, missing",
    [(("kl",), UniformPrior, "'kl'"), (("loc", "log_scale"), LearnedPrior, "'loc'")],
)
def test_an_engine_without_the_needed_metrics_gets_a_clear_error(drop, prior, missing):
    agent = VariationalAgent(
        "Pendulum-v1", prior=prior(), engine=ForgetfulDirect(drop), **TINY_AGENT
    )
    agent.setup("fit")
    agent.configure_optimizers()
    for _ in range(64):
        agent._act_and_store()
    agent.optimizers = lambda use_pl_optimizer=True: None  # fails only after the check
    with pytest.raises(ConfigError, match=f"ForgetfulDirect.loss returned no {missing} metric"):
        agent.update(*agent.buffer.sample(32))
