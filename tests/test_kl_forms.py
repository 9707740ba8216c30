"""The KL form under the uniform prior (Eq. 7's per-step α A log 2 against SAC's
entropy bonus), the α target (KL or SAC's entropy procedure) and the critic the TD
target's posterior is inferred against, each checked against SAC written out by hand."""

import math
from functools import partial

import pytest
import torch
from mlflow import MlflowClient
from torch.distributions import Normal
from torch.distributions.transforms import TanhTransform

from mbvi.errors import ConfigError
from mbvi.planners import Direct, Iterative
from mbvi.training.agent import VariationalAgent
from mbvi.training.m_step import m_step_losses, td_target
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective, entropy_alpha_loss
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.values import TwinQ
from tests.conftest import CONFIGS, run_cli_in_process
from tests.toy_world import LinearWorld

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")

S, A, B = 3, 2, 6
GAMMA = 0.9
TERM = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])


def _parts(prior, engine=None, seed=0):
    torch.manual_seed(seed)
    value, engine = TwinQ(hidden=(16,)), engine if engine is not None else Direct(hidden=(16,))
    for part in (value, engine, prior):
        part.build(S, A)
    with torch.no_grad():  # target critics unlike the online ones, so a mix-up shows
        for p in value.q_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return value, engine, prior


def _batch():
    g = torch.Generator().manual_seed(1)
    s, s2 = torch.randn(B, S, generator=g), torch.randn(B, S, generator=g)
    a = torch.rand(B, A, generator=g) * 2 - 1
    return s, a, torch.randn(B, generator=g), s2, TERM


def _sac_sample(engine, s):
    """SAC's action and log π at states ``s`` (Haarnoja et al. 2018c, Appendix C),
    written with torch.distributions: one reparameterised draw, the log-density of u
    minus the log-determinant of tanh."""
    loc, log_scale = engine.net(s)
    u = loc + log_scale.exp() * torch.randn(B, 1, A)[:, 0]
    a = torch.tanh(u)
    log_pi = Normal(loc, log_scale.exp()).log_prob(u).sum(-1)
    log_pi = log_pi - TanhTransform().log_abs_det_jacobian(u, a).sum(-1)
    return a, log_pi


def _min_q(net, s, a):
    return net(s, a.unsqueeze(1)).min(0).values[:, 0]


def test_terminal_td_target_in_the_entropy_and_kl_forms():
    """Eq. 7's form charges α A log 2 on every step that bootstraps and nothing on a
    terminal one, so the KL form's targets sit below the entropy form's by exactly
    γ α A log 2 on non-terminal transitions: the cost a termination saves."""
    value, engine, prior = _parts(UniformPrior())
    _, _, r, s2, term = _batch()
    alpha = torch.tensor(0.3)
    targets = {}
    for form in ("entropy", "kl"):
        prior.set_kl_form(form)
        torch.manual_seed(7)
        targets[form] = td_target(value, engine, prior, alpha, GAMMA, r, s2, term)
    gap = GAMMA * alpha * A * math.log(2.0) * (1.0 - term)
    torch.testing.assert_close(targets["entropy"] - targets["kl"], gap)
    torch.testing.assert_close(targets["kl"][term == 1], r[term == 1])


@pytest.mark.parametrize("alpha_target", ["kl", "entropy"])
def test_entropy_form_update_is_sac(alpha_target):
    """Under the uniform prior in the entropy form one M-step is SAC's: the TD target
    r + γ(1−d)(min Q̄(s',a') − α log π(a'|s')), the policy loss E[α log π − min Q], and
    the α loss −log α (log π + H*) with H* = −A, whichever α target is chosen."""
    value, engine, prior = _parts(UniformPrior())
    prior.set_kl_form("entropy")
    s, a, r, s2, term = _batch()
    log_alpha = torch.tensor(-1.2, requires_grad=True)
    kl_target = A * prior.default_kl_target()

    torch.manual_seed(7)
    _, metrics = m_step_losses(
        value, engine, prior, log_alpha, kl_target, GAMMA, s, a, r, s2, term,
        alpha_target=alpha_target,
    )  # fmt: skip

    torch.manual_seed(7)  # the TD target's draw first, then the policy loss's
    alpha = log_alpha.detach().exp()
    with torch.no_grad():
        a2, log_pi2 = _sac_sample(engine, s2)
        y = r + GAMMA * (1.0 - term) * (_min_q(value.q_target, s2, a2) - alpha * log_pi2)
        qs = value.q(s, a.unsqueeze(1))[..., 0]
        value_loss = 0.5 * (qs - y).pow(2).mean(-1).sum()
        a_new, log_pi = _sac_sample(engine, s)
        policy_loss = (alpha * log_pi - _min_q(value.q, s, a_new)).mean()
        sac_alpha_loss = -(log_alpha * (log_pi - A)).mean()
    torch.testing.assert_close(metrics["loss/value"], value_loss)
    torch.testing.assert_close(metrics["loss/engine"], policy_loss)
    torch.testing.assert_close(metrics["loss/alpha"], sac_alpha_loss)
    # train/kl reports KL(π‖U) itself, not the entropy form's −H(π).
    torch.testing.assert_close(metrics["train/kl"], (log_pi + A * math.log(2.0)).mean())


@pytest.mark.parametrize("prior_cls", [UniformPrior, ConstantTanhGaussianPrior])
def test_entropy_alpha_target_is_sacs_loss_under_any_prior(prior_cls):
    """SAC's α procedure reads log π of the policy loss's sample, whatever the prior:
    the loss and its gradient in log α are SAC's, and α rises while the entropy is
    below −A."""
    value, engine, prior = _parts(prior_cls(), seed=3)
    prior.set_kl_form("kl")
    s, a, r, s2, term = _batch()
    log_alpha = torch.tensor(0.4, requires_grad=True)

    torch.manual_seed(11)
    loss, metrics = m_step_losses(
        value, engine, prior, log_alpha, 123.0, GAMMA, s, a, r, s2, term,
        alpha_target="entropy",
    )  # fmt: skip
    loss.backward()

    torch.manual_seed(11)
    with torch.no_grad():
        _sac_sample(engine, s2)  # the TD target's draw
        _, log_pi = _sac_sample(engine, s)
    sac = -(log_alpha.detach() * (log_pi - A)).mean()
    torch.testing.assert_close(metrics["loss/alpha"], sac)
    # Only the α loss reaches log α (everything else sees α detached).
    torch.testing.assert_close(log_alpha.grad, -(log_pi - A).mean())
    # The KL target (123 nats) plays no part.
    torch.testing.assert_close(entropy_alpha_loss(log_alpha, log_pi, -A), sac)


def test_kl_alpha_target_is_unchanged():
    """The ``kl`` α target under the constant prior: log α · (KL* − KL(π‖p)), the KL
    in closed form, as before the entropy target existed."""
    value, engine, prior = _parts(ConstantTanhGaussianPrior(0.2, 0.7), seed=4)
    s, a, r, s2, term = _batch()
    log_alpha = torch.tensor(0.4, requires_grad=True)
    kl_target = 2.5
    _, metrics = m_step_losses(value, engine, prior, log_alpha, kl_target, GAMMA, s, a, r, s2, term)
    with torch.no_grad():
        loc, log_scale = engine.net(s)
        kl = torch.distributions.kl_divergence(
            Normal(loc, log_scale.exp()), Normal(torch.full_like(loc, 0.2), 0.7)
        ).sum(-1)
    torch.testing.assert_close(metrics["loss/alpha"], log_alpha.detach() * (kl_target - kl.mean()))
    torch.testing.assert_close(metrics["train/kl"], kl.mean())


@pytest.mark.parametrize("future", ["engine", "prior"])
def test_kl_form_charges_each_living_model_step(future):
    """The model-based value reads its future KL terms through the same objective:
    the KL form sits below the entropy form by α A log 2 Σ_{t=1..H} γ^t m_t, so a
    trajectory that terminates at once is not charged at all.  Future actions drawn
    from the uniform prior itself have KL 0 and entropy A log 2: the same gap."""
    alpha, horizon = 0.25, 3
    for stop_above, steps_alive in ((float("inf"), horizon), (-1e9, 0)):
        torch.manual_seed(0)
        prior = UniformPrior()
        value = ModelBasedValue(
            model=LinearWorld(stop_above=stop_above), leaf=TwinQ(hidden=(16,)),
            horizon=horizon, propagation="expectation", future=future,
        )  # fmt: skip
        value.build(S, A)
        engine = Direct(hidden=(16,))
        engine.build(S, A)
        prior.build(S, A)
        value.bind(prior, engine, lambda: torch.tensor(alpha), GAMMA)
        s, a0 = torch.randn(B, S), torch.rand(B, 4, A) * 2 - 1
        got = {}
        for form in ("entropy", "kl"):
            prior.set_kl_form(form)
            torch.manual_seed(5)
            got[form] = value(s, a0)
        charged = sum(GAMMA**t for t in range(1, steps_alive + 1))
        expected = alpha * A * math.log(2.0) * charged
        torch.testing.assert_close(got["entropy"] - got["kl"], torch.full_like(got["kl"], expected))


def test_td_inference_against_the_online_critic():
    """``td_inference='online'`` infers the next-state posterior against the critic that
    acts and still backs up the target critic's values; for Direct, whose inference
    reads no critic, the two choices give the same target."""
    prior = ConstantTanhGaussianPrior(0.0, 0.8)
    value, engine, prior = _parts(prior, Iterative(hidden=(16,), n_samples=8), seed=5)
    _, _, r, s2, term = _batch()
    alpha = torch.tensor(0.3)
    torch.manual_seed(9)
    online = td_target(value, engine, prior, alpha, GAMMA, r, s2, term, "online")
    torch.manual_seed(9)
    target = td_target(value, engine, prior, alpha, GAMMA, r, s2, term, "target")

    torch.manual_seed(9)
    infer_against = TrajectoryObjective(s2, partial(value, frozen=True), prior, alpha)
    with torch.no_grad():
        post = engine.infer(s2, infer_against)
        a2, _ = post.rsample(1)
        kl = post.kl(prior.distribution(s2))
        q = value.q_target(s2, a2).min(0).values[:, 0]
    torch.testing.assert_close(online, r + GAMMA * (1.0 - term) * (q - alpha * kl))
    assert not torch.allclose(online[term == 0], target[term == 0])

    value, direct, prior = _parts(prior, seed=5)
    ys = []
    for choice in ("online", "target"):
        torch.manual_seed(9)
        ys.append(td_target(value, direct, prior, alpha, GAMMA, r, s2, term, choice))
    torch.testing.assert_close(*ys)


def test_agent_defaults_and_refusals():
    """The entropy form is the default under the uniform prior only, and an impossible
    combination is refused with what to do."""
    assert VariationalAgent(total_env_steps=2000).prior.kl_form == "entropy"
    constant = VariationalAgent(prior=ConstantTanhGaussianPrior(), total_env_steps=2000)
    assert constant.prior.kl_form == "kl"
    with pytest.raises(ConfigError, match="nothing constant to drop.*--model.kl_form kl"):
        VariationalAgent(prior=ConstantTanhGaussianPrior(), kl_form="entropy")
    with pytest.raises(ConfigError, match="ignores it; unset --model.target_kl_per_dim"):
        VariationalAgent(alpha_target="entropy", target_kl_per_dim=1.0)
    with pytest.raises(ConfigError, match="alpha_target must be 'kl'.*got 'entropi'"):
        VariationalAgent(alpha_target="entropi")
    with pytest.raises(ConfigError, match="td_inference must be 'target'.*got 'live'"):
        VariationalAgent(td_inference="live")
    with pytest.raises(ConfigError, match="kl_form must be 'entropy' or 'kl', got 'nats'"):
        UniformPrior().set_kl_form("nats")


def test_paper_options_through_the_cli(workdir, capsys):
    """The tiny preset with the constant prior, SAC's α procedure and online TD-target
    inference trains through ``mbvi fit`` and logs the α loss and the options."""
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.prior", "mbvi.ConstantTanhGaussianPrior",
        "--model.alpha_target", "entropy", "--model.td_inference", "online",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["alpha_target"] == "entropy"
    assert run.data.params["td_inference"] == "online"
    assert "loss/alpha" in run.data.metrics


def test_entropy_form_under_a_constant_prior_is_refused_by_the_cli(workdir, capsys):
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.prior", "mbvi.ConstantTanhGaussianPrior",
        "--model.kl_form", "entropy",
    )  # fmt: skip
    assert code == 2, err[-2000:]
    assert "ConstantTanhGaussianPrior's density depends on the action" in err, err[-2000:]


def test_prior_proposed_particles_read_the_uniform_prior_in_either_form():
    """Particles drawn from the uniform prior itself carry the prior's true density
    2^-A as their proposal density, so their KL term is E_π[log π] = KL(π‖U) − A log 2
    in the entropy form and KL(π‖U) ≥ 0 in the KL form: the form changes what the
    objective reads, never the density the particles were drawn from."""
    from mbvi.planners import ImportanceSampling

    s = torch.randn(B, S, generator=torch.Generator().manual_seed(3))

    def q(s, a):  # a tilt, so that π is not the prior
        return 2.0 * a.sum(-1)

    terms = {}
    for form in ("entropy", "kl"):
        prior, engine = UniformPrior(), ImportanceSampling(n_particles=64)
        prior.build(S, A), engine.build(S, A)
        prior.set_kl_form(form)
        torch.manual_seed(5)
        particles = engine.infer(s, TrajectoryObjective(s, q, prior, torch.tensor(0.5)))
        terms[form] = particles.kl_to_prior(prior, s)
    assert (terms["kl"] > 0).all()
    torch.testing.assert_close(terms["entropy"], terms["kl"] - A * math.log(2.0))
