"""SMC planning with a trained agent's policy as the proposal, against the policy alone
(SMCP's claim), at equal env steps: one checkpoint, evaluated both ways.

    python benchmarks/smc_proposal.py --ckpt checkpoints/<run id>/last.ckpt --episodes 2

The planner rolls the true simulator (``MujocoOracle``, the upper bound; MuJoCo envs it
supports) with the agent's critic at the leaf and the agent's posterior as proposal;
both arms act with mean actions (the planner: its particles' weighted mean), on the same
evaluation seeds.  The last line:

    smc_proposal env=<id> policy=<mean return> smc_oracle=<mean return> ratio=<b/a>
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from mbvi.models.oracle import MujocoOracle
from mbvi.planners import SMC
from mbvi.training.agent import VariationalAgent
from mbvi.training.runner import EnvRunner, evaluate
from mbvi.variational.objectives import TrajectoryObjective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--particles", type=int, default=128)
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()

    agent = VariationalAgent.load_from_checkpoint(args.ckpt, map_location="cpu")
    agent.eval()
    env_id = agent.hparams.env_id
    oracle = MujocoOracle(env_id)
    smc = SMC(n_particles=args.particles, horizon=args.horizon, model=oracle,
              gamma=agent.hparams.gamma)  # fmt: skip
    smc.build(agent.runner.obs_dim, agent.runner.act_dim)
    smc.proposal = agent.engine  # the trained policy, not a fresh network

    def act(engine, obs):
        s = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        with torch.no_grad():
            objective = TrajectoryObjective(
                s, partial(agent.value, frozen=True), agent.prior, agent.alpha
            )
            return engine.infer(s, objective).mean_action()[0].numpy()

    out = {}
    for name, engine in (("policy", agent.engine), ("smc_oracle", smc)):
        runner = EnvRunner(env_id, args.seed)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        returns = evaluate(runner, partial(act, engine), args.episodes)
        seconds = time.perf_counter() - start
        out[name] = float(np.mean(returns))
        print(f"{name}: returns {[round(r, 1) for r in returns]} ({seconds:.0f} s)")
    print(
        f"smc_proposal env={env_id} policy={out['policy']:.1f} "
        f"smc_oracle={out['smc_oracle']:.1f} ratio={out['smc_oracle'] / out['policy']:.3f}"
    )


if __name__ == "__main__":
    main()
