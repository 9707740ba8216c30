"""Every Gymnasium MuJoCo v5 env trains from the HalfCheetah SAC config with only the env
id changed, through the real ``mbvi fit``; envs mbvi cannot act in are refused at
configuration time with a message naming the space."""

import math

import gymnasium as gym
import numpy as np
import pytest
from mlflow import MlflowClient

from mbvi.errors import EnvError
from mbvi.training.env import make_env
from tests.conftest import CONFIGS, run_cli_in_process

SAC = str(CONFIGS / "halfcheetah" / "sac.yaml")

MUJOCO_V5 = [
    "Ant-v5",
    "HalfCheetah-v5",
    "Hopper-v5",
    "Humanoid-v5",
    "HumanoidStandup-v5",
    "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5",
    "Pusher-v5",
    "Reacher-v5",
    "Swimmer-v5",
    "Walker2d-v5",
]

# The smallest run that still makes M-step updates: 100 random warm-up steps, then 50
# steps with one update each, on tiny networks; one evaluation episode at the end (up to
# the env's 1000-step limit), so that every env, terminating or not, reports a return.
STEPS = 150
SHRINK = (
    "--model.total_env_steps", str(STEPS), "--model.warmup_steps", "100",
    "--model.batch_size", "16", "--model.buffer_size", "1000",
    "--model.engine.init_args.hidden", "[16]", "--model.value.init_args.hidden", "[16]",
    "--model.eval_every", str(STEPS), "--model.eval_episodes", "1",
    "--model.log_every", "50", "--model.checkpoint_every", "100000",
    "--model.compile", "false", "--model.progress_refresh_s", "0",
    "--trainer.logger.init_args.experiment_name", "envs",
)  # fmt: skip


@pytest.mark.parametrize("env_id", MUJOCO_V5)
def test_every_mujoco_env_trains_from_the_halfcheetah_sac_config(env_id, workdir, capsys):
    # An absolute store URI: MLflow caches one store per URI within a process, so a
    # relative one would keep writing to the first test's working directory.
    uri = f"sqlite:///{workdir}/mlflow.db"
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", SAC, "--model.env_id", env_id, *SHRINK,
        "--trainer.logger.init_args.tracking_uri", uri,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("envs").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["env_id"] == env_id
    (final,) = client.get_metric_history(run.info.run_id, "eval/return")
    assert final.step == STEPS and math.isfinite(final.value), final
    # The critic was trained: its loss is logged after the warm-up and is finite.
    losses = client.get_metric_history(run.info.run_id, "loss/value")
    assert losses and all(math.isfinite(m.value) for m in losses), losses
    for m in client.get_metric_history(run.info.run_id, "train/episode_return"):
        assert math.isfinite(m.value), m


class _DictObservationEnv(gym.Env):
    """A one-step env with a Dict observation (as goal-conditioned robotics envs have)."""

    observation_space = gym.spaces.Dict(
        {"position": gym.spaces.Box(-1.0, 1.0, (2,)), "goal": gym.spaces.Box(-1.0, 1.0, (2,))}
    )
    action_space = gym.spaces.Box(-1.0, 1.0, (2,))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, True, False, {}


class _ImageObservationEnv(_DictObservationEnv):
    """A one-step env that observes 16×16 RGB images."""

    observation_space = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)


gym.register("MbviDictObservation-v0", entry_point=_DictObservationEnv)
gym.register("MbviImageObservation-v0", entry_point=_ImageObservationEnv)


@pytest.mark.parametrize(
    "env_id, named",
    [("MbviDictObservation-v0", "a Dict observation space"),
     ("MbviImageObservation-v0", "a Box observation space Box(0, 255, (16, 16, 3), uint8)")],
)  # fmt: skip
def test_an_env_without_flat_box_observations_is_refused(env_id, named):
    with pytest.raises(EnvError) as err:
        make_env(env_id)
    assert named in str(err.value), err.value
    assert "supports only a flat Box observation of shape (S,)" in str(err.value)
    assert "FlattenObservation" in str(err.value)


def test_the_cli_refuses_a_dict_observation_env_before_training(workdir, capsys):
    """At configuration time: exit status 2 and the message, no run in the store."""
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", SAC, "--model.env_id", "MbviDictObservation-v0", *SHRINK,
        "--trainer.logger.init_args.tracking_uri", f"sqlite:///{workdir}/mlflow.db",
    )  # fmt: skip
    assert code == 2, err[-3000:]
    assert "'MbviDictObservation-v0' has a Dict observation space" in err, err[-3000:]
    assert "supports only a flat Box observation" in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("envs")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
