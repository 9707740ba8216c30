"""Plans per second of the sampling planners when acting, and mbvi's SMC against Pyro's
``SMCFilter`` running the same planner.

Part 1: ``SMC``, ``MPPI`` and ``CEM`` at K = 256 particles and H = 10 through a
``DynamicsEnsemble`` at HalfCheetah-v5 sizes (obs 17, act 6; 7 members, 5 elites,
4×200, random weights, ``ts1`` propagation) with a ``ModelBasedValue`` whose leaf is a
``TwinQ`` (256, 256), the paper's constant tanh-Gaussian prior, one state per plan
(as when acting).  SMC runs compiled (``compile=True``; the eager one is printed
beside it); it resamples (systematic) at every step; MPPI and CEM run their
default 5 iterations (CEM with its default 32 elites) and keep their warm start
between plans, as when acting.  A plan is one ``engine.infer`` plus drawing the action.

Part 2: one plan of SMC (256 particles, H = 20, resampling every step) for one state of
a small 2-D linear-quadratic world, by ``mbvi.planners.SMC`` (compiled, and eager) and by
``mbvi.pyro.smc_reference.SMCReference`` (Pyro's ``SMCFilter``), in ms per plan.

The arms alternate within every repeat, so that each sees the same load on a shared
machine; medians over repeats, torch's default thread count for part 1 and one
thread for part 2 (both arms).  The last line:

    planning_rate smc_plans_per_s=… mppi_plans_per_s=… cem_plans_per_s=…
        realtime_factor=… vs_pyro_speedup=…

realtime_factor = SMC plans/s × 0.05 s (HalfCheetah's control step: plans per
simulated second of control), vs_pyro_speedup = Pyro ms / mbvi ms per plan.

    python benchmarks/planning_rate.py [--repeats 30] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.planners import CEM, MPPI, SMC
from mbvi.pyro.smc_reference import SMCReference
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior
from mbvi.variational.values import TwinQ, ValueEstimate
from mbvi.variational.world_model import Step, WorldModel

OBS, ACT, K, H, ALPHA, GAMMA = 17, 6, 256, 10, 0.2, 0.99
CONTROL_DT = 0.05  # HalfCheetah-v5: frame_skip 5 × 0.01 s
SMALL_OBS, SMALL_ACT, SMALL_K, SMALL_H = 2, 2, 256, 20


def _objective(value: ValueEstimate, prior, s: torch.Tensor) -> TrajectoryObjective:
    return TrajectoryObjective(s, partial(value, frozen=True), prior, ALPHA)


def _prior(obs: int, act: int) -> ConstantTanhGaussianPrior:
    prior = ConstantTanhGaussianPrior()
    prior.build(obs, act)
    return prior


def cheetah_planners():
    """(name, plan) for SMC, MPPI, CEM through the HalfCheetah-sized model."""
    value = ModelBasedValue(
        model=DynamicsEnsemble(members=7, elites=5, hidden=(200, 200, 200, 200)),
        leaf=TwinQ(hidden=(256, 256)),
        horizon=H,
    )
    value.build(OBS, ACT)
    prior = _prior(OBS, ACT)
    value.bind(prior, None, lambda: ALPHA, GAMMA)
    s = torch.randn(1, OBS)
    objective = _objective(value, prior, s)
    engines = {
        "smc": SMC(
            n_particles=K, horizon=H, resample="systematic", ess_threshold=1.0, compile=True
        ),
        "smc_eager": SMC(n_particles=K, horizon=H, resample="systematic", ess_threshold=1.0),
        "mppi": MPPI(population=K, horizon=H),  # iterations=5
        "cem": CEM(population=K, horizon=H),  # iterations=5, elites=32
    }
    plans = []
    for name, engine in engines.items():
        engine.build(OBS, ACT)

        def plan(engine=engine):
            engine.infer(s, objective).sample(1)

        plans.append((name, plan))
    return plans


class SmallWorld(WorldModel):
    """s' = s W + a B, r = −‖s‖² − 0.1‖a‖² (deterministic), 2-D."""

    def build(self, obs_dim: int, act_dim: int, termination=None) -> None:
        super().build(obs_dim, act_dim)
        g = torch.Generator().manual_seed(3)
        w = 0.9 * torch.eye(obs_dim) + 0.05 * torch.randn(obs_dim, obs_dim, generator=g)
        self.register_buffer("W", w)
        self.register_buffer("B", 0.5 * torch.randn(act_dim, obs_dim, generator=g))

    def step(self, s, a, propagation="ts1", generator=None) -> Step:
        reward = -(s**2).sum(-1) - 0.1 * (a**2).sum(-1)
        return Step(s @ self.W + a @ self.B, reward, torch.zeros_like(reward))


class SmallLeaf(ValueEstimate):
    """Q̂(s, a) = −‖s W + a B‖²."""

    def __init__(self, world: SmallWorld):
        super().__init__()
        object.__setattr__(self, "world", world)

    def forward(self, s, a, frozen=False):
        return -(s.unsqueeze(-2) @ self.world.W + a @ self.world.B).pow(2).sum(-1)


def small_planners():
    """(name, plan) for mbvi's SMC and the SMCFilter reference on the small world."""
    world = SmallWorld()
    value = ModelBasedValue(model=world, leaf=SmallLeaf(world), horizon=1)
    value.build(SMALL_OBS, SMALL_ACT)
    prior = _prior(SMALL_OBS, SMALL_ACT)
    value.bind(prior, None, lambda: ALPHA, GAMMA)
    s = torch.tensor([[1.0, -0.6]])
    objective = _objective(value, prior, s)
    engine, eager = (
        SMC(n_particles=SMALL_K, horizon=SMALL_H, resample="systematic", ess_threshold=1.0,
            compile=compiled)
        for compiled in (True, False)
    )  # fmt: skip
    engine.build(SMALL_OBS, SMALL_ACT)
    eager.build(SMALL_OBS, SMALL_ACT)
    ref = SMCReference(
        prior, world, partial(value.leaf, frozen=True), ALPHA, GAMMA, SMALL_H, SMALL_K,
        ess_threshold=1.0,
    )  # fmt: skip
    return [
        ("mbvi", lambda: engine.infer(s, objective).sample(1)),
        ("mbvi_eager", lambda: eager.infer(s, objective).sample(1)),
        ("pyro", lambda: ref.plan(s[0])),
    ]


def interleaved_medians_s(plans, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each plan, the plans alternating within each repeat."""
    for _ in range(warmup):
        for _, plan in plans:
            plan()
    times: dict[str, list[float]] = {name: [] for name, _ in plans}
    for _ in range(repeats):
        for name, plan in plans:
            start = time.perf_counter()
            plan()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")

    cheetah = interleaved_medians_s(cheetah_planners(), args.repeats)
    for name, sec in cheetah.items():
        print(f"{name}: {1e3 * sec:.1f} ms/plan, {1 / sec:.1f} plans/s (K={K}, H={H})")
    # The small world's tensors (256 × 2) are too small for intra-op threads to help
    # either arm; with several they only add each op's fork-join cost.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    small = interleaved_medians_s(small_planners(), args.repeats)
    torch.set_num_threads(threads)
    mbvi_ms, pyro_ms = 1e3 * small["mbvi"], 1e3 * small["pyro"]
    eager_ms = 1e3 * small["mbvi_eager"]
    print(f"small world K={SMALL_K} H={SMALL_H}: mbvi SMC {mbvi_ms:.2f} ms/plan "
          f"(eager {eager_ms:.2f}), Pyro SMCFilter {pyro_ms:.2f} ms/plan")  # fmt: skip

    smc, mppi, cem = (1 / cheetah[n] for n in ("smc", "mppi", "cem"))
    print(
        f"planning_rate smc_plans_per_s={smc:.2f} mppi_plans_per_s={mppi:.2f} "
        f"cem_plans_per_s={cem:.2f} realtime_factor={smc * CONTROL_DT:.3f} "
        f"vs_pyro_speedup={pyro_ms / mbvi_ms:.2f}"
    )


if __name__ == "__main__":
    main()
