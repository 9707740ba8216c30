"""The agent through the Python API: env handling, NaN stops, seeding."""

import copy
import io
from functools import partial

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mbvi import (
    ConstantTanhGaussianPrior,
    LearnedPrior,
    MLflowTracker,
    NonFiniteError,
    TwinQ,
    UniformPrior,
    VariationalAgent,
)
from mbvi.errors import CheckpointError, ConfigError, EnvError
from mbvi.planners import Direct, GradientRefinement, Iterative
from mbvi.pyro import ProgramPrior
from mbvi.training.checkpoints import validate_checkpoint
from mbvi.training.components import build_component, component_spec
from mbvi.training.env import make_env
from mbvi.training.rng import capture_rng_state
from mbvi.training.runner import EnvRunner, evaluate
from tests.conftest import TINY_AGENT, accelerator, fit_agent


class NaNAfter(gym.Wrapper):
    """Pendulum whose observation turns NaN at the 150th step."""

    def __init__(self, env_id="Pendulum-v1", after=150):
        super().__init__(gym.make(env_id))
        self.after, self.count = after, 0

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.count += 1
        if self.count >= self.after:
            obs = obs * np.nan
        return obs, r, term, trunc, info


gym.register("NaNPendulum-v0", entry_point=NaNAfter)


class NaNOnSecondReset(gym.Wrapper):
    """Pendulum whose second reset observation is NaN or, built with ``nan_reward``,
    whose rewards are all NaN."""

    def __init__(self, nan_reward=False):
        super().__init__(gym.make("Pendulum-v1"))
        self.resets, self.nan_reward = 0, nan_reward

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.resets += 1
        return (obs * np.nan if self.resets == 2 and not self.nan_reward else obs), info

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        return obs, (np.nan if self.nan_reward else r), term, trunc, info


gym.register("NaNResetPendulum-v0", entry_point=NaNOnSecondReset)
gym.register("NaNRewardPendulum-v0", entry_point=partial(NaNOnSecondReset, nan_reward=True))


def tiny_agent(env_id="Pendulum-v1", **overrides):
    return VariationalAgent(
        env_id,
        engine=Direct(hidden=(32, 32)),
        value=TwinQ(hidden=(32, 32)),
        **{**TINY_AGENT, **overrides},
    )


def only_run(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    return run


def fit(agent, workdir):
    logger = MLflowTracker(experiment_name="t", tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    return fit_agent(agent, workdir, logger), logger


def test_unknown_env_suggests_close_names():
    with pytest.raises(EnvError, match=r"Did you mean 'HalfCheetah-v5'"):
        make_env("HalfCheeta-v5")


def test_an_env_from_the_users_module(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('MyPendulum-v0', entry_point='gymnasium.envs.classic_control:PendulumEnv',"
        " max_episode_steps=50)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("my_envs:MyPendulum-v0")
    assert env.spec.id == "MyPendulum-v0" and env.spec.max_episode_steps == 50
    with pytest.raises(EnvError, match="module 'no_such_envs' cannot be imported"):
        make_env("no_such_envs:Thing-v0")


def test_discrete_env_is_rejected():
    with pytest.raises(EnvError, match="Discrete action space; mbvi needs continuous Box"):
        make_env("CartPole-v1")


def test_termination_is_stored_and_truncation_is_not():
    runner = EnvRunner("InvertedPendulum-v5", seed=0)  # terminates when the pole falls
    rng = np.random.default_rng(0)
    transitions = [runner.step(lambda o: rng.uniform(-1, 1, 1), i) for i in range(300)]
    ends = [i for i, t in enumerate(transitions) if t.episode_return is not None]
    assert ends and all(transitions[i].terminated for i in ends)
    for i in ends[:-1]:  # the next transition starts from a reset, not from next_obs
        assert not np.allclose(transitions[i + 1].obs, transitions[i].next_obs)
    pend = EnvRunner("Pendulum-v1", seed=0)  # only a 200-step time limit
    out = [pend.step(lambda o: np.zeros(1), i) for i in range(201)]
    assert out[199].episode_return is not None and not out[199].terminated
    assert not any(t.terminated for t in out)


def test_actions_are_rescaled_to_the_env_bounds():
    runner = EnvRunner("Pendulum-v1", seed=0)  # torque bounds ±2
    np.testing.assert_allclose(runner.scaler.to_env(np.array([1.0])), [2.0])
    np.testing.assert_allclose(runner.scaler.to_env(np.array([-0.5])), [-1.0])


def test_nan_observation_stops_with_a_message_and_keeps_the_last_checkpoint(workdir):
    agent = tiny_agent("NaNPendulum-v0")
    with pytest.raises(
        NonFiniteError, match=r"observation from env 'NaNPendulum-v0' is NaN or Inf at env step 150"
    ):
        fit(agent, workdir)
    run = only_run(workdir)
    assert run.info.status == "FAILED"
    ckpt = torch.load(workdir / "checkpoints" / run.info.run_id / "last.ckpt", weights_only=True)
    assert ckpt["mbvi"]["env_steps"] == 100  # the last good one


def test_a_nan_reset_observation_is_named_with_its_env_step():
    runner = EnvRunner("NaNResetPendulum-v0", seed=0)  # Pendulum truncates at 200 steps
    zero = lambda obs: np.zeros(1)  # noqa: E731
    for step in range(1, 200):
        runner.step(zero, step)
    with pytest.raises(
        NonFiniteError,
        match=r"observation from env 'NaNResetPendulum-v0' is NaN or Inf at the reset after "
        r"env step 200",
    ):
        runner.step(zero, 200)


def test_a_nan_in_an_evaluation_episode_is_named():
    runner = EnvRunner("NaNRewardPendulum-v0", seed=0)
    with pytest.raises(
        NonFiniteError,
        match=r"reward from env .* is NaN or Inf in an evaluation episode at env step 500",
    ):
        evaluate(runner, lambda obs: np.zeros(1), episodes=1, env_step=500)


def test_a_failure_before_any_checkpoint_says_so(workdir, monkeypatch):
    agent = tiny_agent(checkpoint_every=1000)
    original = agent.value.loss

    def poisoned(s, a, y):
        loss, metrics = original(s, a, y)
        return loss * float("nan"), metrics

    monkeypatch.setattr(agent.value, "loss", poisoned)
    with pytest.raises(NonFiniteError) as raised:
        fit(agent, workdir)
    assert raised.value.__notes__ == ["This run wrote no checkpoint before it."]
    assert not list(workdir.glob("checkpoints/*/last.ckpt"))


def test_nan_loss_stops_naming_the_loss(workdir, monkeypatch):
    agent = tiny_agent()
    original = agent.value.loss

    def poisoned(s, a, y):
        loss, metrics = original(s, a, y)
        return loss * float("nan"), metrics

    monkeypatch.setattr(agent.value, "loss", poisoned)
    with pytest.raises(
        NonFiniteError, match=r"loss/value became NaN or Inf by env step 10[0-9]; training stopped"
    ) as raised:
        fit(agent, workdir)
    (note,) = raised.value.__notes__  # what is left to resume from
    assert note.startswith("The last good checkpoint (env step 100) is kept: ")
    run = only_run(workdir)
    assert run.info.status == "FAILED"


def test_same_seed_gives_the_same_metrics(workdir):
    histories = []
    for i in range(2):
        d = workdir / str(i)
        d.mkdir()
        _, logger = fit(tiny_agent(total_env_steps=2000, warmup_steps=500, eval_every=1000), d)
        client = MlflowClient(f"sqlite:///{d}/mlflow.db")
        histories.append(
            {
                key: [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]
                for key in [
                    "loss/value",
                    "loss/engine",
                    "train/alpha",
                    "train/episode_return",
                    "eval/return",
                ]
            }
        )
    assert histories[0]["eval/return"][-1][0] == 2000
    assert histories[0] == histories[1]


def test_evaluation_runs_on_its_own_random_stream():
    """Iterative samples ∇λJ̃ even when acting on the mean: evaluating must neither
    consume training's torch stream nor depend on it."""
    agent = VariationalAgent(
        "Pendulum-v1",
        prior=ConstantTanhGaussianPrior(),
        engine=Iterative(hidden=(16, 16), n_samples=4),
        value=TwinQ(hidden=(16, 16)),
        **{**TINY_AGENT, "eval_episodes": 1},
    )
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = agent.run_evaluation()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(4)  # another training stream: the same evaluation
    agent.eval_runner.restart(agent.hparams.seed + 1)
    assert agent.run_evaluation() == first


def test_gap_measurement_leaves_training_streams_alone():
    agent = VariationalAgent("Pendulum-v1", **{**TINY_AGENT, "gap_states": 8})
    agent.setup("fit")
    for _ in range(50):
        agent._act_and_store()  # warm-up: uniform actions from the agent's numpy stream
    torch.manual_seed(5)
    torch_state, replay_state = torch.get_rng_state(), agent.buffer.generator.get_state()
    first = agent.measure_amortisation_gap()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(agent.buffer.generator.get_state(), replay_state)
    assert agent.measure_amortisation_gap() == first


def test_amortisation_gap_is_logged(workdir):
    agent = tiny_agent(total_env_steps=200, gap_every=200, gap_states=16)
    _, logger = fit(agent, workdir)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (gap,) = client.get_metric_history(logger.run_id, "inference/amortisation_gap")
    assert gap.step == 200 and gap.value > -0.5  # refinement starts from the engine's answer


def test_parts_with_equal_learning_rates_share_an_adam_group():
    """Fewer param groups make Adam's step cheaper; each part still gets its own lr."""
    kw = dict(engine=Direct(hidden=(8, 8)), value=TwinQ(hidden=(8, 8)), **TINY_AGENT)
    groups = VariationalAgent("Pendulum-v1", **kw).configure_optimizers().param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == 6 + 6 + 1  # Q, π, log α
    agent = VariationalAgent("Pendulum-v1", value_lr=1e-3, alpha_lr=0.1, **kw)
    lr_of = {id(p): g["lr"] for g in agent.configure_optimizers().param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in agent.value.q.parameters()} == {1e-3}
    assert not any(id(p) in lr_of for p in agent.value.q_target.parameters())  # Polyak only
    assert {lr_of[id(p)] for p in agent.engine.parameters()} == {3e-4}
    assert lr_of[id(agent.log_alpha)] == 0.1


@pytest.mark.parametrize(
    "component",
    [
        lambda: UniformPrior(),
        lambda: ConstantTanhGaussianPrior(loc=0.1, scale=0.5),
        lambda: LearnedPrior(hidden=(16,), eps_scale=1e-3),
        lambda: ProgramPrior("examples.mixture_prior.two_gait_prior"),
        lambda: Direct(hidden=(8, 4), n_samples=2),
        lambda: Iterative(hidden=(8,), iterations=3, n_samples=6, antithetic=True, init_loc=0.0),
        lambda: GradientRefinement(steps=5, lr=0.1),
        lambda: TwinQ(hidden=(8, 8), members=3, reduce="mean", tau=0.01),
    ],
)
def test_component_specs_rebuild_the_same_component(component):
    """What a checkpoint keeps of each component rebuilds it with the same arguments."""
    spec = component_spec(component())
    rebuilt = build_component(spec)
    assert type(rebuilt) is type(component()) and component_spec(rebuilt) == spec
    assert spec["class_path"].startswith("mbvi.") or spec["class_path"].startswith("examples.")
    torch.save(spec, io.BytesIO())  # plain data: loadable with weights_only=True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gamma=1.5), r"gamma must be in \(0, 1\], got 1.5"),
        (dict(eval_episodes=0), "eval_episodes must be >= 1, got 0"),
        (dict(updates_per_step=0), "updates_per_step must be >= 1, got 0"),
        (dict(warmup_steps=-1), r"warmup_steps must be in \[0, total_env_steps = 300\)"),
        (dict(warmup_steps=300), "no update would ever run"),
        (dict(batch_size=400), r"min\(buffer_size, total_env_steps\) = 300"),
        (dict(target_kl_per_dim=0.005), "0.005 cannot be met under UniformPrior"),
        (dict(engine_lr=-1e-3), "engine_lr must be >= 0"),
        (dict(prior_lr=float("nan")), "prior_lr must be >= 0"),
        (dict(gap_every=-1), "gap_every must be >= 0"),
        (dict(gap_states=0), "gap_states must be >= 1, got 0"),
        (dict(value=lambda: TwinQ(members=0)), "TwinQ members must be >= 1"),
        (dict(value=lambda: TwinQ(tau=0.0)), r"TwinQ tau must be in \(0, 1\]"),
    ],
)
def test_configurations_that_cannot_train_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        args = {k: v() if callable(v) else v for k, v in overrides.items()}
        VariationalAgent(**{**TINY_AGENT, **args})


def test_a_non_finite_parameter_is_never_checkpointed(workdir, monkeypatch):
    """A parameter gone NaN while the logged losses are still finite stops the run at
    the next checkpoint, naming the parameter; the checkpoint on disk predates it."""
    agent = tiny_agent()
    original = agent.update

    def poisoning(*batch):
        metrics = original(*batch)
        if agent.env_steps == 200:  # after this step's losses, before its checkpoint
            with torch.no_grad():
                agent.value.q_target.net.layers[0].weight[0, 0, 0] = float("nan")
        return metrics

    monkeypatch.setattr(agent, "update", poisoning)
    with pytest.raises(NonFiniteError, match=r"parameter value\.q_target\..* at env step 200"):
        fit(agent, workdir)
    run = only_run(workdir)
    assert run.info.status == "FAILED"
    ckpt = torch.load(workdir / "checkpoints" / run.info.run_id / "last.ckpt", weights_only=True)
    assert ckpt["mbvi"]["env_steps"] == 100


def test_resume_restores_networks_optimiser_alpha_and_random_streams(workdir):
    _, logger = fit(tiny_agent(total_env_steps=200), workdir)
    path = workdir / "checkpoints" / logger.run_id / "last.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="already reaches this run's budget of 200"):
        validate_checkpoint(path, tiny_agent(total_env_steps=200))

    seen = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, agent):
            seen["state"] = {k: v.cpu().clone() for k, v in agent.state_dict().items()}
            seen["optimiser"] = copy.deepcopy(trainer.optimizers[0].state_dict())
            seen["rng"] = capture_rng_state(agent._rng)
            seen["env_steps"], seen["buffer"] = agent.env_steps, len(agent.buffer)

    resumed = tiny_agent(total_env_steps=300)
    fresh = {k: v.clone() for k, v in resumed.state_dict().items()}
    trainer = L.Trainer(
        logger=False, max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(workdir), accelerator=accelerator(),
        callbacks=[Snapshot()],
    )  # fmt: skip
    trainer.fit(resumed, ckpt_path=path)

    assert seen["env_steps"] == 200 and seen["buffer"] == 200 and resumed.env_steps == 300
    changed = [k for k, v in saved["state_dict"].items() if not torch.equal(v, fresh[k])]
    assert "log_alpha" in changed and any(k.startswith("value.q_target") for k in changed)
    for key, value in saved["state_dict"].items():  # networks, targets, α
        assert torch.equal(seen["state"][key], value), key
    saved_opt = saved["optimizer_states"][0]["state"]
    assert saved_opt and saved_opt.keys() == seen["optimiser"]["state"].keys()
    for i, state in saved_opt.items():
        for name, value in state.items():
            assert torch.equal(seen["optimiser"]["state"][i][name].cpu(), value), (i, name)
    rng = saved["mbvi"]["rng"]
    assert torch.equal(seen["rng"]["torch"], rng["torch"])
    assert torch.equal(seen["rng"]["numpy"][1], rng["numpy"][1])
    assert seen["rng"]["python"] == rng["python"]
    assert seen["rng"]["generator"] == rng["generator"]
