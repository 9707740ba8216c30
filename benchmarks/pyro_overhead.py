"""Cost of the Pyro optimality model against its plain-torch twin (DESIGN §3 "Pyro").

Times one objective evaluation plus its gradient w.r.t. the guide (policy) parameters
for ``OptimalityModel.elbo`` (Trace_ELBO) and the plain-torch objective on the same
model: H = 5 steps of a small MLP dynamics model, a quadratic reward, an MLP leaf Q̂
and the paper's constant tanh-Gaussian prior, at an update-sized batch (256 states ×
16 particles) and an act-sized batch (1 state × 16 particles).  The native side is
what mbvi recommends at each size: ``native_objective`` (eager) for updates and
``compiled_objective()`` for acting, where eager torch is dispatch-bound; the eager
act time is printed on its own line.  Medians over interleaved repeats, torch's
default thread count.  The last line is machine-readable:

    pyro_overhead update_pyro_ms=… update_native_ms=… update_speedup=… act_pyro_ms=… …

    python benchmarks/pyro_overhead.py [--repeats 30] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from mbvi.models.mlp import mlp
from mbvi.models.policy import GaussianHead
from mbvi.pyro import OptimalityModel, compiled_objective, native_objective
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.priors import ConstantTanhGaussianPrior

OBS_DIM, ACT_DIM, HIDDEN, HORIZON, PARTICLES, ALPHA = 17, 6, (64, 64), 5, 16, 0.2


def build_world(seed: int = 0):
    """A fixed small world: MLP dynamics, quadratic reward, MLP leaf Q̂, MLP policy."""
    torch.manual_seed(seed)
    dyn_net, q_net = mlp(OBS_DIM + ACT_DIM, HIDDEN, OBS_DIM), mlp(OBS_DIM + ACT_DIM, HIDDEN, 1)
    dyn_net.requires_grad_(False)
    q_net.requires_grad_(False)
    policy_net = GaussianHead(OBS_DIM, ACT_DIM, HIDDEN)

    def dynamics(s, a):
        return s + 0.1 * dyn_net(torch.cat([s, a], -1))

    def reward(s, a):
        return -0.1 * s.square().sum(-1) - 0.1 * a.square().sum(-1)

    def leaf(s, a):
        s = s.unsqueeze(1).expand(-1, a.shape[1], -1)
        return q_net(torch.cat([s, a], -1)).squeeze(-1)

    prior = ConstantTanhGaussianPrior()
    prior.build(OBS_DIM, ACT_DIM)
    model = OptimalityModel(prior, leaf, ALPHA, HORIZON, PARTICLES, dynamics, reward)
    return model, policy_net


def _interleaved_medians_ms(steps, repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each step in ms, the steps alternating within every repeat
    so that both see the same load on a shared machine."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times, strict=True):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [1e3 * statistics.median(record) for record in times]


def networks_only(model, policy_net, states, params):
    """The floor under either side: the same H+1 policy calls, H dynamics and reward
    calls and the leaf Q̂ with their gradient, without the objective's log-ratio and
    bookkeeping (what remains if the objective itself were free)."""
    n = model.n_particles
    loc, log_scale = policy_net(states)
    s, total = states.repeat_interleave(n, 0), 0.0
    for t in range(model.horizon + 1):
        if t:
            loc, log_scale = policy_net(s)
        u = loc + log_scale.exp() * torch.randn(s.shape[0], ACT_DIM)
        a = torch.tanh(u)
        if t < model.horizon:
            total = total + model.reward_fn(s, a).sum()
            s = model.dynamics(s, a)
    b = states.shape[0]
    total = total + model.leaf_value(s.view(b, n, -1)[:, 0], a.view(b, n, -1)).sum()
    torch.autograd.grad(total, params)


def time_pair(
    model, policy_net, n_states: int, repeats: int, act: bool = False
) -> tuple[float, ...]:
    """(Pyro ms, native ms[, compiled ms, networks-only ms]) for objective + gradient
    at ``n_states`` × N particles; ``act`` adds the compiled objective and the floor."""
    states = torch.randn(n_states, OBS_DIM)
    params = list(policy_net.parameters())

    def policy(s):
        return TanhGaussian(*policy_net(s))

    guide = model.guide(policy=policy)

    def pyro_step():
        torch.autograd.grad(model.elbo(guide, states), params)

    def native_step():
        j, _ = native_objective(model, states, policy=policy)
        torch.autograd.grad(j.sum(), params)

    steps = [pyro_step, native_step]
    if act:
        compiled = compiled_objective()

        def compiled_step():
            j, _ = compiled(model, states, policy=policy)
            torch.autograd.grad(j.sum(), params)

        compiled_step()  # compiles (tens of seconds), outside the timing
        steps += [compiled_step, lambda: networks_only(model, policy_net, states, params)]
    return tuple(_interleaved_medians_ms(steps, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="0 keeps torch's default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, policy_net = build_world()
    print(f"threads={torch.get_num_threads()} H={HORIZON} N={PARTICLES} A={ACT_DIM} S={OBS_DIM}")
    pyro.enable_validation(False)  # informative only: Pyro without its runtime checks
    update = time_pair(model, policy_net, 256, args.repeats)
    act = time_pair(model, policy_net, 1, 3 * args.repeats)
    print(
        f"pyro_no_validation update_speedup={update[0] / update[1]:.3g} "
        f"act_speedup={act[0] / act[1]:.3g}"
    )
    pyro.enable_validation(True)  # Pyro's default under `python` (__debug__)
    update_pyro, update_native = time_pair(model, policy_net, 256, args.repeats)
    act_pyro, act_eager, act_native, act_floor = time_pair(
        model, policy_net, 1, 3 * args.repeats, act=True
    )
    print(
        f"act_eager native_eager_ms={act_eager:.3g} speedup={act_pyro / act_eager:.3g}: "
        f"eager torch at this size is dispatch-bound; the networks alone (forward + "
        f"gradient, eager) take networks_only_ms={act_floor:.3g}, so no eager objective "
        f"could beat act_speedup={act_pyro / act_floor:.3g}"
    )
    print(
        f"pyro_overhead update_pyro_ms={update_pyro:.3g} update_native_ms={update_native:.3g} "
        f"update_speedup={update_pyro / update_native:.3g} act_pyro_ms={act_pyro:.3g} "
        f"act_native_ms={act_native:.3g} act_speedup={act_pyro / act_native:.3g}"
    )


if __name__ == "__main__":
    main()
