"""SMC planning with a trained agent's policy as the proposal, against the policy alone
(SMCP's claim), at equal env steps: one checkpoint, evaluated both ways.

    python benchmarks/smc_proposal.py --ckpt checkpoints/<run id>/last.ckpt --episodes 2 \
        [--model <fit-model checkpoint>]

The planner rolls the true simulator (``MujocoOracle``, the upper bound; MuJoCo envs it
supports) with the agent's critic at the leaf and the agent's posterior as proposal.
With ``--model`` (a dynamics ensemble saved by ``mbvi fit-model``, e.g. fitted to the
same checkpoint's replay buffer, so that no env step is added) a third arm plans through
that learned model instead.  Every arm acts with mean actions (a planner: its particles'
weighted mean, or the heaviest with ``--mode best``), on the same evaluation seeds.
The last line:

    smc_proposal env=<id> policy=<mean return> smc_oracle=<mean return>
        ratio=<oracle/policy> [smc_model=<mean return> model_ratio=<model/policy>]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from mbvi.models.oracle import MujocoOracle
from mbvi.planners import SMC
from mbvi.training.checkpoints import load_agent
from mbvi.training.model_cli import load_dynamics
from mbvi.training.runner import EnvRunner, evaluate
from mbvi.variational.objectives import TrajectoryObjective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--particles", type=int, default=128)
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--model", help="a dynamics ensemble saved by mbvi fit-model")
    parser.add_argument("--mode", choices=("mean", "best"), default="mean")
    parser.add_argument("--ess_threshold", type=float, default=1.0)
    args = parser.parse_args()

    agent = load_agent(args.ckpt)
    agent.eval()
    env_id = agent.hparams.env_id
    oracle = MujocoOracle(env_id)
    planners = {"smc_oracle": oracle}
    if args.model:
        planners["smc_model"] = load_dynamics(args.model, env_id)
    engines = {"policy": agent.engine}
    for name, model in planners.items():
        fitted = name == "smc_model"  # built already: SMC's build would reinitialise it
        smc = SMC(n_particles=args.particles, horizon=args.horizon,
                  model=None if fitted else model, gamma=agent.hparams.gamma,
                  mode=args.mode, ess_threshold=args.ess_threshold, compile=fitted)  # fmt: skip
        smc.build(agent.runner.obs_dim, agent.runner.act_dim)
        smc.model = model
        smc.proposal = agent.engine  # the trained policy, not a fresh network
        engines[name] = smc

    def act(engine, obs):
        s = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        with torch.no_grad():
            objective = TrajectoryObjective(
                s, partial(agent.value, frozen=True), agent.prior, agent.alpha
            )
            return engine.infer(s, objective).mean_action()[0].numpy()

    out = {}
    for name, engine in engines.items():
        runner = EnvRunner(env_id, args.seed)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        returns = evaluate(runner, partial(act, engine), args.episodes)
        seconds = time.perf_counter() - start
        out[name] = float(np.mean(returns))
        print(f"{name}: returns {[round(r, 1) for r in returns]} ({seconds:.0f} s)")
    line = (
        f"smc_proposal env={env_id} policy={out['policy']:.1f} "
        f"smc_oracle={out['smc_oracle']:.1f} ratio={out['smc_oracle'] / out['policy']:.3f}"
    )
    if "smc_model" in out:
        line += (
            f" smc_model={out['smc_model']:.1f} model_ratio={out['smc_model'] / out['policy']:.3f}"
        )
    print(line)


if __name__ == "__main__":
    main()
