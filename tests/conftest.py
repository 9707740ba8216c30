import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MBVI = str(Path(sys.executable).with_name("mbvi"))

torch.set_num_threads(1)

# Agent arguments of a run of a few hundred env steps (the Python-API twin of
# configs/pendulum/tiny.yaml).
TINY_AGENT = dict(
    total_env_steps=300,
    warmup_steps=100,
    batch_size=32,
    buffer_size=1000,
    eval_every=10_000,
    eval_episodes=1,
    log_every=50,
    checkpoint_every=100,
    progress_refresh_s=0,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (mlflow.db and checkpoints land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def fit_agent(agent, workdir, logger) -> L.Trainer:
    """Train ``agent`` with a plain Trainer as the CLI configures it (CPU, no
    Lightning checkpointing or bars: the agent checkpoints and reports by env steps)."""
    trainer = L.Trainer(
        logger=logger,
        max_epochs=-1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        accelerator="cpu",
    )
    trainer.fit(agent)
    return trainer
