"""Planners inside the agent: they act through the CLI, keep a warm start per env
runner (reset at an episode's end; evaluation never touches training's), and train
their proposal in the M-step."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from mbvi.errors import ConfigError
from mbvi.planners import MPPI, SMC, Direct
from mbvi.training.agent import VariationalAgent
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.values import TwinQ
from tests.conftest import CONFIGS, run_cli_in_process

TINY = str(CONFIGS / "pendulum" / "mb_tiny.yaml")


def _small_value(horizon=2):
    from mbvi.models.dynamics import DynamicsEnsemble

    return ModelBasedValue(
        model=DynamicsEnsemble(members=2, elites=1, hidden=(16,)), leaf=TwinQ(hidden=(16,)),
        horizon=horizon,
    )  # fmt: skip


@pytest.mark.parametrize(
    "engine",
    [
        ["--model.engine", "mbvi.planners.SMC", "--model.engine.init_args.n_particles", "16",
         "--model.engine.init_args.horizon", "3",
         "--model.engine.init_args.proposal", "mbvi.planners.Direct"],
        ["--model.engine", "mbvi.planners.MPPI", "--model.engine.init_args.population", "16",
         "--model.engine.init_args.iterations", "2", "--model.engine.init_args.horizon", "3",
         "--model.engine.init_args.proposal", "mbvi.planners.Direct"],
    ],
    ids=["smc", "mppi"],
)  # fmt: skip
def test_a_planner_trains_through_the_cli(workdir, engine, capsys):
    uri = f"sqlite:///{workdir}/mlflow.db"
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.total_env_steps", "250",
        "--trainer.logger.init_args.tracking_uri", uri, *engine,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["engine"] in {"SMC", "MPPI"}
    assert run.info.run_name.endswith("-Uniform-H2-seed0")
    (final,) = client.get_metric_history(run.info.run_id, "eval/return")[-1:]
    assert math.isfinite(final.value)
    # the proposal was trained: its loss was logged
    assert client.get_metric_history(run.info.run_id, "loss/engine")


def test_warm_starts_are_per_runner_and_reset_at_episode_ends(workdir):
    agent = VariationalAgent(
        "Pendulum-v1", engine=MPPI(population=8, iterations=1, horizon=2, proposal=Direct((8,))),
        value=_small_value(), total_env_steps=400, warmup_steps=0, eval_episodes=1,
        progress_refresh_s=0,
    )  # fmt: skip
    agent.setup("fit")
    obs = agent.runner.obs
    agent._policy(obs)
    train_state = agent._plan_states["train"]
    assert train_state is not None and agent._plan_states["eval"] is None
    before = {k: v.clone() for k, v in train_state.items() if torch.is_tensor(v)}
    agent.run_evaluation()  # a whole evaluation episode plans on its own state
    assert agent._plan_states["train"] is train_state
    for k, v in before.items():
        torch.testing.assert_close(train_state[k], v)
    assert agent._plan_states["eval"] is not None
    # an episode's end resets the training runner's plan (Pendulum: 200 steps)
    for _ in range(200):
        agent._act_and_store()
    assert agent.runner.episodes == 1
    assert agent._plan_states["train"] is None


def test_a_planner_refuses_a_model_free_value_at_configuration_time(workdir):
    with pytest.raises(ConfigError, match="model"):
        VariationalAgent("Pendulum-v1", engine=SMC(n_particles=8, horizon=3), value=TwinQ())


def test_the_oracle_plans_but_gradient_engines_refuse_it(workdir):
    from mbvi.models.oracle import MujocoOracle

    def oracle_value():
        return ModelBasedValue(model=MujocoOracle("HalfCheetah-v5"), leaf=TwinQ(hidden=(16,)),
                               horizon=2)  # fmt: skip

    with pytest.raises(ConfigError, match="MujocoOracle is not differentiable"):
        VariationalAgent("HalfCheetah-v5", engine=Direct((8,)), value=oracle_value())
    agent = VariationalAgent(
        "HalfCheetah-v5", engine=MPPI(population=8, iterations=1, horizon=3),
        value=oracle_value(), total_env_steps=60, warmup_steps=20, batch_size=16,
        eval_every=60, eval_episodes=1, progress_refresh_s=0,
    )  # fmt: skip
    from tests.conftest import fit_agent

    fit_agent(agent, workdir, logger=False)
    assert agent.env_steps == 60 and math.isfinite(agent.last_eval_return)
