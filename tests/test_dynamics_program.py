"""Dynamics as a user's Pyro program (``mbvi.pyro.ProgramDynamics``) with the pendulum
physics prior of ``examples/pendulum_physics.py``: exact physics at a zero residual,
a maximum-likelihood fit through the agent's refit path, α·ELBO equal to the hot-path
objective, planners running through it, checkpoints, and bad programs refused."""

from __future__ import annotations

import io
import math
from functools import partial

import gymnasium as gym
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from examples.pendulum_physics import PendulumPhysics, pendulum_reward, pendulum_transitions
from mbvi.errors import ConfigError
from mbvi.planners import CEM, MPPI, SMC, Direct
from mbvi.pyro import OptimalityModel, ProgramDynamics
from mbvi.pyro.world import world_model_programs
from mbvi.training.replay import ReplayBuffer
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.values import TwinQ

ALPHA, GAMMA = 0.4, 0.95


def pendulum(**factory_args) -> ProgramDynamics:
    model = ProgramDynamics(
        "examples.pendulum_physics.PendulumPhysics",
        reward="examples.pendulum_physics.pendulum_reward",
        factory=True,
        factory_args=factory_args or None,
    )
    model.build(3, 1)
    return model


def test_zero_residual_predicts_gymnasium_pendulum_exactly():
    model = pendulum()
    env = gym.make("Pendulum-v1").unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    # Angles all round the circle, speeds up to the clip, torques past the bound.
    theta = rng.uniform(-math.pi, math.pi, 64)
    speed = rng.uniform(-8.0, 8.0, 64)
    action = rng.uniform(-1.2, 1.2, 64).astype(np.float32)
    obs, nxt, rew = [], [], []
    for th, sp, a in zip(theta, speed, action):
        env.state = np.array([th, sp])
        obs.append(env._get_obs())
        o, r, *_ = env.step(np.array([2.0 * a], dtype=np.float32))
        nxt.append(o)
        rew.append(r)
    s = torch.as_tensor(np.array(obs))
    a = torch.as_tensor(action).unsqueeze(-1)
    step = model.step(s, a, "expectation")
    torch.testing.assert_close(step.next_state, torch.as_tensor(np.array(nxt)), atol=2e-5, rtol=0)
    torch.testing.assert_close(step.reward, torch.as_tensor(rew, dtype=torch.float32), atol=1e-4,
                               rtol=1e-5)  # fmt: skip
    assert not step.terminated.any()
    # A sampled step is the physics plus the site's noise (σ = 0.05 at the start).
    noisy = model.step(s, a, "ts1", torch.Generator().manual_seed(0)).next_state
    assert 0.02 < float((noisy - step.next_state).detach().std()) < 0.08


@pytest.fixture(scope="module")
def heavy():
    """Transitions of a pendulum of mass 1.5 (the physics prior believes 1.0)."""
    return pendulum_transitions(mass=1.5, n=1500, seed=0)


def test_fit_through_the_refit_path_learns_the_residual(heavy):
    torch.manual_seed(0)
    model = pendulum()
    value = ModelBasedValue(model=model, leaf=TwinQ(hidden=(16,)), horizon=2, model_lr=3e-3,
                            model_epochs=40, model_patience=10, model_batch_size=128)  # fmt: skip
    value.build(3, 1)
    replay = ReplayBuffer(2000, 3, 1, seed=0)
    replay.add_batch(*heavy)
    held = tuple(x[-300:] for x in pendulum_transitions(mass=1.5, n=300, seed=1)[:4])
    nll0, mse0 = (float(x) for x in model.holdout_scores(*held))
    metrics = value.update_model(replay, 1500)
    nll1, mse1 = (float(x) for x in model.holdout_scores(*held))
    assert metrics["model/epochs"] >= 5 and math.isfinite(metrics["model/train_nll"])
    # The mass error is an action-dependent offset of θ̇: only the residual removes it
    # (fitting σ alone lowers the NLL but leaves the squared error where it was).
    assert mse1 < 0.1 * mse0, (mse0, mse1)
    assert nll1 < nll0 - 1.0, (nll0, nll1)
    assert (model.program_module.noise < 0.03).all()


def test_alpha_elbo_equals_the_hot_path_objective_in_expectation():
    """As tests/test_pyro_world.py for the ensemble: the program's own next-state site
    is in the Pyro trace, sampled alike by model and guide."""
    torch.manual_seed(1)
    model = pendulum(noise=0.1)
    with torch.no_grad():  # a non-zero residual, as after a fit
        for p in model.program_module.residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prior = ConstantTanhGaussianPrior()
    prior.build(3, 1)
    engine = Direct(hidden=(32,))
    engine.build(3, 1)
    leaf = TwinQ(hidden=(32,))
    leaf.build(3, 1)
    value = ModelBasedValue(model=model, leaf=leaf, horizon=3, future="engine")
    value.bind(prior, engine, lambda: torch.tensor(ALPHA), GAMMA)
    states = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])

    dynamics, reward = world_model_programs(model)
    n, repeats = 400, 10
    pyro_model = OptimalityModel(
        prior, partial(leaf, frozen=True), ALPHA, 3, n, dynamics, reward, GAMMA
    )
    guide = pyro_model.guide(posterior=engine.infer(states), policy=engine.infer)
    trace = pyro.poutine.trace(pyro_model).get_trace(states)
    assert {"s_next_0", "s_next_2"} <= set(trace.nodes) and "member_0" not in trace.nodes
    objective = TrajectoryObjective(states, partial(value, frozen=True), prior, ALPHA)
    with torch.no_grad():
        hot = torch.stack([objective(engine.infer(states), n)[0].sum() for _ in range(repeats)])
        elbo = torch.stack([pyro_model.elbo(guide, states) for _ in range(repeats)])
    se = math.sqrt(hot.var() / repeats + elbo.var() / repeats)
    diff = float(hot.mean() - elbo.mean())
    assert abs(diff) < 4 * se, (float(hot.mean()), float(elbo.mean()), se)
    # The check has power: one step's reward, summed over the states, is about −13.
    assert 4 * se < 1.0, se


ENGINES = {
    "smc": lambda: SMC(n_particles=32, horizon=4),
    "mppi": lambda: MPPI(population=32, iterations=2, horizon=4),
    "cem": lambda: CEM(population=32, elites=8, iterations=2, horizon=4),
}


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_planners_plan_through_the_program(engine_name):
    torch.manual_seed(0)
    model = pendulum()
    prior = UniformPrior()
    prior.build(3, 1)
    leaf = TwinQ(hidden=(16,))
    value = ModelBasedValue(model=model, leaf=leaf, horizon=2)
    value.build(3, 1)
    engine = ENGINES[engine_name]()
    engine.build(3, 1)
    value.bind(prior, engine, lambda: torch.tensor(0.2), 0.99)
    states = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, -2.0], [0.6, 0.8, 0.3]])
    objective = TrajectoryObjective(states, partial(value, frozen=True), prior, 0.2)
    before = states.clone()
    action = engine.infer(states, objective).mean_action()
    assert action.shape == (4, 1) and bool((action.abs() <= 1).all())
    assert torch.equal(states, before)
    # The model-based value itself is differentiable in the action through the program.
    a = torch.zeros(4, 3, 1, requires_grad=True)
    q = ModelBasedValue(model=model, leaf=leaf, horizon=2, future="prior")
    q.bind(prior, engine, lambda: torch.tensor(0.2), 0.99)
    q(states, a, frozen=True).sum().backward()
    assert a.grad is not None and bool(a.grad.abs().sum() > 0)


def test_checkpoint_round_trip(heavy):
    torch.manual_seed(0)
    value = ModelBasedValue(model=pendulum(), leaf=TwinQ(hidden=(16,)), horizon=2,
                            model_epochs=2, model_batch_size=256)  # fmt: skip
    value.build(3, 1)
    replay = ReplayBuffer(2000, 3, 1, seed=0)
    replay.add_batch(*heavy)
    value.update_model(replay, 1500)
    buffer = io.BytesIO()
    torch.save(value.state_dict(), buffer)
    buffer.seek(0)
    restored = ModelBasedValue(model=pendulum(), leaf=TwinQ(hidden=(16,)), horizon=2)
    restored.build(3, 1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    s, a = heavy[0][:50], heavy[1][:50]
    ours, theirs = value.model.step(s, a, "expectation"), restored.model.step(s, a, "expectation")
    assert torch.equal(ours.next_state, theirs.next_state)
    assert torch.equal(value.model.program_module.noise, restored.model.program_module.noise)
    assert restored.get_extra_state()["model_optimizer"] is not None


def learnable_function_program(s, a):
    """A pyro.param program (no module): the parameters are the model's own."""
    shift = pyro.param("shift", torch.zeros(3))
    scale = pyro.param("scale", torch.tensor(0.1), constraint=dist.constraints.positive)
    return pyro.sample("s_next", dist.Normal(s + shift.to(s), scale.to(s)).to_event(1))


def test_pyro_param_program_is_owned_and_checkpointed():
    model = ProgramDynamics(learnable_function_program, reward=pendulum_reward)
    model.build(3, 1)
    assert set(model.params.names()) == {"shift", "scale"}
    assert "shift" not in pyro.get_param_store()
    with torch.no_grad():
        model.params.online["shift"].fill_(0.5)
    other = ProgramDynamics(learnable_function_program, reward=pendulum_reward)
    other.build(3, 1)
    other.load_state_dict(model.state_dict())
    s, a = torch.zeros(2, 3), torch.zeros(2, 1)
    assert torch.equal(other.step(s, a, "mean").next_state, torch.full((2, 3), 0.5))


def biased_reward_program(s, a):
    """A reward program with a site: its mean is the reward, its likelihood is fitted."""
    bias = pyro.param("r_bias", torch.tensor(0.5))
    return pyro.sample("r", dist.Normal(pendulum_reward(s, a) + bias.to(s), 0.1))


def test_a_reward_site_is_fitted_and_its_mean_predicted(heavy):
    from mbvi.models.dynamics_module import DynamicsModule

    model = ProgramDynamics(PendulumPhysics, reward=biased_reward_program, factory=True)
    model.build(3, 1)
    s, a, r = heavy[0][:5], heavy[1][:5], heavy[2][:5]
    torch.testing.assert_close(model.step(s, a).reward, r + 0.5, atol=1e-4, rtol=0)
    DynamicsModule(model, lr=1e-2, max_epochs=20, patience=20).fit_transitions(*heavy)
    assert abs(float(model.params.online["r_bias"].detach())) < 0.1


def _no_site(s, a):
    return pyro.sample("next", dist.Normal(s, 0.1).to_event(1))


def _no_event(s, a):
    return pyro.sample("s_next", dist.Normal(s, 0.1))


def _wrong_shape(s, a):
    return pyro.sample("s_next", dist.Normal(s[..., :2], 0.1).to_event(1))


def _latent(s, a):
    k = pyro.sample("mode", dist.Bernoulli(0.5))
    return pyro.sample("s_next", dist.Normal(s + k.unsqueeze(-1), 0.1).to_event(1))


def _crashes(s, a):
    return pyro.sample("s_next", dist.Normal(s @ torch.ones(4, 3), 0.1).to_event(1))


def _ok(s, a):
    return pyro.sample("s_next", dist.Normal(s, 0.1).to_event(1))


def _bad_reward(s, a):
    return -s.square()  # [M, S], not [M]


@pytest.mark.parametrize(
    "program, reward, match",
    [
        (_no_site, pendulum_reward, r"no next-state site: it sampled \['next'\].*'s_next'"),
        (_no_event, pendulum_reward, r"batch \(3, 3\), event \(\)\).*\.to_event\(1\)"),
        (_wrong_shape, pendulum_reward, r"site 's_next' has shape \(3, 2\).*expected \(3, 3\)"),
        (_latent, pendulum_reward, r"latent site\(s\) \['mode'\]"),
        (_crashes, pendulum_reward, r"dynamics program '_crashes' failed on probe rows"),
        (_ok, _bad_reward, r"reward '_bad_reward' returned \(3, 3\).*expected.*\(3,\)"),
        ("examples.pendulum_physics.no_such_program", pendulum_reward,
         r"dynamics program .*has no 'no_such_program'"),
    ],
)  # fmt: skip
def test_bad_programs_are_refused_with_what_to_do(program, reward, match):
    with pytest.raises(ConfigError, match=match):
        ProgramDynamics(program, reward=reward).build(3, 1)


def _records_a_value(s, a):
    pyro.deterministic("speed", s.norm(dim=-1))  # kept in a trace, not a latent
    return pyro.sample("s_next", dist.Normal(s, 0.1).to_event(1))


def test_a_recorded_value_is_no_latent_site():
    model = ProgramDynamics(_records_a_value, reward=pendulum_reward)
    model.build(3, 1)
    step = model.step(torch.randn(5, 3), torch.rand(5, 1) * 2 - 1)
    assert step.next_state.shape == (5, 3)


def test_wrong_sizes_and_unknown_termination_are_refused():
    with pytest.raises(ConfigError, match=r"factory .*obs_dim=4, act_dim=1.*obs_dim 3"):
        ProgramDynamics(PendulumPhysics, reward=pendulum_reward, factory=True).build(4, 1)
    model = ProgramDynamics(PendulumPhysics, reward=pendulum_reward, factory=True)
    model.learned_termination = True  # what ModelBasedValue sets for an env with no rule
    with pytest.raises(ConfigError, match="no termination rule"):
        model.build(3, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_and_fits_on_cuda(heavy):
    model = pendulum().cuda()
    s, a = heavy[0][:64].cuda(), heavy[1][:64].cuda()
    step = model.step(s, a, "ts1", torch.Generator("cuda").manual_seed(0))
    assert step.next_state.device.type == "cuda" and step.reward.device.type == "cuda"
    value = ModelBasedValue(model=model, leaf=TwinQ(hidden=(16,)), horizon=2, model_epochs=2)
    value.build(3, 1)
    value.cuda()
    replay = ReplayBuffer(2000, 3, 1, device="cuda", seed=0)
    replay.add_batch(*heavy)
    assert math.isfinite(value.update_model(replay, 1500)["model/holdout_nll"])
