"""What evaluation videos (``--model.video_every``) cost a training run on this machine.

1. **Per recorded episode**: one full episode of ``--env`` (HalfCheetah-v5: 1,000 steps)
   under a fixed policy, recorded as training records it (``TRAINING_SIZE``, H.264),
   minus the same episode stepped without rendering: the renderer's and the encoder's
   cost, ``per_episode_s``.
2. **Videos off**: a run with ``video_every=0`` executes one extra test per env step.
   That test is timed directly and set against the env-step time of a small SAC run:
   ``throughput_ratio_off`` = step time / (step time + test time).  Two identical
   off-runs give the run-to-run noise (``off_noise``, their relative difference in env
   steps/s), which an A/B of the test alone could never see through.
3. **Videos on**: the same run with ``video_every=--video_every``:
   ``throughput_ratio_on`` = its env steps/s over the off-runs' mean.

Last line::

    video_cost per_episode_s=<s> per_frame_ms=<ms> frames=<n> throughput_ratio_off=<r>
        off_noise=<x> throughput_ratio_on=<r> env=<id>

Needs a working headless renderer (docs/videos.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import timeit

import lightning as L
import numpy as np

from mbvi import TwinQ, UniformPrior, VariationalAgent
from mbvi.planners import Direct
from mbvi.training.env import ActionScaler
from mbvi.training.video import TRAINING_SIZE, make_render_env, record_episode


def _policy(act_dim: int):
    """A fixed, seeded policy: the same actions whether or not frames are drawn."""
    rng = np.random.default_rng(0)
    return lambda obs: rng.uniform(-1.0, 1.0, act_dim)


def episode_cost(env_id: str, folder: str) -> tuple[float, int]:
    """(seconds the renderer and encoder add to one full episode, its frames)."""
    env = make_render_env(env_id, TRAINING_SIZE)
    act_dim = env.action_space.shape[0]
    scaler = ActionScaler(env.action_space)
    policy = _policy(act_dim)
    start, (obs, _), done = time.perf_counter(), env.reset(seed=1), False
    while not done:
        obs, _, terminated, truncated, _ = env.step(scaler.to_env(policy(obs)))
        done = terminated or truncated
    plain = time.perf_counter() - start
    video = record_episode(env, _policy(act_dim), os.path.join(folder, "episode.mp4"), seed=1)
    env.close()
    return video.seconds - plain, video.frames


def train_rate(env_id: str, steps: int, warmup: int, video_every: int) -> tuple[float, object]:
    """(env steps per second of a small SAC run of ``steps`` env steps, the agent)."""
    agent = VariationalAgent(
        env_id,
        prior=UniformPrior(),
        engine=Direct(hidden=(64, 64)),
        value=TwinQ(hidden=(64, 64)),
        total_env_steps=steps,
        warmup_steps=warmup,
        batch_size=64,
        eval_every=10**9,
        checkpoint_every=10**9,
        log_every=500,
        progress_refresh_s=0,
        video_every=video_every,
    )
    agent.run_evaluation = lambda: float("nan")  # time training (and videos) only
    trainer = L.Trainer(
        logger=False,
        max_epochs=-1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.getcwd(),
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(agent)
    return steps / (time.perf_counter() - start), agent


def off_test_seconds(agent) -> float:
    """Seconds per env step of the test a ``video_every=0`` run adds (agent._env_step)."""
    hp, n = agent.hparams, 200_000
    test = lambda: agent._video is not None and agent.env_steps % hp.video_every == 0  # noqa: E731
    return min(timeit.repeat(test, number=n, repeat=5)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=1500, help="env steps per training run")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--video_every", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # a run without a logger keeps its videos under ./videos
        per_episode_s, frames = episode_cost(args.env, tmp)
        off = [train_rate(args.env, args.steps, args.warmup, 0) for _ in range(2)]
        on_rate, _ = train_rate(args.env, args.steps, args.warmup, args.video_every)
        test_s = off_test_seconds(off[0][1])
    rates = [rate for rate, _ in off]
    off_rate = float(np.mean(rates))
    step_s, per_frame_ms = 1.0 / off_rate, 1e3 * per_episode_s / frames
    print(
        f"off runs {rates[0]:.1f} and {rates[1]:.1f} env steps/s; on run {on_rate:.1f} "
        f"({args.steps // args.video_every} videos); off test {test_s * 1e9:.0f} ns per env step"
    )
    print(
        f"video_cost per_episode_s={per_episode_s:.2f} per_frame_ms={per_frame_ms:.1f}"
        f" frames={frames} throughput_ratio_off={step_s / (step_s + test_s):.6f}"
        f" off_noise={abs(rates[0] - rates[1]) / off_rate:.3f}"
        f" throughput_ratio_on={on_rate / off_rate:.3f} env={args.env}"
    )


if __name__ == "__main__":
    main()
