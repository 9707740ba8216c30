"""The learned prior: M-step fit, MPO-style trust regions, isolation from the E-step."""

import pytest
import torch
from lightning.pytorch.loggers import Logger

from mbvi import ConfigError, LearnedPrior, TrajectoryObjective, TwinQ, VariationalAgent
from mbvi.planners import Direct
from mbvi.variational.distributions import TanhGaussian
from tests.conftest import PENDULUM_THRESHOLD, TINY_AGENT, fit_agent, pendulum_eval_return

OBS, ACT, BATCH = 3, 2, 64


def _posterior(s: torch.Tensor) -> TanhGaussian:
    """A fixed, state-dependent posterior far from the prior's start tanh(N(0, 1))."""
    loc = 1.5 * torch.sin(2.0 * s[:, :ACT])
    return TanhGaussian(loc, torch.full_like(loc, -1.5))


def _prior(**kw) -> LearnedPrior:
    torch.manual_seed(0)
    prior = LearnedPrior(hidden=(32, 32), **kw)
    prior.build(OBS, ACT)
    return prior


def _train(prior: LearnedPrior, steps: int, lr: float = 1e-3) -> list[dict[str, float]]:
    """Drive ``prior.loss`` against the fixed posterior as the agent does: one Adam step
    on every trainable parameter, then ``update_target``.  Returns the metrics."""
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        s = torch.randn(BATCH, OBS, generator=gen)
        loss, metrics = prior.loss(s, _posterior(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        prior.update_target()
        history.append({k: v.item() for k, v in metrics.items()})
    return history


def _mean(history: list[dict[str, float]], key: str) -> float:
    return sum(h[key] for h in history) / len(history)


# A prior whose multipliers sit at their floor (1e-3) and never rise: no trust region.
UNCONSTRAINED = dict(eps_mean=1e9, eps_scale=1e9, init_eta_mean=1e-3, init_eta_scale=1e-3)


def test_prior_starts_broad_and_the_same_at_every_state():
    prior = _prior(init_scale=1.0)
    dist = prior.distribution(torch.randn(5, OBS))
    torch.testing.assert_close(dist.loc, torch.zeros(5, ACT))
    torch.testing.assert_close(dist.log_scale, torch.zeros(5, ACT), atol=1e-6, rtol=0)


def test_kl_to_a_fixed_posterior_decreases():
    prior = _prior(tau=0.05, eps_mean=0.1, eps_scale=1e-2)
    history = _train(prior, 300)
    first, last = history[0]["kl_posterior"], _mean(history[-20:], "kl_posterior")
    assert last < 0.5 * first, f"KL(π‖p_θ) went from {first:.3f} to {last:.3f}"
    # The target follows the online prior, so it has moved towards the posterior too.
    s = torch.randn(256, OBS)
    kl_target = _posterior(s).kl(prior.distribution(s)).mean().item()
    assert kl_target < 0.7 * first


def test_trust_regions_hold_on_average_and_are_active():
    eps_mean, eps_scale = 0.01, 1e-4
    # The first 200 updates let the multipliers settle: η starts at 1 and 10, and first
    # decays while p_θ == p̄ leaves both constraints slack.
    constrained = _train(_prior(eps_mean=eps_mean, eps_scale=eps_scale), 400)[200:]
    free = _train(_prior(**UNCONSTRAINED), 400)[200:]
    # KL(p̄ ‖ p_θ) per action dim, decoupled into mean and scale parts, after each step.
    # Dual ascent holds each at its bound, up to the multiplier's oscillation around it.
    assert _mean(constrained, "kl_mean") <= 1.25 * eps_mean
    assert _mean(constrained, "kl_scale") <= 1.25 * eps_scale
    # And at every single step within a small factor (a Lagrangian bound is soft: the
    # multiplier reacts to a violation one step late).
    assert max(h["kl_mean"] for h in constrained) <= 2 * eps_mean
    assert max(h["kl_scale"] for h in constrained) <= 3 * eps_scale
    # Without the multipliers the same optimiser moves p_θ much further from p̄.
    assert _mean(free, "kl_mean") > 5 * eps_mean
    assert _mean(free, "kl_scale") > 100 * eps_scale
    # The multipliers rose to hold the scale, which the fit pulls hardest on.
    assert constrained[-1]["eta_scale"] > 10.0


def test_dual_ascent_raises_eta_only_while_its_constraint_is_violated():
    prior = _prior(eps_mean=0.01, eps_scale=1e-4)
    s = torch.randn(BATCH, OBS)
    # p_θ == p̄ at the start: both constraints hold, so descending lowers both η.
    prior.loss(s, _posterior(s))[0].backward()
    assert prior.rho_mean.grad.item() > 0 and prior.rho_scale.grad.item() > 0
    prior.zero_grad()
    with torch.no_grad():  # move p_θ's mean and scale well outside both trust regions
        prior.net.net[-1].bias.add_(1.0)
    prior.loss(s, _posterior(s))[0].backward()
    assert prior.rho_mean.grad.item() < 0 and prior.rho_scale.grad.item() < 0
    assert all(p.grad is None for p in prior.target_net.parameters())


def test_engine_loss_does_not_reach_the_prior():
    prior = _prior()
    engine = Direct(hidden=(32, 32))
    engine.build(OBS, ACT)
    s = torch.randn(BATCH, OBS)
    objective = TrajectoryObjective(s, lambda s_, a: -a.pow(2).sum(-1), prior, alpha=0.5)
    loss, _ = engine.loss(s, objective)
    loss.backward()
    assert all(p.grad is not None for p in engine.parameters())
    assert all(p.grad is None for p in prior.parameters())


def test_prior_loss_reaches_only_the_online_network_and_multipliers():
    prior = _prior()
    with torch.no_grad():
        prior.net.net[-1].bias.add_(0.3)  # a gradient for every layer, not only the last
    s = torch.randn(BATCH, OBS)
    loss, metrics = prior.loss(s, _posterior(s))
    loss.backward()
    assert all(p.grad is not None for p in prior.net.parameters())
    assert prior.rho_mean.grad is not None and prior.rho_scale.grad is not None
    assert all(not p.requires_grad for p in prior.target_net.parameters())
    assert set(metrics) == {"kl_posterior", "kl_mean", "kl_scale", "eta_mean", "eta_scale"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize(
    "option, value",
    [
        ("eps_mean", 0.0),
        ("eps_scale", -1e-4),
        ("tau", 0.0),
        ("tau", 1.5),
        ("init_eta_mean", 0.0),
        ("init_eta_scale", -1.0),
        ("init_scale", 0.0),
        ("dual_lr_scale", 0.0),
    ],
)
def test_bad_options_raise_config_error_naming_the_option(option, value):
    with pytest.raises(ConfigError, match=rf"LearnedPrior {option} must be"):
        LearnedPrior(**{option: value})


class _ListLogger(Logger):
    """Keeps logged metrics in memory (MLflow's store costs seconds to set up)."""

    name, version = "list", 0
    metrics: list[tuple[int, dict[str, float]]]

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_agent_trains_the_prior_and_logs_its_metrics(tmp_path):
    torch.manual_seed(0)
    prior = LearnedPrior(hidden=(32, 32))
    agent = VariationalAgent(
        "Pendulum-v1",
        prior=prior,
        engine=Direct(hidden=(32, 32)),
        value=TwinQ(hidden=(32, 32)),
        **{**TINY_AGENT, "total_env_steps": 150, "checkpoint_every": 10_000},
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    assert agent.kl_target == prior.default_kl_target()  # Pendulum: one action dim
    target_before = [p.clone() for p in prior.target_net.parameters()]
    logger = _ListLogger()
    fit_agent(agent, tmp_path, logger)
    assert any(not torch.equal(a, b) for a, b in zip(target_before, prior.target_net.parameters()))
    for key in ["kl_posterior", "kl_mean", "kl_scale", "eta_mean", "eta_scale"]:
        steps = [step for step, metrics in logger.metrics if f"prior/{key}" in metrics]
        assert steps == [150], key


@pytest.mark.slow
def test_learned_prior_learns_pendulum(workdir):
    """The "learned prior, parametric posterior" cell of Table 1 through the real CLI."""
    final = pendulum_eval_return(workdir, "learned_prior.yaml")
    assert final >= PENDULUM_THRESHOLD, f"eval/return {final:.1f} after 5000 env steps"
