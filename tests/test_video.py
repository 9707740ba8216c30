"""Evaluation videos: MP4s decoded back to frames, ``--model.video_every`` and ``mbvi
render`` through the real CLI, and the errors for envs and machines that cannot render."""

import ctypes.util
import importlib.util
import subprocess

import av
import numpy as np
import pytest
from mlflow import MlflowClient

from mbvi.training.video import (
    VIDEO_UNAVAILABLE_TAG,
    make_render_env,
    record_episode,
)
from tests.conftest import CONFIGS, MBVI, cli_env, run_cli_in_process

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")
# InvertedPendulum's episodes end when the pole falls: a handful of steps for an untrained
# policy, so its videos are short.
MUJOCO_ENV = "InvertedPendulum-v5"


def decode(path) -> tuple[list[np.ndarray], float]:
    """The RGB frames of the MP4 at ``path`` and its frame rate."""
    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], rate


def test_a_recorded_episode_decodes_to_one_frame_per_state(tmp_path):
    env = make_render_env(MUJOCO_ENV, (96, 64))
    steps = []

    def push(obs):  # full force one way: the pole falls within a few dozen steps
        steps.append(obs)
        return np.ones(1)

    video = record_episode(env, push, tmp_path / "episode.mp4", seed=3)
    env.close()
    frames, rate = decode(video.path)
    assert 1 < len(steps) < 1000  # the pole fell: the episode ended by termination
    assert video.frames == len(frames) == len(steps) + 1  # the reset state, then each step
    assert all(f.shape == (64, 96, 3) for f in frames)
    assert rate == env.metadata["render_fps"]
    # the cart moved and the pole fell between the first frame and the last
    assert np.abs(frames[0].astype(float) - frames[-1].astype(float)).mean() > 0.2


def test_odd_frame_sizes_lose_a_row_and_a_column(tmp_path):
    env = make_render_env(MUJOCO_ENV, (97, 65))
    video = record_episode(env, lambda obs: -np.ones(1), tmp_path / "odd.mp4", seed=0)
    env.close()
    frames, _ = decode(video.path)
    assert {f.shape for f in frames} == {(64, 96, 3)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ``mbvi fit`` of a MuJoCo env with ``--model.video_every 100`` through the
    console script, in a fresh working directory: (workdir, MLflow client, run)."""
    workdir = tmp_path_factory.mktemp("videos")
    proc = subprocess.run(
        [MBVI, "fit", "--config", TINY, "--model.env_id", MUJOCO_ENV,
         "--model.total_env_steps", "200", "--model.video_every", "100"],
        cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return workdir, client, run


def test_video_every_logs_mp4_artifacts_beside_the_curves(trained, tmp_path):
    workdir, client, run = trained
    assert run.info.status == "FINISHED"
    assert VIDEO_UNAVAILABLE_TAG not in run.data.tags
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "videos"))
    assert names == ["videos/step_00000100.mp4", "videos/step_00000200.mp4"]
    local = client.download_artifacts(run.info.run_id, names[-1], str(tmp_path))
    frames, _ = decode(local)
    (logged,) = [m for m in client.get_metric_history(run.info.run_id, "video/frames")
                 if m.step == 200]  # fmt: skip
    assert len(frames) == logged.value >= 2
    assert frames[0].shape == (240, 320, 3)  # TRAINING_SIZE, width by height
    seconds = client.get_metric_history(run.info.run_id, "video/seconds")
    assert [m.step for m in seconds] == [100, 200] and all(m.value > 0 for m in seconds)
    assert client.get_metric_history(run.info.run_id, "eval/return")  # the curves, beside


def test_mbvi_render_records_a_checkpoint(trained, workdir, capsys):
    trained_dir, _, run = trained
    ckpt = trained_dir / "checkpoints" / run.info.run_id / "last.ckpt"
    out = workdir / "clips" / "episode.mp4"
    code, stdout, stderr = run_cli_in_process(
        capsys, "render", "--ckpt", str(ckpt), "--out", str(out),
        "--width", "128", "--height", "96", "--seed", "1",
    )  # fmt: skip
    assert code == 0, stderr
    frames, _ = decode(out)
    assert f"wrote {out}: {len(frames)} frames of {MUJOCO_ENV}" in stdout
    assert len(frames) >= 2 and frames[0].shape == (96, 128, 3)


def test_mbvi_render_refuses_a_missing_checkpoint(workdir, capsys):
    code, _, stderr = run_cli_in_process(capsys, "render", "--ckpt", "nope.ckpt")
    assert code == 2
    assert "checkpoint 'nope.ckpt' does not exist; pass the .ckpt of an `mbvi fit` run" in stderr


BLIND_ENV = """
import gymnasium as gym
import numpy as np


class Blind(gym.Env):
    metadata = {"render_modes": []}  # nothing to draw frames with
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}


gym.register("Blind-v0", entry_point=Blind, max_episode_steps=20)
"""


def test_a_video_of_an_env_that_cannot_render_fails_at_configuration(workdir, capsys):
    (workdir / "blind_envs.py").write_text(BLIND_ENV)
    code, _, stderr = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.env_id", "blind_envs:Blind-v0",
        "--model.video_every", "100",
    )  # fmt: skip
    assert code == 2
    assert "env 'blind_envs:Blind-v0' cannot draw frames" in stderr
    assert "drop --model.video_every" in stderr
    assert not (workdir / "checkpoints").exists()  # stopped before training


@pytest.mark.skipif(
    importlib.util.find_spec("pygame") is not None, reason="pygame renders classic control"
)
def test_a_classic_control_video_without_pygame_names_what_to_install(workdir, capsys):
    code, _, stderr = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.video_every", "100"
    )
    assert code == 2
    assert "env 'Pendulum-v1' draws its frames with a package that is not installed" in stderr
    assert "pygame" in stderr and "or drop --model.video_every" in stderr


@pytest.mark.skipif(
    importlib.util.find_spec("pygame") is not None, reason="pygame renders classic control"
)
def test_mbvi_render_of_a_classic_control_checkpoint_without_pygame(workdir, capsys):
    """`mbvi render` has no --model.video_every to drop: its message offers what it can."""
    code, _, stderr = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.total_env_steps", "120"
    )
    assert code == 0, stderr
    (ckpt,) = workdir.glob("checkpoints/*/last.ckpt")
    code, _, stderr = run_cli_in_process(capsys, "render", "--ckpt", str(ckpt))
    assert code == 2
    assert "pygame" in stderr and "or render a checkpoint of another env" in stderr
    assert "video_every" not in stderr


def test_a_negative_video_every_is_refused(workdir, capsys):
    code, _, stderr = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.video_every", "-5"
    )
    assert code == 2
    assert "video_every must be >= 0 (0 turns videos off), got -5" in stderr


OSMESA_MISSING = pytest.mark.skipif(
    ctypes.util.find_library("OSMesa") is not None,
    reason="needs a machine without OSMesa, to select a backend that is really missing",
)


@OSMESA_MISSING
def test_a_missing_gl_backend_never_stops_training(workdir):
    # MUJOCO_GL=osmesa on a machine without libOSMesa: MuJoCo itself fails to import with
    # it, so this runs a fresh process, as a user would.
    env = {**cli_env(), "MUJOCO_GL": "osmesa", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [MBVI, "fit", "--config", TINY, "--model.env_id", MUJOCO_ENV,
         "--model.total_env_steps", "150", "--model.warmup_steps", "50",
         "--model.video_every", "100"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no evaluation videos for this run: MUJOCO_GL=osmesa needs the libOSMesa" in proc.stderr
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert "apt-get install libosmesa6" in run.data.tags[VIDEO_UNAVAILABLE_TAG]
    assert client.list_artifacts(run.info.run_id, "videos") == []
    assert client.get_metric_history(run.info.run_id, "eval/return")  # it trained


@OSMESA_MISSING
def test_mbvi_render_without_a_gl_backend_says_what_to_install(
    trained, workdir, capsys, monkeypatch
):
    trained_dir, _, run = trained
    ckpt = trained_dir / "checkpoints" / run.info.run_id / "last.ckpt"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    code, _, stderr = run_cli_in_process(capsys, "render", "--ckpt", str(ckpt))
    assert code == 2
    assert f"cannot render env '{MUJOCO_ENV}': MUJOCO_GL=osmesa needs the libOSMesa" in stderr
    assert "apt-get install libosmesa6" in stderr
    assert not (workdir / "episode.mp4").exists()
