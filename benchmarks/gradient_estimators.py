"""Cheaper estimators of ∇λJ̃ (Eq. 16) against the paper's 200-sample estimate.

Iterative inference (Eq. 15) feeds the network ∇λJ̃ at every iteration; the paper
estimates it from N = 200 reparameterised actions per state, which costs ≈0.9 s per
update at batch 128 on 2 CPU cores.  This script measures, on a *trained* critic,
how far cheaper estimators land from the exact gradient:

* ``mcN``: N independent reparameterised samples (the paper's estimator, N = 200);
* ``antiN``: N/2 antithetic pairs (ε, −ε), ``Iterative(antithetic=True)``;
* ``sigma``: the 2·A sigma points loc ± σ·√A·e_i (deterministic, unscented transform).

The reference ("exact") gradient is the mean of ``--ref-repeats`` 200-sample estimates.
The objective is the iterative configs' one: the agent's frozen twin Q (min), the
constant tanh-Gaussian prior N(0, I) with analytic KL, the agent's α.  λ is taken at
two places: the prior (where Eq. 15 starts, λ_0) and the trained agent's posterior.
Error is ‖g − g_exact‖ / ‖g_exact‖ per state (over the 2·A gradient entries), median
over states and repeats.

    python benchmarks/gradient_estimators.py --ckpt checkpoints/<run_id>/last.ckpt

Last line (relative errors at λ_0, then at the trained posterior):

    gradient_estimators at=prior mc200=<e> mc16=<e> ... at=posterior mc200=<e> ...
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from functools import partial

import torch

from mbvi import ConstantTanhGaussianPrior
from mbvi.training.checkpoints import load_agent
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective


def sigma_points(loc: torch.Tensor) -> torch.Tensor:
    """ε of the 2·A sigma points ±√A e_i, ``[B, 2A, A]``."""
    b, a = loc.shape
    eye = math.sqrt(a) * torch.eye(a, dtype=loc.dtype)
    return torch.cat([eye, -eye]).expand(b, 2 * a, a)


def gradient(objective: TrajectoryObjective, loc, log_scale, eps) -> torch.Tensor:
    """∇(loc, log_scale) J̃ for the given standard-normal draws, ``[B, 2A]``."""
    loc = loc.detach().requires_grad_(True)
    log_scale = log_scale.detach().requires_grad_(True)
    posterior = TanhGaussian(loc, log_scale)
    a, _ = posterior.transform(eps)
    j = objective.value(objective.states, a).mean(-1) - objective.alpha * posterior.kl(
        objective.prior_dist
    )
    return torch.cat(torch.autograd.grad(j.sum(), [loc, log_scale]), -1)


def estimators(act_dim: int) -> dict[str, callable]:
    def mc(n, antithetic=False):
        return lambda p: p.standard_normal(n, antithetic)

    return {
        "mc200": mc(200),
        "mc16": mc(16),
        "mc4": mc(4),
        "anti16": mc(16, True),
        "anti4": mc(4, True),
        "sigma": lambda p: sigma_points(p.loc),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of a trained agent")
    parser.add_argument("--states", type=int, default=128, help="replay states")
    parser.add_argument("--repeats", type=int, default=10, help="draws per estimator")
    parser.add_argument(
        "--ref-repeats", type=int, default=25, help="200-sample estimates in the reference"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    agent = load_agent(args.ckpt)
    s = agent.buffer.sample(args.states)[0]
    prior = ConstantTanhGaussianPrior()
    prior.build(s.shape[-1], agent.runner.act_dim)
    objective = TrajectoryObjective(s, partial(agent.value, frozen=True), prior, agent.alpha)
    with torch.no_grad():
        trained = agent.engine.infer(
            s, TrajectoryObjective(s, partial(agent.value, frozen=True), agent.prior, agent.alpha)
        )
    places = {"prior": objective.prior_dist, "posterior": trained}
    print(
        f"checkpoint {args.ckpt}: {type(agent.engine).__name__} at {agent.env_steps} env steps, "
        f"alpha={agent.alpha.item():.3g}",
        flush=True,
    )
    parts = []
    for place, lam in places.items():
        ref = torch.stack(
            [
                gradient(objective, lam.loc, lam.log_scale, lam.standard_normal(200))
                for _ in range(args.ref_repeats)
            ]
        ).mean(0)
        parts.append(f"at={place}")
        for name, draw in estimators(lam.loc.shape[-1]).items():
            errors = []
            for _ in range(args.repeats if name != "sigma" else 1):
                g = gradient(objective, lam.loc, lam.log_scale, draw(lam))
                errors += ((g - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
            err = statistics.median(errors)
            print(f"{place:9s} {name:7s} rel_error={err:.3f}", flush=True)
            parts.append(f"{name}={err:.3f}")
    print("gradient_estimators " + " ".join(parts))


if __name__ == "__main__":
    main()
