"""mbvi on a GPU: every shipped config trains through the CLI on CUDA, checkpoints move
between CPU and GPU, and a seed draws the same replay batches on both.

Skipped where torch sees no CUDA device.  On a GPU machine, `pytest tests/test_cuda.py`
runs these; `pytest --accelerator cuda` also moves the suite's Trainer-based tests there
(the CLI tests already train on the GPU: the CLI's accelerator is `auto`).
"""

import sys

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from mbvi import MLflowTracker, TwinQ, VariationalAgent
from mbvi.cli import main
from mbvi.planners import Direct
from mbvi.training.checkpoints import validate_checkpoint
from mbvi.training.replay import ReplayBuffer
from tests.conftest import TINY_AGENT
from tests.test_configs import CONFIGS, SHIPPED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_trains_on_cuda(path, workdir, monkeypatch):
    """Each shipped config, cut to 400 env steps (150 of them with updates), with an
    evaluation, a checkpoint and an amortisation-gap measurement, on the GPU."""
    monkeypatch.setattr(sys, "argv", ["mbvi"])  # as if typed at a shell
    uri = f"sqlite:///{workdir}/mlflow.db"  # absolute: MLflow caches a store per URI
    main([
        "fit", "--config", str(path), "--trainer.accelerator", "cuda",
        "--model.total_env_steps", "400", "--model.warmup_steps", "100",
        "--model.batch_size", "64", "--model.eval_every", "400",
        "--model.eval_episodes", "1", "--model.checkpoint_every", "400", "--model.log_every", "100",
        "--model.gap_every", "400", "--model.gap_states", "16",
        "--model.progress_refresh_s", "0", "--trainer.logger.init_args.tracking_uri", uri,
    ])  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    for key in ("eval/return", "inference/amortisation_gap", "loss/value"):
        (last,) = client.get_metric_history(run.info.run_id, key)[-1:]
        assert last.step == 400 and torch.isfinite(torch.tensor(last.value)), key
    ckpt = torch.load(workdir / "checkpoints" / run.info.run_id / "last.ckpt", weights_only=True)
    assert all(v.is_cuda for v in ckpt["state_dict"].values())  # trained on the GPU


def _trainer(accelerator, workdir, logger=False, callbacks=()):
    return L.Trainer(
        logger=logger, max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(workdir), accelerator=accelerator,
        callbacks=list(callbacks),
    )  # fmt: skip


def _agent(total_env_steps):
    return VariationalAgent(
        "Pendulum-v1",
        engine=Direct(hidden=(32, 32)),
        value=TwinQ(hidden=(32, 32)),
        **{**TINY_AGENT, "total_env_steps": total_env_steps},
    )


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(first, then, workdir):
    logger = MLflowTracker(experiment_name="t", tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    _trainer(first, workdir, logger).fit(_agent(200))
    path = workdir / "checkpoints" / logger.run_id / "last.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)

    resumed = _agent(300)
    validate_checkpoint(path, resumed)
    seen = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, agent):
            seen["device"] = agent.device.type
            seen["state"] = {k: v.cpu().clone() for k, v in agent.state_dict().items()}
            seen["replay"] = agent.buffer.generator.get_state()

    _trainer(then, workdir, callbacks=[Snapshot()]).fit(resumed, ckpt_path=path)
    assert seen["device"] == then and resumed.env_steps == 300
    for key, value in saved["state_dict"].items():
        assert torch.equal(seen["state"][key], value), key
    assert torch.equal(seen["replay"], saved["mbvi"]["buffer"]["generator"])


def test_a_seed_draws_the_same_replay_batches_on_cpu_and_cuda():
    buffers = [ReplayBuffer(100, 3, 2, device, seed=7) for device in ("cpu", "cuda")]
    for buf in buffers:
        for i in range(50):
            buf.add([i, -i, 2 * i], [0.5, -0.5], float(i), [i + 1, 0, 0], i % 9 == 0)
    on_cpu, on_cuda = (buf.sample(32) for buf in buffers)
    assert all(t.is_cuda for t in on_cuda)
    for a, b in zip(on_cpu, on_cuda):
        assert torch.equal(a, b.cpu())
