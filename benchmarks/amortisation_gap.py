"""The amortisation gap of trained agents, from their checkpoints, on the same states.

For each checkpoint: J̃ (Eq. 16, the agent's own value, prior and α) of the engine's
posterior, and J̃ after ``--steps`` steps of per-state Adam refinement starting from it
(``GradientRefinement``, the non-amortised reference); the gap is their difference
(Cremer et al.; paper §4: iterative amortisation should leave a smaller gap than
direct).  All agents are evaluated on the same replay states, drawn from the first
checkpoint's buffer, with common random numbers.  J̃ scales with each agent's Q̂, so
the gap is also given relative to |J̃| of the refined posterior.

    python benchmarks/amortisation_gap.py --ckpt DIRECT.ckpt ITERATIVE.ckpt [--states 256]

Last line:

    amortisation_gap <engine>@<env steps>=<gap> (<relative>) ...
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial

import torch

from mbvi.planners import GradientRefinement
from mbvi.training.checkpoints import load_agent
from mbvi.variational.diagnostics import amortisation_gap
from mbvi.variational.objectives import TrajectoryObjective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="agent checkpoints")
    parser.add_argument("--states", type=int, default=256, help="replay states")
    parser.add_argument("--steps", type=int, default=200, help="refinement Adam steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    states, parts = None, []
    for path in args.ckpt:
        agent = load_agent(path)
        if states is None:
            states = agent.buffer.sample(args.states)[0]
        refiner = GradientRefinement(steps=args.steps, init_loc=0.0, init_log_scale=0.0)
        refiner.build(agent.runner.obs_dim, agent.runner.act_dim)
        objective = TrajectoryObjective(
            states, partial(agent.value, frozen=True), agent.prior, agent.alpha
        )
        torch.manual_seed(args.seed)
        m = amortisation_gap(agent.engine, refiner, states, objective)
        gap, refined = m["inference/amortisation_gap"], m["inference/j_refined"]
        relative = gap / abs(refined)
        name = f"{type(agent.engine).__name__}@{agent.env_steps}"
        print(
            f"{path}: {name} J_engine={m['inference/j_engine']:.2f} J_refined={refined:.2f} "
            f"gap={gap:.3f} relative={relative:.2%}",
            flush=True,
        )
        parts.append(f"{name}={gap:.3f} ({relative:.2%})")
    print("amortisation_gap " + " ".join(parts))


if __name__ == "__main__":
    main()
