"""``mbvi fit-model`` and ``mbvi export-transitions`` through the real console script,
read back from the MLflow store, and the transitions format's checks.

Runs that train go through the installed ``mbvi`` in a subprocess; checks that fail
before training call the same entry point, ``mbvi.cli.main``, in this process.
"""

import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mbvi.errors import CheckpointError
from mbvi.models import DynamicsEnsemble
from mbvi.models.termination import NeverTerminates
from mbvi.training.model_cli import ModelCLI, load_dynamics
from mbvi.training.transitions import (
    TransitionsDataModule,
    TransitionsError,
    load_transitions,
)
from tests.conftest import CONFIGS, MBVI, cli_env, run_cli_in_process, stop_once_checkpointed

PENDULUM = str(CONFIGS / "models" / "pendulum.yaml")
HALFCHEETAH = str(CONFIGS / "models" / "halfcheetah.yaml")
TINY = """\
model:
  model:
    init_args:
      members: 2
      elites: 1
      hidden: [16, 16]
  max_epochs: 2
data:
  batch_size: 64
"""


def random_transitions(env_id: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random-action transitions of ``env_id`` in the file format (actions in
    [-1, 1]^A, the env's bounds mapped onto the cube)."""
    env = gym.make(env_id)
    low, high = env.action_space.low, env.action_space.high
    rng = np.random.default_rng(seed)
    rows = []
    obs, _ = env.reset(seed=seed)
    for _ in range(n):
        a = rng.uniform(-1, 1, low.shape).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(low + (a + 1) / 2 * (high - low))
        rows.append((obs, a, r, nxt, float(term)))
        obs = env.reset()[0] if term or trunc else nxt
    fields = dict(zip(("obs", "act", "rew", "next_obs", "term"), map(np.array, zip(*rows))))
    return {**fields, "env_id": np.array(env_id)}


def mbvi(cwd, *args, timeout=300):
    return subprocess.run([MBVI, *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def mbvi_here(capsys, *args) -> tuple[int, str]:
    """``mbvi *args`` in this process -> (exit status, stderr)."""
    code, _, err = run_cli_in_process(capsys, *args)
    return code, err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fit-model run of the tiny sizes on 600 Pendulum transitions: its folder."""
    cwd = tmp_path_factory.mktemp("fit_model")
    np.savez(cwd / "pendulum.npz", **random_transitions("Pendulum-v1", 600))
    (cwd / "tiny.yaml").write_text(TINY)
    proc = mbvi(cwd, "fit-model", "--config", PENDULUM, "--config", "tiny.yaml",
                "--data.path", "pendulum.npz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 1" in proc.stdout + proc.stderr  # Lightning's progress bar
    return cwd


def only_run(cwd, experiment="models"):
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_fit_model_logs_a_finished_run_and_its_checkpoints(fitted):
    client, run = only_run(fitted)
    assert run.info.status == "FINISHED"
    assert run.data.params["env_id"] == "Pendulum-v1"
    assert run.data.params["members"] == "2" and run.data.params["termination"] == "never"
    history = client.get_metric_history(run.info.run_id, "model/holdout_nll")
    assert len(history) == 2 and all(np.isfinite(m.value) for m in history)  # one per epoch
    assert client.get_metric_history(run.info.run_id, "model/holdout_mse")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (fitted / "checkpoints" / "models" / run.info.run_id / "best.ckpt").is_file()


def test_a_saved_model_loads_with_its_sizes_rule_and_elites(fitted):
    _, run = only_run(fitted)
    path = fitted / "checkpoints" / "models" / run.info.run_id / "best.ckpt"
    model = load_dynamics(path, "Pendulum-v1")
    assert isinstance(model, DynamicsEnsemble) and not model.training
    assert (model.members, model.elites, model.hidden) == (2, 1, (16, 16))
    assert isinstance(model.termination, NeverTerminates)
    # the checkpoint's elites are those of its own weights (chosen before it was taken)
    _, hold = TransitionsDataModule(str(fitted / "pendulum.npz"), "Pendulum-v1").load()
    _, mse = model.holdout_scores(*hold[:4])
    assert model.elite_idx.tolist() == mse.argsort()[:1].tolist()
    step = model.step(torch.zeros(5, 3), torch.zeros(5, 1))
    assert step.next_state.shape == (5, 3) and torch.isfinite(step.next_state).all()

    like = DynamicsEnsemble(members=3, elites=1, hidden=(16, 16))
    with pytest.raises(
        CheckpointError,
        match=r"holds an ensemble with members=2 for env 'Pendulum-v1', but the configured one has members=3",
    ):
        load_dynamics(path, "Pendulum-v1", like=like)
    with pytest.raises(
        CheckpointError,
        match=r"is for env 'Pendulum-v1' \(obs_dim=3, act_dim=1, members=2, .*\), not for env 'HalfCheetah-v5'",
    ):
        load_dynamics(path, "HalfCheetah-v5")


def test_resume_continues_the_fit(fitted):
    _, run = only_run(fitted)
    last = fitted / "checkpoints" / "models" / run.info.run_id / "last.ckpt"
    proc = mbvi(fitted, "fit-model", "--config", PENDULUM, "--config", "tiny.yaml",
                "--data.path", "pendulum.npz", "--ckpt_path", str(last),
                "--model.max_epochs", "3", "--trainer.logger.init_args.experiment_name",
                "resumed")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, resumed = only_run(fitted, "resumed")
    assert resumed.info.status == "FINISHED"
    (third,) = client.get_metric_history(resumed.info.run_id, "model/holdout_nll")
    assert third.step > 0  # epochs 0-1 came from the checkpoint


def test_a_checkpoint_of_other_sizes_is_refused_before_training(fitted, capsys, monkeypatch):
    monkeypatch.chdir(fitted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, run = only_run(fitted)
    last = str(fitted / "checkpoints" / "models" / run.info.run_id / "last.ckpt")
    code, err = mbvi_here(capsys, "fit-model", "--config", PENDULUM, "--config", "tiny.yaml",
                          "--data.path", "pendulum.npz", "--ckpt_path", last,
                          "--model.model.init_args.hidden", "[32, 32]",
                          "--trainer.logger.init_args.experiment_name", "refused")  # fmt: skip
    assert code == 2
    assert (
        "holds an ensemble with hidden=(16, 16) for env 'Pendulum-v1', but the configured one has hidden=(32, 32)"
        in err
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{fitted}/mlflow.db")
    assert client.get_experiment_by_name("refused") is None  # no run was started


def test_an_initial_model_of_another_env_is_refused(fitted, capsys, monkeypatch):
    monkeypatch.chdir(fitted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    np.savez(fitted / "cheetah.npz", **random_transitions("HalfCheetah-v5", 40))
    _, run = only_run(fitted)
    best = str(fitted / "checkpoints" / "models" / run.info.run_id / "best.ckpt")
    code, err = mbvi_here(capsys, "fit-model", "--config", HALFCHEETAH, "--config", "tiny.yaml",
                          "--data.path", "cheetah.npz", "--init_from", best)  # fmt: skip
    assert code == 2
    assert "is for env 'Pendulum-v1' (obs_dim=3, act_dim=1" in err
    assert "not for env 'HalfCheetah-v5'" in err


@pytest.fixture(scope="module")
def agent_checkpoint(tmp_path_factory):
    """The last.ckpt of a 200-step tiny agent run through the real ``mbvi fit``."""
    cwd = tmp_path_factory.mktemp("agent")
    proc = mbvi(cwd, "fit", "--config", str(CONFIGS / "pendulum" / "tiny.yaml"),
                "--model.total_env_steps", "200")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (cwd / "checkpoints").glob("*/last.ckpt")
    return path


def test_export_transitions_writes_the_replay_buffer(agent_checkpoint, tmp_path):
    proc = mbvi(tmp_path, "export-transitions", "--ckpt", str(agent_checkpoint),
                "--out", "buffer.npz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 200 transitions of Pendulum-v1 to buffer.npz" in proc.stdout
    buffer = torch.load(agent_checkpoint, weights_only=True)["mbvi"]["buffer"]
    data = load_transitions(tmp_path / "buffer.npz", "Pendulum-v1", obs_dim=3, act_dim=1)
    assert data.env_id == "Pendulum-v1" and len(data) == 200
    for f in ("obs", "act", "rew", "next_obs", "term"):
        assert torch.equal(getattr(data, f), buffer[f]), f
    # a data module reads the checkpoint itself the same way
    dm = TransitionsDataModule(str(agent_checkpoint), "Pendulum-v1")
    train, hold = dm.load()
    assert len(train[0]) + len(hold[0]) == 200 and len(hold[0]) > 0
    wrong = TransitionsDataModule(str(agent_checkpoint), "Hopper-v5")
    with pytest.raises(
        TransitionsError,
        match=r"checkpoint '.*last.ckpt' is from env 'Pendulum-v1', not 'Hopper-v5'",
    ):
        wrong.load()


def test_export_of_a_non_agent_checkpoint_is_refused(fitted, capsys, tmp_path):
    _, run = only_run(fitted)
    best = str(fitted / "checkpoints" / "models" / run.info.run_id / "best.ckpt")
    code, err = mbvi_here(capsys, "export-transitions", "--ckpt", best,
                          "--out", str(tmp_path / "x.npz"))  # fmt: skip
    assert code == 2
    assert "was not written by an mbvi agent (no replay buffer under 'mbvi')" in err


# ---- the file format's checks ------------------------------------------------------------
@pytest.fixture
def good():
    rng = np.random.default_rng(0)
    return {
        "obs": rng.normal(size=(20, 3)),
        "act": rng.uniform(-1, 1, (20, 1)),
        "rew": rng.normal(size=20),
        "next_obs": rng.normal(size=(20, 3)),
        "term": np.zeros(20),
        "env_id": np.array("Pendulum-v1"),
    }


def write(tmp_path, fields) -> str:
    path = tmp_path / "t.npz"
    np.savez(path, **fields)
    return str(path)


def test_a_good_file_loads_as_float32(tmp_path, good):
    data = load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)
    assert data.obs.dtype == torch.float32 and data.obs.shape == (20, 3)
    assert data.env_id == "Pendulum-v1"
    np.testing.assert_allclose(data.rew.numpy(), good["rew"], rtol=1e-6)


def test_missing_field(tmp_path, good):
    del good["next_obs"]
    with pytest.raises(
        TransitionsError,
        match=r"has no field 'next_obs' \(fields present: act, env_id, obs, rew, term\)",
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)


@pytest.mark.parametrize("field,row", [("obs", 7), ("rew", 3), ("term", 19)])
def test_non_finite_values_name_field_and_first_row(tmp_path, good, field, row):
    good[field] = good[field].astype(np.float64)
    good[field][row] = np.nan
    good[field][row + 1 :] = np.inf
    with pytest.raises(
        TransitionsError,
        match=rf"field '{field}' has a non-finite value \(.*nan.*\) in row {row} \(the first bad row\)",
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)


def test_dimensions_that_do_not_fit_the_env(tmp_path, good):
    good["obs"] = np.zeros((20, 4))
    with pytest.raises(
        TransitionsError,
        match=r"field 'obs' has shape \(20, 4\) but env 'Pendulum-v1' has 3-dim observations: expected \(N, 3\)",
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)
    good["obs"] = np.zeros((20, 3))
    good["act"] = np.zeros((20, 6))
    with pytest.raises(
        TransitionsError,
        match=r"field 'act' has shape \(20, 6\) but env 'Pendulum-v1' has 1-dim actions: expected \(N, 1\)",
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)


def test_mismatched_lengths(tmp_path, good):
    good["rew"] = good["rew"][:19]
    with pytest.raises(
        TransitionsError,
        match=r"the fields have different lengths \(obs 20, act 20, rew 19, next_obs 20, term 20\)",
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)


def test_other_env_unscaled_actions_and_bad_flags(tmp_path, good):
    with pytest.raises(
        TransitionsError, match=r"holds transitions of env 'Pendulum-v1', not of 'Hopper-v5'"
    ):
        load_transitions(write(tmp_path, good), "Hopper-v5")
    good["act"][4] = 2.0
    with pytest.raises(
        TransitionsError, match=r"field 'act' has values outside \[-1, 1\] \(row 4: \[2\.\]\)"
    ):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)
    good["act"][4] = 0.5
    good["term"][2] = 0.5
    with pytest.raises(TransitionsError, match=r"field 'term' must be 0 or 1, but row 2 holds 0.5"):
        load_transitions(write(tmp_path, good), "Pendulum-v1", 3, 1)


def test_a_bad_data_file_fails_before_a_run_starts(tmp_path, good, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good["rew"][5] = np.nan
    write(tmp_path, good)
    (tmp_path / "tiny.yaml").write_text(TINY)
    code, err = mbvi_here(capsys, "fit-model", "--config", PENDULUM, "--config", "tiny.yaml",
                          "--data.path", "t.npz")  # fmt: skip
    assert code == 2
    assert "mbvi: error: transitions file 't.npz': field 'rew' has a non-finite value" in err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("models")
    assert exp is None or not client.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    "config,env_id", [(PENDULUM, "Pendulum-v1"), (HALFCHEETAH, "HalfCheetah-v5")]
)
def test_shipped_model_configs_build(config, env_id, workdir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mbvi"])
    from mbvi.models.dynamics_module import DynamicsModule

    cli = ModelCLI(DynamicsModule, TransitionsDataModule, run=False, args=["--config", config])
    assert cli.datamodule.env_id == env_id
    ensemble = cli.model.model
    assert (ensemble.members, ensemble.elites, ensemble.hidden) == (7, 5, (200,) * 4)
    assert cli.trainer.max_epochs == cli.model.max_epochs
    (stopper,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert stopper.patience == cli.model.patience and stopper.monitor == "model/holdout_nll"


def test_a_fitted_model_starts_an_agents_world_model_and_serves_as_pyro_dynamics(fitted):
    from mbvi import ModelBasedValue, TwinQ, VariationalAgent
    from mbvi.pyro import OptimalityModel
    from mbvi.pyro.world import world_model_programs

    _, run = only_run(fitted)
    path = str(fitted / "checkpoints" / "models" / run.info.run_id / "best.ckpt")
    saved = load_dynamics(path, "Pendulum-v1")

    def value(path, hidden=(16, 16)):
        return ModelBasedValue(
            model=DynamicsEnsemble(members=2, elites=1, hidden=hidden), leaf=TwinQ(hidden=(8,)),
            horizon=2, model_checkpoint=path,
        )  # fmt: skip

    agent = VariationalAgent("Pendulum-v1", value=value(path), progress_refresh_s=0)
    for key, tensor in saved.state_dict().items():
        torch.testing.assert_close(agent.value.model.state_dict()[key], tensor)
    with pytest.raises(CheckpointError, match="hidden"):
        VariationalAgent("Pendulum-v1", value=value(path, hidden=(32,)), progress_refresh_s=0)

    dynamics, reward = world_model_programs(saved)
    prior = agent.prior
    model = OptimalityModel(prior, lambda s, a: a.sum(-1), 0.5, horizon=2, n_particles=4,
                            dynamics=dynamics, reward_fn=reward)  # fmt: skip
    states = torch.zeros(3, 3)
    guide = model.guide(policy=agent.engine.infer)
    assert torch.isfinite(model.elbo(guide, states))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_fit_keeps_its_checkpoints_and_ends_killed(tmp_path, sig):
    """Ctrl-C or SIGTERM during a fit: the run ends KILLED (resumable), not FAILED, its
    checkpoints so far are uploaded, and the exit status says it was stopped."""
    np.savez(tmp_path / "pendulum.npz", **random_transitions("Pendulum-v1", 600))
    (tmp_path / "tiny.yaml").write_text(TINY)
    code, out = stop_once_checkpointed(
        ["fit-model", "--config", PENDULUM, "--config", "tiny.yaml",
         "--data.path", "pendulum.npz", "--model.max_epochs", "100000",
         "--model.patience", "100000"],
        tmp_path, "checkpoints/models/*/last.ckpt", sig,
    )  # fmt: skip
    assert code == (1 if sig == signal.SIGINT else 143), out[-2000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED", out[-2000:]
    uploaded = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.ckpt" in uploaded and "checkpoints/best.ckpt" in uploaded
    assert "interrupted in epoch" in out and "checkpoints kept:" in out
