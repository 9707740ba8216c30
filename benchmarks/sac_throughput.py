"""Training throughput of mbvi SAC against stable-baselines3 SAC on HalfCheetah-v5.

Same settings for both: batch 256, 2x256 ReLU networks, one update per env step after
``--warmup`` random steps; mbvi runs through its Lightning Trainer with MLflow tracking
(an SQLite store in a temporary folder), as a user's run does, and with ``compile=True``
as ``configs/halfcheetah/sac.yaml`` sets it (``--no-compile``: the eager update).  Its
one-off compile falls in the first batch of updates, before the timed steps; the
median length of that batch is printed.  The two alternate for
``--rounds`` rounds; each round times ``--steps`` env steps after warm-up, and the
medians are compared.  Each round also runs mbvi without a logger, which gives the
cost of tracking (asynchronous MLflow logging included) as ``tracking_overhead`` =
1 − tracked/untracked median rate, on the line before the last.  Last line:

    sac_throughput mbvi_steps_per_s=<x> sb3_steps_per_s=<y> ratio=<x/y>

Needs ``pip install -e ".[bench]"`` (stable-baselines3).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings

import gymnasium as gym
import lightning as L
import torch

from mbvi import MLflowTracker, TwinQ, UniformPrior, VariationalAgent
from mbvi.planners import Direct

ENV_ID = "HalfCheetah-v5"


class _Timer(L.Callback):
    """Env steps per second between the first batch ending at or after ``start`` and
    the one ending at or after ``stop`` (a batch holds several env steps), and the
    seconds of that first batch (``first_batch_s``: with ``compile=True``, the compile)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.t0, self.s0, self.rate = None, 0, float("nan")
        self.last_end, self.first_batch_s = time.perf_counter(), float("nan")

    def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
        if self.t0 is None:
            now = time.perf_counter()
            if agent.env_steps >= self.start:
                self.t0, self.s0 = now, agent.env_steps
                self.first_batch_s = now - self.last_end
            self.last_end = now
        elif agent.env_steps >= self.stop and math.isnan(self.rate):
            self.rate = (agent.env_steps - self.s0) / (time.perf_counter() - self.t0)


def mbvi_rate(
    warmup: int, steps: int, seed: int, compile: bool, tracked: bool = True
) -> tuple[float, float]:
    """(env steps per second, seconds of the first batch with updates)."""
    # Each run compiles afresh, as a new `mbvi fit` process does (dynamo would otherwise
    # stop recompiling for new agents after its cache limit and run them eagerly).
    torch.compiler.reset()
    agent = VariationalAgent(
        ENV_ID,
        prior=UniformPrior(),
        engine=Direct(hidden=(256, 256)),
        value=TwinQ(hidden=(256, 256)),
        seed=seed,
        total_env_steps=warmup + steps,
        warmup_steps=warmup,
        batch_size=256,
        updates_per_step=1,
        eval_every=10**9,
        log_every=500,
        checkpoint_every=10**9,
        progress_refresh_s=0,
        eval_episodes=1,
        compile=compile,
    )
    agent.run_evaluation = lambda: float("nan")  # time training only, as for SB3
    timer = _Timer(warmup + 1, warmup + steps)
    with tempfile.TemporaryDirectory() as tmp:
        logger = (
            MLflowTracker(experiment_name="throughput", tracking_uri=f"sqlite:///{tmp}/m.db")
            if tracked
            else False
        )
        trainer = L.Trainer(
            logger=logger,
            callbacks=[timer],
            max_epochs=-1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
            accelerator="cpu",
            num_sanity_val_steps=0,
        )
        trainer.fit(agent)
    return timer.rate, timer.first_batch_s


def sb3_rate(warmup: int, steps: int, seed: int) -> float:
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    class Timer(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == warmup + 1:
                self.t0 = time.perf_counter()
            elif self.num_timesteps == warmup + steps:
                self.rate = (steps - 1) / (time.perf_counter() - self.t0)
            return True

    timer = Timer()
    model = SAC(
        "MlpPolicy",
        gym.make(ENV_ID),
        batch_size=256,
        learning_starts=warmup,
        train_freq=1,
        gradient_steps=1,
        policy_kwargs={"net_arch": [256, 256]},
        device="cpu",
        seed=seed,
        verbose=0,
    )
    model.learn(warmup + steps, callback=timer)
    return timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train mbvi with compile=True (its first update compiles, before the timing)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compile={args.compile}")
    ours, untracked, theirs, first = [], [], [], []
    for r in range(args.rounds):
        rate, first_batch_s = mbvi_rate(args.warmup, args.steps, r, args.compile)
        ours.append(rate)
        first.append(first_batch_s)
        untracked.append(mbvi_rate(args.warmup, args.steps, r, args.compile, tracked=False)[0])
        theirs.append(sb3_rate(args.warmup, args.steps, seed=r))
        print(
            f"round {r}: mbvi {ours[-1]:.1f} steps/s (untracked {untracked[-1]:.1f}; first "
            f"batch of updates {first_batch_s:.1f} s), sb3 {theirs[-1]:.1f} steps/s",
            flush=True,
        )
    x, y = statistics.median(ours), statistics.median(theirs)
    print(f"mbvi_first_update_batch_s={statistics.median(first):.1f} (the compile, if any)")
    print(f"tracking_overhead={1 - x / statistics.median(untracked):.3f}")
    print(f"sac_throughput mbvi_steps_per_s={x:.1f} sb3_steps_per_s={y:.1f} ratio={x / y:.2f}")


if __name__ == "__main__":
    main()
