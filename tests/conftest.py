import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MBVI = str(Path(sys.executable).with_name("mbvi"))

torch.set_num_threads(1)


@pytest.fixture
def intra_op_threads():
    """``torch.set_num_threads`` for one test, the suite's count restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


_ACCELERATOR = ["cpu"]


def pytest_addoption(parser):
    parser.addoption(
        "--accelerator",
        default="cpu",
        help="Lightning accelerator of the tests that train through a Trainer (cpu, cuda): "
        "`pytest --accelerator cuda` runs them on a GPU.  The CLI tests use the CLI's "
        "own default, auto.",
    )


def pytest_configure(config):
    _ACCELERATOR[0] = config.getoption("--accelerator")


def accelerator() -> str:
    """The ``--accelerator`` the suite runs with (default ``cpu``)."""
    return _ACCELERATOR[0]


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


def pytest_collection_modifyitems(config, items):
    """Learning tests (minutes each) first, so that under ``-n 2`` (``--dist loadfile``:
    one file per worker at a time) the two files holding them start at once on separate
    workers instead of ending the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
    """Train ``agent`` with a plain Trainer as the CLI configures it (no Lightning
    checkpointing or bars: the agent checkpoints and reports by env steps), on the
    suite's ``--accelerator``."""
    trainer = L.Trainer(
        logger=logger,
        max_epochs=-1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        accelerator=accelerator(),
    )
    trainer.fit(agent)
    return trainer


# Random and broken Pendulum policies score about −1200 to −1500.
PENDULUM_THRESHOLD = -400.0


def pendulum_eval_return(workdir, config: str, env_steps: int = 5000) -> float:
    """Train ``configs/pendulum/<config>`` for ``env_steps`` through the real CLI and
    return its final ``eval/return`` read back from the run's MLflow store."""
    proc = subprocess.run(
        [MBVI, "fit", "--config", str(CONFIGS / "pendulum" / config),
         "--model.total_env_steps", str(env_steps), "--model.eval_every", str(env_steps),
         "--model.progress_refresh_s", "0"],
        cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pendulum").experiment_id])
    (final,) = client.get_metric_history(run.info.run_id, "eval/return")
    assert final.step == env_steps
    return final.value


def run_cli_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """``mbvi *argv`` through ``mbvi.cli.main`` in this process (cwd as set by the
    caller) -> (exit status, stdout, stderr).  Environment variables, sys.path and
    sys.argv are restored afterwards."""
    from mbvi.cli import main as cli_main

    environ, path, argv_before = dict(os.environ), list(sys.path), sys.argv
    sys.argv = ["mbvi"]  # not pytest's options: LightningCLI warns when both are given
    try:
        cli_main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        sys.argv = argv_before
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stop_once_checkpointed(argv, cwd: Path, checkpoints: str, sig, wait_s: float = 120):
    """``mbvi *argv`` in ``cwd``, sent ``sig`` once a file matching ``checkpoints`` (a
    glob under ``cwd``) exists -> (exit status, its output).  The file system is
    watched, not the store: opening the store while the run creates its tables races
    the run's own migration and can leave the store locked."""
    proc = subprocess.Popen([MBVI, *argv], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + wait_s
    try:
        while time.time() < deadline and not list(cwd.glob(checkpoints)):
            time.sleep(0.5)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out
