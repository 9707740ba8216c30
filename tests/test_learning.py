"""Agents learn Pendulum-v1 through the real CLI and config files (a broken agent stays
near −1200): SAC, and the "learned prior, parametric posterior" cell of Table 1."""

import subprocess

import pytest
from mlflow import MlflowClient

from tests.conftest import CONFIGS, MBVI, cli_env

THRESHOLD = -400.0  # random and broken policies score about −1200 to −1500


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sac.yaml", "learned_prior.yaml"])
def test_learns_pendulum(workdir, config):
    proc = subprocess.run(
        [MBVI, "fit", "--config", str(CONFIGS / "pendulum" / config),
         "--model.total_env_steps", "5000", "--model.eval_every", "5000",
         "--model.progress_refresh_s", "0"],
        cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pendulum").experiment_id])
    (final,) = client.get_metric_history(run.info.run_id, "eval/return")
    assert final.step == 5000
    assert final.value >= THRESHOLD, f"eval/return {final.value:.1f} after 5000 env steps"
