"""Prior programs as Pyro users write them (examples/latent_prior.py): latent sites
summed out or importance-weighted, priors on [-1, 1] judged by their samples, the KL
floor under a bimodal prior, and learnable programs fitted in the M-step and
checkpointed."""

from __future__ import annotations

import copy
import math

import lightning as L
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions.transforms import AffineTransform, TanhTransform

from mbvi import MLflowTracker, TwinQ, VariationalAgent
from mbvi.errors import ConfigError
from mbvi.planners import Direct
from mbvi.pyro import OptimalityModel, ProgramPrior, importance_plan, native_objective
from mbvi.training.checks import kl_target_per_dim
from mbvi.variational.distributions import TanhGaussian
from tests.conftest import TINY_AGENT, accelerator, fit_agent

S, B, N = 3, 4, 6
HERE = __name__
LATENT = "examples.latent_prior"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _actions(*shape, low=0.95):
    return (torch.rand(*shape) * 2 * low - low).requires_grad_()


def _tanh_mixture(a, locs, log_weights, scale):
    """log Σ_k w_k tanh(N(loc_k, scale²))(a) by hand: ``locs`` [..., K, A],
    ``log_weights`` [..., K], change of variables u = atanh(a)."""
    u = torch.atanh(a).unsqueeze(-2)
    log_u = torch.distributions.Normal(locs, scale).log_prob(u).sum(-1)
    return torch.logsumexp(log_u + log_weights, -1) - torch.log1p(-a.square()).sum(-1)


def _built(path, act_dim, **kw):
    prior = ProgramPrior(path, **kw)
    prior.build(S, act_dim)
    return prior


# ---- discrete latents: exact enumeration ------------------------------------------------


@pytest.mark.parametrize("act_dim", [1, 4])
def test_enumerated_gait_equals_the_hand_marginalised_mixture(act_dim):
    """gait ~ Categorical, then a | gait: summed out by enumeration, the density and its
    gradient are those of examples/mixture_prior.py's MixtureSameFamily prior."""
    args = {"offset": 0.8, "scale": 0.5}
    latent = _built(f"{LATENT}.make_gait_prior", act_dim, factory=True, factory_args=args)
    mixture = _built(
        "examples.mixture_prior.make_two_gait_prior", act_dim, factory=True, factory_args=args
    )
    assert latent.latents.enumerated == ("gait",) and latent.latents.sampled == ()
    s, a = torch.randn(B, S), _actions(B, N, act_dim)
    log_p, expected = latent.log_prob(s, a), mixture.log_prob(s, a)
    assert log_p.shape == (B, N)
    torch.testing.assert_close(log_p, expected)
    (grad,) = torch.autograd.grad(log_p.sum(), a)
    (grad_expected,) = torch.autograd.grad(expected.sum(), a)
    torch.testing.assert_close(grad, grad_expected)


def test_module_level_gait_prior_matches_two_gait_prior():
    latent = _built(f"{LATENT}.gait_prior", 1)
    mixture = _built("examples.mixture_prior.two_gait_prior", 1)
    s, a = torch.randn(B, S), _actions(B, N, 1)
    torch.testing.assert_close(latent.log_prob(s, a), mixture.log_prob(s, a))


GAIT_LOCS = torch.tensor([[0.9, -0.4], [-0.7, 0.2], [0.1, 1.1]])


def two_latents(s, infer=None):
    """gait ∈ {0,1,2} with p = (0.2, 0.5, 0.3), flip ∈ {0,1} with p(1) = 0.3:
    a = tanh(N(±locs[gait], 0.4²)), the sign set by flip; ``infer``: the sites' own."""
    infer = infer or {}
    gait = pyro.sample("gait", dist.Categorical(probs=torch.tensor([0.2, 0.5, 0.3])), infer=infer)
    flip = pyro.sample("flip", dist.Bernoulli(0.3), infer=infer)
    loc = GAIT_LOCS[gait] * (2.0 * flip - 1.0).unsqueeze(-1)
    base = dist.Normal(loc, 0.4).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(base, [TanhTransform(cache_size=1)]))


def sequential_latents(s):  # the sites marked for another strategy, or for none
    return two_latents(s, {"enumerate": "sequential"})


def unannotated_off_latents(s):
    return two_latents(s, {"enumerate": None})


@pytest.mark.parametrize(
    "program", ["two_latents", "sequential_latents", "unannotated_off_latents"]
)
def test_two_discrete_latents_are_summed_jointly(program):
    """Also when the program marks its sites for another enumeration strategy (or none):
    mbvi sums them out in parallel all the same, never one sampled value."""
    prior = _built(f"{HERE}.{program}", 2)
    assert set(prior.latents.enumerated) == {"gait", "flip"}
    a = _actions(B, N, 2)
    locs = torch.cat([-GAIT_LOCS, GAIT_LOCS])  # flip = 0, then flip = 1
    weights = torch.cat([0.7 * torch.tensor([0.2, 0.5, 0.3]), 0.3 * torch.tensor([0.2, 0.5, 0.3])])
    expected = _tanh_mixture(a, locs, weights.log(), 0.4)
    torch.testing.assert_close(prior.log_prob(torch.randn(B, S), a), expected)


def test_state_dependent_gait_module():
    """GaitModule: p(gait|s) = softmax(W s + b), read per state row."""
    prior = _built(f"{LATENT}.GaitModule", 2, factory=True)
    gate = prior.target_module.gate
    with torch.no_grad():
        gate.weight.copy_(torch.randn(2, S))
        gate.bias.copy_(torch.randn(2))
    s, a = torch.randn(B, S), _actions(B, N, 2)
    log_w = torch.log_softmax(gate(s), -1).unsqueeze(1)  # [B,1,2]
    locs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    torch.testing.assert_close(prior.log_prob(s, a), _tanh_mixture(a, locs, log_w, 0.3))


# ---- continuous latents: importance weighting --------------------------------------------


def _wobble_exact(a, spread=0.5, scale=0.3):
    """log p(a) of make_wobble_prior: u = atanh(a) ~ N(0, spread² + scale²) per dim."""
    sd = math.sqrt(spread**2 + scale**2)
    u = torch.atanh(a)
    return (torch.distributions.Normal(0.0, sd).log_prob(u) - torch.log1p(-a.square())).sum(-1)


def test_continuous_latent_estimate_is_biased_low_by_order_one_over_k():
    """log p̂_K = log (1/K) Σ_k p(a|z_k): E[log p̂_K] − log p ≈ −c/K < 0 (Jensen)."""
    a = _actions(1, 400, 2, low=0.8).detach()
    exact = _wobble_exact(a)
    bias = {}
    for k in (16, 64):
        prior = _built(f"{LATENT}.make_wobble_prior", 2, factory=True, latent_samples=k)
        assert prior.latents.sampled == ("z",) and prior.latents.enumerated == ()
        errors = torch.stack([prior.log_prob(torch.zeros(1, S), a) - exact for _ in range(20)])
        bias[k] = errors.mean().item()
    assert bias[16] < bias[64] < 0, bias
    assert 2.5 < bias[16] / bias[64] < 6.5, bias  # O(1/K): 4x the samples, ~1/4 the bias
    assert abs(bias[64]) < 0.08, bias


def mixed_latents(s):
    """gait ∈ {±0.8} (probs 0.4, 0.6), then z ~ N(0, 0.3²), a = tanh(N(loc_gait + z, 0.2²))."""
    gait = pyro.sample("gait", dist.Bernoulli(0.6))
    z = pyro.sample("z", dist.Normal(torch.zeros(1), 0.3).to_event(1))
    base = dist.Normal(0.8 * (2 * gait - 1).unsqueeze(-1) + z, 0.2).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(base, [TanhTransform(cache_size=1)]))


def test_discrete_and_continuous_latents_together():
    prior = _built(f"{HERE}.mixed_latents", 1, latent_samples=512)
    assert prior.latents.enumerated == ("gait",) and prior.latents.sampled == ("z",)
    a = _actions(B, N, 1, low=0.9).detach()
    locs, sd = torch.tensor([[-0.8], [0.8]]), math.sqrt(0.3**2 + 0.2**2)
    expected = _tanh_mixture(a, locs, torch.tensor([0.4, 0.6]).log(), sd)
    s = torch.randn(B, S)
    error = torch.stack([prior.log_prob(s, a) for _ in range(10)]).mean(0) - expected
    assert error.abs().max() < 0.06 and error.mean().abs() < 0.02, error


def test_the_pyro_model_sees_the_marginal_and_agrees_with_native():
    """The optimality model runs a latent program as one site with the marginal
    density: α·ELBO with an engine's guide = native_objective exactly."""
    prior = _built(f"{LATENT}.make_gait_prior", 2, factory=True)
    s = torch.randn(B, S)
    model = OptimalityModel(prior, lambda s, a: -(a - 0.5).square().sum(-1), 0.3, n_particles=N)
    posterior = TanhGaussian(0.3 * torch.randn(B, 2), torch.full((B, 2), -0.5))
    guide = model.guide(posterior)
    trace = poutine.trace(guide).get_trace(s)
    elbo = model.elbo(poutine.replay(guide, trace=trace), s)
    j, _ = native_objective(model, s, posterior, actions=trace.nodes["a_0"]["value"].unsqueeze(0))
    torch.testing.assert_close(elbo, j.sum(), rtol=1e-4, atol=1e-4)
    model_sites = poutine.trace(model).get_trace(s).nodes
    assert "a_0" in model_sites and "gait_0" not in model_sites
    plan = importance_plan(model, s)
    assert plan.particles.shape == (B, N, 2) and plan.particles.abs().max() <= 1


# ---- support: samples decide ---------------------------------------------------------------


def test_beta_on_the_box_is_accepted_whatever_support_it_reports():
    """Beta(2,2) mapped by AffineTransform(-1, 2) reports support Real; it is accepted,
    and its log-prob is the Beta density of (a+1)/2 with the Jacobian 1/2 per dim."""
    prior = _built(f"{LATENT}.make_beta_prior", 3, factory=True)
    a = _actions(B, N, 3).detach()
    expected = (torch.distributions.Beta(2.0, 2.0).log_prob((a + 1) / 2) - math.log(2.0)).sum(-1)
    torch.testing.assert_close(prior.log_prob(torch.randn(B, S), a), expected)
    assert prior.sample(torch.randn(B, S), 50).abs().max() <= 1


def too_wide_beta(s):
    x = dist.Beta(torch.full((2,), 2.0), torch.full((2,), 2.0)).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(x, [AffineTransform(-1.0, 2.2)]))


def rarely_outside(s):
    """N(0, 0.35²): about 0.4% of draws leave [-1, 1], so a probe of 6 rarely shows one."""
    return pyro.sample("a", dist.Normal(torch.zeros(2), 0.35).to_event(1))


def latent_shifts_out(s):
    """a ~ Uniform(-1, 1) + 0.5 when a rare latent says so: a probe of 6 seldom sees it."""
    shift = pyro.sample("shift", dist.Bernoulli(0.005)).unsqueeze(-1)
    base = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(base, [AffineTransform(0.5 * shift, 1.0)]))


@pytest.mark.parametrize(
    "name, message",
    [
        ("too_wide_beta", r"action site 'a' \(recorded as 'a_0'\) sampled -?1\.\d+ in action dim"),
        ("rarely_outside", r"action site 'a' .*sampled -?1\.\d+ in action dim \d .*support Real"),
        ("latent_shifts_out", r"action site 'a' sampled 1\.\d+ in action dim \d"),
    ],
)
def test_a_program_sampling_outside_the_box_is_refused(name, message):
    with pytest.raises(ConfigError, match=rf"'{HERE}.{name}'.*{message}.*must lie in \[-1, 1\]\^2"):
        _built(f"{HERE}.{name}", 2)


# ---- the KL floor under a program ----------------------------------------------------------


def wide_program(s):
    """tanh(N(0, 0.8²)): itself a tanh-Gaussian, so its floor is 0."""
    base = dist.Normal(torch.zeros(2), 0.8).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(base, [TanhTransform(cache_size=1)]))


def test_kl_floor_of_two_separated_gaits_is_about_log_2():
    """One tanh-Gaussian covers one of two equal, separated gaits: KL ≈ log 2 in all."""
    one = _built("examples.mixture_prior.two_gait_prior", 1)
    four = _built("examples.mixture_prior.make_two_gait_prior", 4, factory=True)
    assert one.min_kl_target() == pytest.approx(math.log(2.0), abs=0.03)
    assert four.min_kl_target() == pytest.approx(math.log(2.0) / 4, abs=0.02)
    assert _built(f"{HERE}.wide_program", 2).min_kl_target() < 0.01


def test_an_unreachable_kl_target_under_a_bimodal_program_is_refused():
    prior = _built("examples.mixture_prior.two_gait_prior", 1)
    with pytest.raises(ConfigError, match=r"0.5 cannot be met under ProgramPrior: by an estimate"):
        kl_target_per_dim(prior, 0.5)
    assert kl_target_per_dim(prior, 1.0) == 1.0
    learnable = _built(f"{LATENT}.make_learnable_gait_prior", 1, factory=True)
    assert learnable.min_kl_target() == 0.0  # it moves towards the posterior


# ---- learnable programs ----------------------------------------------------------------------

LEARNABLE = [
    (
        f"{LATENT}.make_learnable_gait_prior",
        {"params.online.gait_locs", "params.online.gait_scale"},
    ),
    (f"{LATENT}.GaitModule", {"program_module.locs", "program_module.gate.weight"}),
]
OBS, ACT = 3, 2


def _posterior(s):
    loc = 0.6 + 0.5 * torch.sin(2.0 * s[:, :ACT])
    return TanhGaussian(loc, torch.full_like(loc, -1.2))


def _kl_to_posterior(prior, s):
    """E_s KL(π‖p̄) by samples, with the target p̄ the E-step reads."""
    with torch.no_grad():
        a, _, log_pi = _posterior(s).rsample_with_log_prob(32)
        return (log_pi - prior.log_prob(s, a)).mean().item()


def _train(prior, steps, lr=3e-3):
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        s = torch.randn(64, OBS, generator=gen)
        loss, metrics = prior.loss(s, _posterior(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        prior.update_target()
        history.append({k: v.item() for k, v in metrics.items()})
    return history


def _mean(history, key):
    return sum(h[key] for h in history) / len(history)


@pytest.mark.parametrize("path, some_params", LEARNABLE)
def test_learnable_program_parameters_are_the_priors_own(path, some_params):
    prior = _built(path, ACT, factory=True)
    other = _built(path, ACT, factory=True)
    trained = {k for k, p in prior.named_parameters() if p.requires_grad}
    assert prior.learnable and some_params <= trained and "rho" in trained
    assert not any("target" in k for k in trained)
    assert len(pyro.get_param_store()) == 0  # Pyro's global store is left alone
    assert {id(p) for p in prior.parameters()}.isdisjoint(id(p) for p in other.parameters())
    # E-step: the target, a constant; M-step: reaches θ and η only.
    s = torch.randn(8, OBS)
    a = _actions(8, 5, ACT)
    prior.log_prob(s, a).sum().backward()
    assert all(p.grad is None for p in prior.parameters()) and a.grad is not None
    assert {k for k, p in prior.named_parameters() if p.requires_grad} == trained
    prior.loss(s, _posterior(s))[0].backward()
    assert all(prior.get_parameter(k).grad is not None for k in some_params | {"rho"})
    assert all(p.grad is None for k, p in prior.named_parameters() if "target" in k)


@pytest.mark.parametrize("path, some_params", LEARNABLE)
def test_kl_to_a_fixed_posterior_falls_while_it_trains(path, some_params):
    prior = _built(path, ACT, factory=True, tau=0.05, eps=0.05)
    s = torch.randn(256, OBS)
    before = _kl_to_posterior(prior, s)
    history = _train(prior, 150, lr=1e-2)
    first, last = history[0]["kl_posterior"], _mean(history[-20:], "kl_posterior")
    assert last < 0.3 * first, (first, last)
    assert _kl_to_posterior(prior, s) < 0.3 * before  # the target followed


def test_the_trust_region_holds_and_is_active():
    path = f"{LATENT}.make_learnable_gait_prior"
    constrained = _train(_built(path, ACT, factory=True, eps=0.005), 300)[150:]
    free = _train(_built(path, ACT, factory=True, eps=1e9, init_eta=1e-3), 300)[150:]
    assert _mean(constrained, "kl_trust") <= 0.005
    assert max(h["kl_trust"] for h in constrained) <= 2 * 0.005
    assert _mean(free, "kl_trust") > 5 * 0.005
    assert max(h["eta"] for h in constrained) > 10.0


@pytest.mark.parametrize("path, some_params", LEARNABLE)
def test_a_trained_program_survives_a_state_dict_round_trip(path, some_params):
    prior = _built(path, ACT, factory=True, tau=0.2)
    _train(prior, 10, lr=1e-2)
    fresh = _built(path, ACT, factory=True, tau=0.2)
    s, a = torch.randn(B, OBS), _actions(B, N, ACT).detach()
    assert not torch.allclose(fresh.log_prob(s, a), prior.log_prob(s, a))
    fresh.load_state_dict(copy.deepcopy(prior.state_dict()))
    torch.testing.assert_close(fresh.log_prob(s, a), prior.log_prob(s, a))
    torch.testing.assert_close(fresh._log_prob(s.unsqueeze(1), a, "online"),
                               prior._log_prob(s.unsqueeze(1), a, "online"))  # fmt: skip


def test_an_agent_resumes_a_learnable_program_prior_from_its_checkpoint(workdir):
    """Trained in the M-step by the agent, saved in its checkpoint and restored on resume."""

    def agent(total):
        prior = ProgramPrior(f"{LATENT}.make_learnable_gait_prior", factory=True)
        return VariationalAgent(
            "Pendulum-v1", prior=prior, engine=Direct(hidden=(16,)), value=TwinQ(hidden=(16,)),
            **{**TINY_AGENT, "total_env_steps": total, "warmup_steps": 50},
        )  # fmt: skip

    first = agent(150)
    fresh = {k: v.clone() for k, v in first.prior.state_dict().items()}
    logger = MLflowTracker(experiment_name="t", tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    fit_agent(first, workdir, logger)
    saved = torch.load(workdir / "checkpoints" / logger.run_id / "last.ckpt", weights_only=False)
    prior_state = {k.removeprefix("prior."): v for k, v in saved["state_dict"].items()
                   if k.startswith("prior.")}  # fmt: skip
    assert prior_state.keys() == fresh.keys()
    moved = [k for k, v in prior_state.items() if not torch.equal(v, fresh[k])]
    assert {"params.online.gait_locs", "params.target.gait_locs", "rho"} <= set(moved)

    seen = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, agent):
            seen.update({k: v.clone() for k, v in agent.prior.state_dict().items()})

    resumed = agent(200)
    trainer = L.Trainer(
        logger=False, max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(workdir), accelerator=accelerator(),
        callbacks=[Snapshot()],
    )  # fmt: skip
    trainer.fit(resumed, ckpt_path=workdir / "checkpoints" / logger.run_id / "last.ckpt")
    for key, value in prior_state.items():
        assert torch.equal(seen[key], value), key
    assert resumed.env_steps == 200
