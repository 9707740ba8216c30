"""Final evaluation returns of one config over several seeds, through the real CLI.

    python benchmarks/returns.py --config configs/pendulum/sac.yaml --seeds 0 1 2
    python benchmarks/returns.py --config configs/halfcheetah/sac.yaml --seeds 0 1 \
        -- --model.total_env_steps 50000
    python benchmarks/returns.py --sb3 --config configs/halfcheetah/sac.yaml --seeds 0 1 \
        -- --model.env_id Walker2d-v5 --model.total_env_steps 50000

Each seed is one ``mbvi fit`` run (extra options after ``--`` are passed on), logged to
the MLflow store of the working directory.  Last line:

    returns config=<path> seeds=<s,...> final_eval_returns=<r,...> mean=<m> min=<m>

``--sb3`` also trains stable-baselines3's SAC (the ``bench`` extra) on each seed, side
by side, from the same config with the ``--model.*`` options after ``--`` applied, and
ends with

    returns config=<path> seeds=<s,...> mbvi=<mean> sb3=<mean> ratio=<mbvi/sb3>

What the sb3 arm takes from the config (``model.*``):

    env_id, seed              the env and ``SAC(seed=...)``
    total_env_steps           ``learn(total_timesteps=...)``: the same env-step budget
    warmup_steps              ``learning_starts`` (uniform random actions before it, as mbvi)
    batch_size, gamma, buffer_size, updates_per_step (``gradient_steps``; ``train_freq`` 1)
    value.init_args.tau       ``tau``
    engine.init_args.hidden   ``policy_kwargs.net_arch.pi``
    value.init_args.hidden    ``policy_kwargs.net_arch.qf``
    engine_lr                 ``learning_rate`` (sb3 has one rate for actor, critics and α)
    init_alpha                ``ent_coef="auto_<init_alpha>"`` (α tuned from that value)
    eval_episodes             deterministic (mean-action) episodes after training, on an
                              env reset with ``seed + 1`` when made, as mbvi's eval runner

Not matched: ``value_lr`` and ``alpha_lr`` where they differ from ``engine_lr`` (sb3's
single rate), the α target (sb3 keeps SAC's entropy target −A), and the prior, engine and
value choices: the sb3 arm is always SAC, the reference a config is compared with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
from mlflow import MlflowClient

from mbvi.tracking.logger import resolve_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--sb3", action="store_true", help="also train stable-baselines3 SAC on each seed"
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="options after -- go to mbvi fit")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    if args.sb3:
        settings = model_settings(args.config, extra)  # a bad config fails before training
    mbvi = str(Path(sys.executable).with_name("mbvi"))
    # Opened after the first run has created the store: mbvi fit builds a new SQLite store
    # under a lock, and two benchmarks started at once in one folder would race here.
    client = None
    finals, sb3_finals = [], []
    for seed in args.seeds:
        tag = f"returns-{os.getpid()}-{seed}"
        cmd = [
            mbvi,
            "fit",
            "--config",
            args.config,
            "--model.seed",
            str(seed),
            "--model.progress_refresh_s",
            "0",
            "--trainer.logger.init_args.run_name",
            tag,
            *extra,
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        client = client or MlflowClient(resolve_tracking_uri())
        (run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"attributes.run_name = '{tag}'",
        )
        history = client.get_metric_history(run.info.run_id, "eval/return")
        final = max(history, key=lambda m: m.step)
        print(f"seed {seed}: eval/return {final.value:.1f} at env step {final.step}", flush=True)
        finals.append(final.value)
        if args.sb3:
            sb3_return = train_sb3(settings, seed)
            print(f"seed {seed}: sb3 SAC eval return {sb3_return:.1f}", flush=True)
            sb3_finals.append(sb3_return)
    mean = sum(finals) / len(finals)
    seeds = ",".join(map(str, args.seeds))
    if not args.sb3:
        print(
            f"returns config={args.config} seeds={seeds} "
            f"final_eval_returns={','.join(f'{r:.1f}' for r in finals)} "
            f"mean={mean:.1f} min={min(finals):.1f}"
        )
        return
    sb3_mean = sum(sb3_finals) / len(sb3_finals)
    print(
        f"mbvi final_eval_returns={','.join(f'{r:.1f}' for r in finals)} "
        f"sb3 final_eval_returns={','.join(f'{r:.1f}' for r in sb3_finals)}"
    )
    # The ratio reads as "fraction of sb3's return" only when both means are positive.
    ratio = f"{mean / sb3_mean:.3f}" if sb3_mean != 0 else "nan"
    print(
        f"returns config={args.config} seeds={seeds} mbvi={mean:.1f} sb3={sb3_mean:.1f} "
        f"ratio={ratio}"
    )


def model_settings(config: str, extra: list[str]):
    """The agent's arguments (``model.*``) as ``mbvi fit`` reads them: the class defaults,
    then ``config``, then the ``--model.*`` options of ``extra`` (others are skipped)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from mbvi.training.agent import VariationalAgent

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(VariationalAgent, "model", fail_untyped=False)
    parser.add_argument("--trainer", type=dict, default={})  # the Trainer's: not used here
    parser.add_argument("--seed_everything", default=None)
    return parser.parse_args(["--config", config, *model_options(extra)]).model


def model_options(extra: list[str]) -> list[str]:
    """The ``--model.*`` options of ``extra``, each with its value."""
    out, keep = [], False
    for token in extra:
        if token.startswith("--"):
            keep = token.startswith("--model.")
        if keep:
            out.append(token)
    return out


def train_sb3(m, seed: int) -> float:
    """stable-baselines3 SAC trained with the settings ``m`` (module docstring) on
    ``seed``; the mean return of ``m.eval_episodes`` deterministic episodes."""
    try:
        from stable_baselines3 import SAC
    except ImportError:
        sys.exit(
            "returns.py: --sb3 needs stable-baselines3: pip install -e '.[bench]' "
            "(or pip install --no-deps stable-baselines3 next to a CPU torch)"
        )
    env_id = m.env_id.partition(":")[2] if ":" in m.env_id else m.env_id
    value_args = getattr(m.value, "init_args", None)
    engine_args = getattr(m.engine, "init_args", None)
    net_arch = {
        "pi": list(getattr(engine_args, "hidden", [256, 256])),
        "qf": list(getattr(value_args, "hidden", [256, 256])),
    }
    model = SAC(
        "MlpPolicy",
        gym.make(env_id),
        learning_rate=m.engine_lr,
        buffer_size=m.buffer_size,
        learning_starts=m.warmup_steps,
        batch_size=m.batch_size,
        tau=getattr(value_args, "tau", 0.005),
        gamma=m.gamma,
        train_freq=1,
        gradient_steps=m.updates_per_step,
        ent_coef=f"auto_{m.init_alpha}",
        policy_kwargs={"net_arch": net_arch},
        seed=seed,
    )
    model.learn(total_timesteps=m.total_env_steps)
    env = gym.make(env_id)
    env.reset(seed=seed + 1)  # as mbvi's eval runner: seeded once, when made
    returns = []
    for _ in range(m.eval_episodes):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return sum(returns) / len(returns)


if __name__ == "__main__":
    main()
