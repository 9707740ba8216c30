"""Evaluation videos: one mean-action episode rendered offscreen and written as an MP4.

``--model.video_every N`` records an episode every N env steps and logs it as the MLflow
artifact ``videos/step_<env step>.mp4``, beside the run's curves; ``mbvi render --ckpt
last.ckpt --out episode.mp4`` records one from a checkpoint.

MuJoCo envs draw through OpenGL.  On a machine without a display mbvi selects EGL
(``MUJOCO_GL=egl``) unless ``MUJOCO_GL`` already names a backend: Mesa's EGL renders
on the CPU (llvmpipe) and a GPU driver's EGL on the GPU, with the same code.  Other envs
render however their ``rgb_array`` mode does (classic control draws with pygame).

A video never stops training: when the renderer cannot start, the run logs a warning
and the MLflow tag ``video_unavailable`` (what to install) and trains on without
videos.  A video request for an env that cannot draw frames at all is a configuration
error, raised before training.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from mbvi.errors import ConfigError, MbviError
from mbvi.training.env import ActionScaler, make_env
from mbvi.training.runner import Policy, check_finite

log = logging.getLogger(__name__)

VIDEO_UNAVAILABLE_TAG = "video_unavailable"
"""MLflow tag set, to the reason and what to install, on a run whose videos could not be
rendered."""
ARTIFACT_DIR = "videos"
TRAINING_SIZE = (320, 240)
"""Width and height of training videos: a quarter of MuJoCo's default 480x480 pixels,
which a CPU renderer draws in about half the time."""

# The system libraries each headless backend loads, and the Debian/Ubuntu packages that
# hold them (Mesa's EGL vendor library and its software rasteriser are separate packages).
_BACKEND_LIBRARY = {"egl": "EGL", "osmesa": "OSMesa"}
_BACKEND_PACKAGES = {
    "egl": "libegl1 libegl-mesa0 libgl1-mesa-dri",
    "osmesa": "libosmesa6",
}


class RendererUnavailable(MbviError, RuntimeError):
    """The env's renderer could not start (no OpenGL backend, say)."""


def select_gl_backend() -> tuple[str | None, str | None]:
    """(the OpenGL backend MuJoCo renders with, what to install when its system library
    is missing, else None).

    The backend is ``MUJOCO_GL`` when set; else ``egl`` on a Linux machine without a
    display (set in ``MUJOCO_GL`` for Gymnasium's renderer to read); else None (Gymnasium
    tries GLFW, EGL and OSMesa in turn).  Call it before MuJoCo is first imported: MuJoCo
    loads the library of the backend ``MUJOCO_GL`` names when imported, and fails to
    import without it, which would stop training for want of a renderer; rendering is
    then turned off (``MUJOCO_GL=disable``) for this process instead.
    """
    backend = os.environ.get("MUJOCO_GL", "").lower().strip() or None
    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    chosen = backend is None and sys.platform.startswith("linux") and headless
    missing = missing_backend("egl" if chosen else backend)
    if missing is not None:
        if backend is not None and "mujoco" not in sys.modules:
            os.environ["MUJOCO_GL"] = "disable"
        return ("egl" if chosen else backend), missing
    if chosen:
        os.environ["MUJOCO_GL"] = backend = "egl"
    return backend, None


def missing_backend(backend: str | None) -> str | None:
    """What to install when ``backend``'s system library cannot be found, else None."""
    library = _BACKEND_LIBRARY.get(backend or "")
    if library is None or ctypes.util.find_library(library) is not None:
        return None
    return (
        f"MUJOCO_GL={backend} needs the lib{library} system library, which is not installed; "
        f"install it (Debian/Ubuntu: apt-get install {_BACKEND_PACKAGES[backend]}) or set "
        f"MUJOCO_GL to another backend ({', '.join(sorted(_BACKEND_PACKAGES))})."
    )


def _is_mujoco(env: gym.Env) -> bool:
    from gymnasium.envs.mujoco import MujocoEnv

    return isinstance(env.unwrapped, MujocoEnv)


def make_render_env(
    env_id: str, size: tuple[int, int] | None = None, instead: str = "drop --model.video_every"
) -> gym.Env:
    """``env_id`` made with ``render_mode="rgb_array"`` (MuJoCo envs at ``size``, width
    by height; others at their own size), reset, with one frame drawn to prove it renders.
    ``instead``: what the caller's user can do without a video, for the error messages.

    Raises:
        ConfigError: the env has no ``rgb_array`` mode, or its renderer needs a package
            that is not installed (pygame for classic control), named in the message.
        RendererUnavailable: a MuJoCo env's OpenGL backend cannot start; the message
            says what to install.
    """
    backend, missing = select_gl_backend()
    env = make_env(env_id)
    modes = env.unwrapped.metadata.get("render_modes") or []
    mujoco = _is_mujoco(env)
    env.close()
    if "rgb_array" not in modes:
        raise ConfigError(
            f"env {env_id!r} cannot draw frames (its render modes are {list(modes)}, without "
            f"'rgb_array'), so it cannot be recorded; {instead}, or use an env "
            "that renders rgb_array frames (every MuJoCo env does)."
        )
    if mujoco and missing is not None:
        raise RendererUnavailable(missing)
    kwargs = {"width": size[0], "height": size[1]} if mujoco and size else {}
    env = gym.make(env_id, render_mode="rgb_array", **kwargs)
    env.reset(seed=0)
    try:
        frame = env.render()
    except gym.error.DependencyNotInstalled as err:
        env.close()
        raise ConfigError(
            f"env {env_id!r} draws its frames with a package that is not installed ({err}); "
            f"install it, or {instead}."
        ) from None
    except Exception as err:  # a GL backend fails in many ways (ImportError, GLError, ...)
        env.close()
        if not mujoco:
            raise
        install = _BACKEND_PACKAGES.get(backend or "egl", _BACKEND_PACKAGES["egl"])
        raise RendererUnavailable(
            f"MuJoCo cannot render with MUJOCO_GL={backend} ({type(err).__name__}: {err}); "
            f"on a machine without a display install EGL (Debian/Ubuntu: apt-get install "
            f"{install}), or OSMesa (libosmesa6) and set MUJOCO_GL=osmesa."
        ) from None
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        env.close()
        raise ConfigError(f"env {env_id!r} rendered {type(frame).__name__}, not an RGB frame")
    return env


def _pyav():
    """The ``av`` module (PyAV), or a ConfigError saying how to install it."""
    try:
        import av
    except ImportError:
        raise ConfigError(
            "writing MP4 videos needs PyAV, which is not installed: pip install av (an mbvi "
            "dependency, so reinstalling mbvi with pip install -e . installs it too)"
        ) from None
    return av


class Mp4Writer:
    """H.264 MP4 frames of one size, written as they come (an episode is never held in
    memory).  Frames are [H, W, 3] uint8; an odd height or width loses its last row or
    column, since H.264's 4:2:0 colour needs even sizes."""

    def __init__(self, path: str | Path, fps: float):
        self._av = _pyav()
        self._container = self._av.open(str(path), mode="w")
        self._stream = None
        self.fps, self.frames = fps, 0

    def write(self, frame: np.ndarray) -> None:
        h, w = (frame.shape[0] // 2) * 2, (frame.shape[1] // 2) * 2
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=round(self.fps))
            self._stream.width, self._stream.height = w, h
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"preset": "veryfast"}  # encode cost well below rendering
        image = np.ascontiguousarray(frame[:h, :w, :3], dtype=np.uint8)
        packets = self._stream.encode(self._av.VideoFrame.from_ndarray(image, format="rgb24"))
        self._container.mux(packets)
        self.frames += 1

    def close(self) -> None:
        if self._stream is not None:
            self._container.mux(self._stream.encode())  # flush the encoder
        self._container.close()


def _draw(env: gym.Env | None, writer: Mp4Writer) -> None:
    """Render ``env``'s frame into ``writer`` (``env`` None: close the writer), any
    failure of either raised as ``RendererUnavailable``: the caller tells it apart from
    the policy's and the env's own errors."""
    try:
        if env is None:
            writer.close()
        else:
            writer.write(env.render())
    except Exception as err:
        raise RendererUnavailable(
            f"rendering or encoding a frame failed ({type(err).__name__}: {err})"
        ) from err


@dataclass
class EpisodeVideo:
    path: Path
    frames: int
    episode_return: float
    seconds: float  # wall-clock of the whole recorded episode: acting, rendering, encoding


def record_episode(
    env: gym.Env,
    policy: Policy,
    path: str | Path,
    seed: int,
    on_reset: Callable[[], None] | None = None,
    label: str = "in a recorded episode",
) -> EpisodeVideo:
    """One full episode of ``policy`` (``obs -> action in [-1, 1]^A``) on ``env`` (made by
    ``make_render_env``) from ``env.reset(seed=seed)``, written to ``path`` as an MP4 of
    every frame, the reset state first.  ``on_reset`` is called as the episode starts (a
    planner's warm start is reset there); ``label`` places a non-finite error."""
    start = time.perf_counter()
    scaler = ActionScaler(env.action_space)
    env_id = env.spec.id if env.spec else type(env.unwrapped).__name__
    fps = env.metadata.get("render_fps") or 30
    obs, _ = env.reset(seed=seed)
    if on_reset is not None:
        on_reset()
    writer = Mp4Writer(path, fps)
    total, done = 0.0, False
    try:
        _draw(env, writer)
        while not done:
            obs, reward, terminated, truncated, _ = env.step(scaler.to_env(policy(obs)))
            check_finite(env_id, obs, float(reward), label)
            total += float(reward)
            done = terminated or truncated
            _draw(env, writer)
    finally:
        _draw(None, writer)
    return EpisodeVideo(Path(path), writer.frames, total, time.perf_counter() - start)


class EvalVideos:
    """The agent's ``video_every`` recorder: built at configuration time (so an env
    that cannot draw frames fails before training), called every ``every`` env steps.

    A renderer that cannot start is logged as a warning now and as the run's
    ``video_unavailable`` tag at the first video due; training goes on without videos.
    So does a renderer or an encoder that fails later, from that video on.
    """

    def __init__(self, env_id: str, every: int, seed: int, folder: str | Path = ARTIFACT_DIR):
        if every < 0:
            raise ConfigError(f"video_every must be >= 0 (0 turns videos off), got {every}")
        _pyav()  # an encoder missing is a setup error, found before training
        self.every, self.seed, self.folder = every, seed, Path(folder)
        self.env: gym.Env | None = None
        self.unavailable: str | None = None
        self._tagged = False
        try:
            self.env = make_render_env(env_id, TRAINING_SIZE)
        except RendererUnavailable as err:
            self.unavailable = str(err)
            log.warning("mbvi: no evaluation videos for this run: %s", err)

    def record(
        self, policy: Policy, env_step: int, logger, on_reset: Callable[[], None] | None = None
    ) -> EpisodeVideo | None:
        """Record a mean-action episode (``policy``) at ``env_step`` to
        ``<folder>/<run id>/step_<env_step>.mp4`` and log it as an MLflow artifact under
        ``videos/`` with the metrics ``video/seconds`` and ``video/frames``; None when
        the renderer is unavailable."""
        run_id = getattr(logger, "run_id", None)
        if self.unavailable is not None:
            if run_id is not None and not self._tagged:
                logger.experiment.set_tag(run_id, VIDEO_UNAVAILABLE_TAG, self.unavailable[:4000])
                self._tagged = True
            return None
        folder = self.folder / (run_id or "offline")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{env_step:08d}.mp4"
        label = f"in the evaluation video at env step {env_step}"
        try:
            video = record_episode(self.env, policy, path, self.seed + env_step, on_reset, label)
        except RendererUnavailable as err:
            self.unavailable = str(err)
            log.warning("mbvi: no more evaluation videos for this run: %s", err)
            return self.record(policy, env_step, logger)  # tags the run
        if run_id is not None:
            logger.experiment.log_artifact(run_id, str(path), ARTIFACT_DIR)
            metrics = {"video/seconds": video.seconds, "video/frames": float(video.frames)}
            logger.log_metrics(metrics, step=env_step)
        return video

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


# ---- mbvi render ---------------------------------------------------------------------------
def agent_from_checkpoint(path: str | Path):
    """The ``VariationalAgent`` an ``mbvi fit`` checkpoint holds (its config and weights),
    loaded without running code (``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: the file is missing, unreadable, refused by weights-only
            loading, or not written by an mbvi agent.
    """
    import inspect

    from mbvi.errors import CheckpointError
    from mbvi.training.agent import VariationalAgent
    from mbvi.training.checkpoints import check_engine_format
    from mbvi.training.safe_load import load_checkpoint, missing_file

    where = f"checkpoint {str(path)!r}"
    if not Path(path).is_file():
        raise CheckpointError(
            f"{where} {missing_file(Path(path))}; pass the .ckpt of an `mbvi fit` run "
            "(checkpoints/<run_id>/last.ckpt, or the run's MLflow artifacts)."
        )
    ckpt = load_checkpoint(path, where)
    if not isinstance(ckpt, dict) or not {"mbvi", "state_dict", "hyper_parameters"} <= set(ckpt):
        raise CheckpointError(f"{where} was not written by an mbvi agent (`mbvi fit`).")
    # The agent's own arguments (the CLI also stores its instantiator), and a render is
    # one episode: no progress bar, no videos of its own.
    accepted = inspect.signature(VariationalAgent.__init__).parameters
    config = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted}
    config.update(progress_refresh_s=0, video_every=0)
    agent = VariationalAgent(**config)
    check_engine_format(ckpt["mbvi"], agent.engine, path)
    agent.load_state_dict(ckpt["state_dict"])
    return agent.eval()


def render_main(argv: list[str]) -> int:
    """``mbvi render --ckpt PATH --out episode.mp4``: one mean-action episode of a
    checkpoint's agent, rendered offscreen, as an MP4."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(
        prog="mbvi render",
        description="Record one mean-action episode of an `mbvi fit` checkpoint as an MP4 "
        "(offscreen rendering; see docs/videos.md).",
    )
    parser.add_argument("--ckpt", required=True, help="agent checkpoint (.ckpt) of `mbvi fit`")
    parser.add_argument("--out", default="episode.mp4", help="the .mp4 to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episode's reset")
    parser.add_argument("--width", type=int, default=480, help="frame width (MuJoCo envs)")
    parser.add_argument("--height", type=int, default=480, help="frame height (MuJoCo envs)")
    args = parser.parse_args(argv)
    if args.width < 2 or args.height < 2:
        raise ConfigError(f"--width and --height must be >= 2, got {args.width}x{args.height}")
    agent = agent_from_checkpoint(args.ckpt)
    env_id = agent.hparams.env_id
    try:
        env = make_render_env(
            env_id, (args.width, args.height), instead="render a checkpoint of another env"
        )
    except RendererUnavailable as err:
        raise RendererUnavailable(f"cannot render env {env_id!r}: {err}") from None
    torch.manual_seed(args.seed)  # engines that sample while inferring
    policy, reset_plan = agent._eval_policy()  # the policy evaluation acts with
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            video = record_episode(env, policy, args.out, args.seed, reset_plan)
    finally:
        env.close()
    print(
        f"wrote {video.path}: {video.frames} frames of {env_id}, "
        f"return {video.episode_return:.1f}, {video.seconds:.1f} s"
    )
    return 0
