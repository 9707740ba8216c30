"""The MuJoCo oracle against Gymnasium's own ``env.step``."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbvi.errors import ConfigError
from mbvi.models.oracle import SUPPORTED, MujocoOracle, physics_state

# The observation-based step starts MuJoCo's solver cold (the observation has no
# qacc_warmstart) and from x = 0, so it lands within this of env.step, not on it;
# measured 1.2e-14 for one HalfCheetah step and 1.8e-13 over 100 (the tests print them).
OBS_STEP_TOL = 1e-10


def _mid_episode(env_id: str, seed: int = 0, warmup: int = 50, steps: int = 100):
    """An env ``warmup`` random steps into an episode, its physics state there, and
    ``steps`` further actions in [-1,1]^A with env.step's observations, rewards and
    terminations under them."""
    oracle = MujocoOracle(env_id)
    env = gym.make(env_id)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(warmup):
        env.step(oracle.to_env(rng.uniform(-1, 1, oracle.act_dim)))
    state, warm = physics_state(env)
    actions = rng.uniform(-1, 1, (steps, oracle.act_dim))
    obs, rew, term = [], [], []
    for a in actions:
        o, r, d, _, _ = env.unwrapped.step(oracle.to_env(a))  # no TimeLimit/autoreset
        obs.append(o), rew.append(r), term.append(d)
    env.close()
    return oracle, state, warm, actions, np.array(obs), np.array(rew), np.array(term)


@pytest.mark.parametrize(
    "env_id", ["HalfCheetah-v5", "Walker2d-v5", "Hopper-v5", "Swimmer-v5", "InvertedPendulum-v5"]
)
def test_rollout_from_state_reproduces_env_step_bitwise(env_id):
    oracle, state, warm, actions, obs, rew, term = _mid_episode(env_id)
    o, r, d = oracle.rollout_from_state(state[None], actions[None], warm[None])
    assert o.shape == (1, 100, oracle.obs_dim) and r.shape == d.shape == (1, 100)
    np.testing.assert_array_equal(o[0], obs)
    np.testing.assert_array_equal(r[0], rew)
    np.testing.assert_array_equal(d[0], term)


def test_walker_trajectory_terminates_like_env():
    # Walker2d under random actions falls within 100 steps from this start, so the
    # bitwise test above also covers the healthy rule and the healthy reward switching off.
    *_, term = _mid_episode("Walker2d-v5")
    assert term.any() and not term.all()


def test_rows_are_independent_and_cold_start_is_close():
    oracle, state, warm, actions, obs, rew, _ = _mid_episode("HalfCheetah-v5", steps=20)
    other = np.random.default_rng(1).uniform(-1, 1, actions.shape)
    o, r, _ = oracle.rollout_from_state(
        np.stack([state, state]), np.stack([other, actions]), np.stack([warm, warm])
    )
    np.testing.assert_array_equal(o[1], obs)
    assert not np.array_equal(o[0], obs)
    cold, _, _ = oracle.rollout_from_state(state[None], actions[None])  # no warm start
    assert np.abs(cold[0] - obs).max() < OBS_STEP_TOL


def test_obs_step_matches_env_step():
    oracle, state, warm, actions, obs, rew, term = _mid_episode("HalfCheetah-v5", steps=1)
    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s, *_ = env.step(oracle.to_env(rng.uniform(-1, 1, oracle.act_dim)))
    s = torch.as_tensor(s, dtype=torch.float64)[None]
    step = oracle.step(s, torch.as_tensor(actions, dtype=torch.float64))
    err_obs = np.abs(step.next_state[0].numpy() - obs[0]).max()
    err_rew = abs(step.reward[0].item() - rew[0])
    print(f"obs_step_max_abs_error obs={err_obs:.3g} reward={err_rew:.3g}")
    assert err_obs < OBS_STEP_TOL and err_rew < OBS_STEP_TOL


def test_obs_step_over_100_steps_stays_close():
    # Each step restarts from env.step's own observation, so errors do not compound:
    # the bound is the per-step discrepancy of the cold solver start.
    oracle, state, warm, actions, obs, rew, _ = _mid_episode("HalfCheetah-v5")
    env = gym.make("HalfCheetah-v5")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s, *_ = env.step(oracle.to_env(rng.uniform(-1, 1, oracle.act_dim)))
    prev = np.concatenate([s[None], obs[:-1]])
    step = oracle.step(torch.as_tensor(prev), torch.as_tensor(actions))
    err = np.abs(step.next_state.numpy() - obs).max()
    print(f"obs_step_100_max_abs_error obs={err:.3g}")
    assert err < OBS_STEP_TOL
    assert np.abs(step.reward.numpy() - rew).max() < OBS_STEP_TOL


def test_step_contract_shapes_device_dtype():
    oracle = MujocoOracle("Walker2d-v5")
    assert oracle.differentiable is False and oracle.members == 1
    oracle.build(oracle.obs_dim, oracle.act_dim, termination=None)
    s = torch.zeros(5, oracle.obs_dim)
    s[:, 0] = 1.25  # torso height: healthy
    a = torch.zeros(5, oracle.act_dim, requires_grad=True)
    step = oracle.step(s, a, propagation="mean")
    assert step.next_state.shape == (5, oracle.obs_dim)
    assert step.reward.shape == step.terminated.shape == (5,)
    assert step.next_state.dtype == step.terminated.dtype == torch.float32
    assert not step.reward.requires_grad
    assert set(step.terminated.tolist()) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match="obs_dim=17"):
        oracle.build(3, 1)


def test_non_mujoco_env_is_refused_naming_supported():
    with pytest.raises(ConfigError) as err:
        MujocoOracle("Pendulum-v1")
    assert "Pendulum-v1" in str(err.value)
    assert all(env_id in str(err.value) for env_id in SUPPORTED)
