"""The paper's Fig. 2 on a trained agent: inference improvement per iteration over
evaluation episodes.

Loads a checkpoint of an agent trained with an iterative engine (the paper trains its
Fig. 2 agent with K = 10), runs ``--episodes`` mean-action episodes on a fresh env,
and on every state the agent acted on scores each inference iterate λ_0 … λ_K by J̃
(Eq. 16, the agent's own value, prior and α) on common random numbers.  Per episode:
the absolute improvement mean J̃_k − mean J̃_0 and the relative one, divided by
|mean J̃_0|; then mean ± std over episodes, as the paper's "average over 5 episodes".
``mbvi compare`` plots the same quantity from training logs (averaged over training);
this script measures it on the trained agent's own trajectories.

    python benchmarks/inference_improvement.py --ckpt ITERATIVE.ckpt [--episodes 5]
        [--samples 64] [--seed 0] [--out inference_improvement.png]

Prints a table (k, absolute and relative improvement, mean ± std over episodes) and,
last:

    inference_improvement K=<K> episodes=<E> abs_1=<> abs_K=<> rel_1=<> rel_K=<> rising=<r>/<K>

``rising``: how many of the K iterations raised the mean J̃ over episodes.
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mbvi.tracking.figures import plot_iteration_bands
from mbvi.training.checkpoints import load_agent
from mbvi.training.runner import EnvRunner, record_episodes
from mbvi.variational.diagnostics import check_iterative, iteration_improvement, iteration_values
from mbvi.variational.objectives import TrajectoryObjective


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of an iterative agent")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes")
    parser.add_argument("--samples", type=int, default=64, help="actions per state scoring J̃")
    parser.add_argument("--seed", type=int, default=0, help="env and sampling seed")
    parser.add_argument("--out", type=Path, default=Path("inference_improvement.png"))
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.samples < 1:
        parser.error("--episodes and --samples must be at least 1")
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    agent = load_agent(args.ckpt)
    agent.eval()
    try:
        check_iterative(agent.engine)
    except ValueError as e:
        parser.error(f"{args.ckpt}: {e}")
    runner = EnvRunner(agent.hparams.env_id, args.seed)
    episodes = record_episodes(runner, partial(agent._policy, deterministic=True), args.episodes)
    absolute, relative = [], []
    for i, (obs, ret) in enumerate(episodes):
        s = torch.as_tensor(obs, dtype=torch.float32)
        objective = TrajectoryObjective(
            s, partial(agent.value, frozen=True), agent.prior, agent.alpha
        )
        values = iteration_values(agent.engine, s, objective, args.samples, args.seed)
        a, r = iteration_improvement(values)
        absolute.append(a.numpy())
        relative.append(r.numpy())
        print(
            f"episode {i}: return {ret:.1f}, {len(obs)} states, J̃_0 = {values[0].mean():.3f}, "
            f"J̃_K − J̃_0 = {a[-1]:.4f} ({r[-1]:+.2%})",
            flush=True,
        )
    absolute, relative = np.stack(absolute), np.stack(relative)
    k = absolute.shape[1] - 1
    name = f"{type(agent.engine).__name__}@{agent.env_steps} ({agent.hparams.env_id})"
    plot_iteration_bands({f"{name}, K={k}": (absolute, relative)}, name, args.out)
    print(f"{'k':>3} {'J̃_k − J̃_0':>20} {'relative':>20}")
    for it in range(k + 1):
        a, r = absolute[:, it], relative[:, it]
        print(f"{it:>3} {a.mean():>11.4f} ± {a.std():<6.4f} {r.mean():>+11.3%} ± {r.std():<6.3%}")
    print(f"figure: {args.out}")
    mean, rel = absolute.mean(0), relative.mean(0)
    rising = int((np.diff(mean) > 0).sum())
    print(
        f"inference_improvement K={k} episodes={len(episodes)} abs_1={mean[1]:.4f} "
        f"abs_K={mean[-1]:.4f} rel_1={rel[1]:.4f} rel_K={rel[-1]:.4f} rising={rising}/{k}"
    )


if __name__ == "__main__":
    main()
