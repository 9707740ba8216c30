"""Termination rules against the real envs: a rule must call every step of real
trajectories exactly as ``env.step``'s ``terminated`` does, terminating steps included."""

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch

from mbvi.errors import EnvError
from mbvi.models import DynamicsEnsemble
from mbvi.models.termination import NeverTerminates, TipHeight, termination_for_env


def _rollout(env, policy: str, steps: int, seed: int = 0):
    """(s, a, s_next, terminated) of ``steps`` env steps over as many episodes as fit.
    ``random``: uniform actions; ``biased``: a constant push (+0.7 on every dim) plus
    noise, which topples walkers and pendulums sooner; ``bang``: ±1 per dim, flipping
    sign every 3 steps."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    rows: list[tuple] = []
    obs, _ = env.reset(seed=seed)
    k = 0
    for _ in range(steps):
        if policy == "random":
            u = rng.uniform(-1, 1, low.shape)
        elif policy == "biased":
            u = np.clip(0.7 + 0.3 * rng.standard_normal(low.shape), -1, 1)
        else:
            u = np.sign(rng.uniform(-1, 1, low.shape)) * (1 if (k // 3) % 2 else -1)
        a = low + (u + 1) / 2 * (high - low)
        nxt, _, terminated, truncated, _ = env.step(a)
        rows.append((obs, a, nxt, float(terminated)))
        obs, k = nxt, k + 1
        if terminated or truncated:
            obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
            k = 0
    s, a, s2, d = (torch.as_tensor(np.array(x)) for x in zip(*rows))
    return s, a, s2, d


RULE_CASES = [
    ("Hopper-v5", {}, "random"),
    ("Hopper-v5", {}, "biased"),
    # the rule's indices move with the x position, its thresholds with the env's own
    (
        "Hopper-v5",
        dict(
            exclude_current_positions_from_observation=False,
            healthy_z_range=(0.9, float("inf")),
            healthy_angle_range=(-0.3, 0.3),
        ),
        "random",
    ),  # fmt: skip
    ("Hopper-v5", dict(healthy_state_range=(-4.0, 4.0)), "bang"),  # speeds decide: exact
    ("Walker2d-v5", {}, "random"),
    ("Walker2d-v5", dict(exclude_current_positions_from_observation=False), "random"),
    ("Ant-v5", {}, "random"),
    ("Ant-v5", dict(include_cfrc_ext_in_observation=False, healthy_z_range=(0.3, 0.9)), "bang"),
    ("Ant-v5", dict(exclude_current_positions_from_observation=False), "bang"),
    ("Humanoid-v5", {}, "random"),
    ("Humanoid-v5", dict(exclude_current_positions_from_observation=False), "biased"),
    ("InvertedPendulum-v5", {}, "random"),
    ("InvertedPendulum-v5", {}, "biased"),
    ("InvertedDoublePendulum-v5", {}, "random"),
    ("InvertedDoublePendulum-v5", {}, "biased"),
]


@pytest.mark.parametrize("env_id,kwargs,policy", RULE_CASES)
def test_rule_agrees_with_env_step(env_id, kwargs, policy):
    env = gym.make(env_id, **kwargs)
    rule, kind = termination_for_env(env)
    assert kind == "rule"
    assert not list(rule.parameters()) and not list(rule.buffers())
    s, a, s2, d = _rollout(env, policy, steps=250)
    pred = rule(s, a, s2)
    assert pred.shape == d.shape and pred.dtype == s2.dtype
    assert d.sum() >= 1, f"{env_id} {kwargs} {policy}: no episode terminated"
    wrong = (pred != d).nonzero().flatten().tolist()
    assert not wrong, f"{env_id}: rule disagrees with env.step at steps {wrong[:10]}"


def test_hopper_exactness_follows_the_state_range():
    assert not termination_for_env(gym.make("Hopper-v5"))[0].exact  # (-100, 100) > ±10 clip
    assert termination_for_env(gym.make("Hopper-v5", healthy_state_range=(-4, 4)))[0].exact
    assert termination_for_env(gym.make("Walker2d-v5"))[0].exact
    assert not termination_for_env(gym.make("InvertedDoublePendulum-v5"))[0].exact


def test_double_pendulum_tip_height_is_the_models_kinematics():
    """With the kinematics computed for the observed angles (mj_forward), the rule's tip
    height is MuJoCo's, to rounding: the only gap left is the env's stale site_xpos."""
    env = gym.make("InvertedDoublePendulum-v5")
    rule, _ = termination_for_env(env)
    assert isinstance(rule, TipHeight)
    u = env.unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        u.data.qpos[:] = rng.uniform(-np.pi, np.pi, 3)
        mujoco.mj_forward(u.model, u.data)
        obs = torch.as_tensor(u._get_obs())[None]
        tip = u.data.site_xpos[0][2]
        assert (tip <= rule.min_height) == bool(rule(obs, obs, obs))
        s1, s2, c1, c2 = obs[0, 1:5].tolist()
        z = (rule.z0 - rule.pole2[0] * s1 + rule.pole2[1] * c1
             - rule.tip[0] * (s1 * c2 + c1 * s2) + rule.tip[1] * (c1 * c2 - s1 * s2))  # fmt: skip
        assert abs(z - tip) < 1e-12


@pytest.mark.parametrize(
    "env_id",
    ["Pendulum-v1", "HalfCheetah-v5", "Swimmer-v5", "Reacher-v5", "Pusher-v5",
     "HumanoidStandup-v5"],
)  # fmt: skip
def test_never_terminating_envs(env_id):
    env = gym.make(env_id)
    rule, kind = termination_for_env(env)
    assert kind == "never" and isinstance(rule, NeverTerminates)
    s, a, s2, d = _rollout(env, "random", steps=60)
    assert d.sum() == 0
    assert torch.equal(rule(s, a, s2), torch.zeros_like(d))


def test_terminate_when_unhealthy_false_never_terminates():
    rule, kind = termination_for_env(gym.make("Hopper-v5", terminate_when_unhealthy=False))
    assert kind == "never" and isinstance(rule, NeverTerminates)


@pytest.mark.parametrize("env_id", ["MountainCarContinuous-v0", "Hopper-v4"])
def test_other_envs_get_a_learned_head(env_id):
    assert termination_for_env(gym.make(env_id)) == (None, "learned")


def test_refuses_a_quantity_missing_from_the_observation(monkeypatch):
    env = gym.make("Hopper-v5")
    structure = dict(env.unwrapped.observation_structure, skipped_qpos=2)
    monkeypatch.setattr(env.unwrapped, "observation_structure", structure)
    with pytest.raises(EnvError) as err:
        termination_for_env(env)
    msg = str(err.value)
    assert "'Hopper-v5'" in msg and "the height z (qpos[1])" in msg
    assert "exclude_current_positions_from_observation=False" in msg


def test_refuses_a_wrapper_that_changes_the_observation():
    env = gym.wrappers.FrameStackObservation(gym.make("Walker2d-v5"), 2)
    with pytest.raises(
        EnvError, match=r"a wrapper changes the observation from \(17,\) to \(2, 17\)"
    ):
        termination_for_env(env)


def test_a_rule_leaves_the_models_state_dict_alone():
    rule, _ = termination_for_env(gym.make("Hopper-v5"))
    with_rule, without = DynamicsEnsemble(2, 1, (8,)), DynamicsEnsemble(2, 1, (8,))
    with_rule.build(11, 3, rule)
    without.build(11, 3)
    assert with_rule.state_dict().keys() == without.state_dict().keys()
    s = torch.zeros(4, 11)
    s[:, 0] = 1.25  # healthy height, angle 0
    assert with_rule._terminated(s, torch.zeros(4, 3), s).tolist() == [0.0] * 4
    s[1, 0] = 0.5  # fallen
    assert with_rule._terminated(s, torch.zeros(4, 3), s).tolist() == [0.0, 1.0, 0.0, 0.0]
