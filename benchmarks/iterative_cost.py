"""Cost of one M-step update: direct (SAC) vs iterative amortised inference (Eq. 15).

Times the agent's own ``VariationalAgent.update`` (replay sampling included) on
HalfCheetah-v5 sizes (S = 17, A = 6), twin Q 2x256, inference networks 2x256:

* ``direct``: ``Direct`` engine, ``UniformPrior``, batch 256 (SAC);
* ``iterative_paper``: ``Iterative`` with K = 2, N = 200, ``ConstantTanhGaussianPrior``,
  batch 128 (the paper's §4.1 setting);
* ``iterative_cheap``: the same with N = 4 antithetic samples
  (``configs/halfcheetah/iterative_sac_cpu.yaml``);

plus the machine's fp32 matmul peak (best GFLOP/s of 512² and 1024² matmuls), and
``peak_fraction``: the median over the paper-setting updates of (FLOPs of the update /
its time) / the peak measured just before it (the machine is shared and its speed
drifts: each update is compared with the peak of the same moment).

FLOP count (``update_flops``): matmul FLOPs actually performed (2·rows·in·out per
linear layer and pass; Adam, Polyak averaging, tanh, sampling and KL are elementwise and
not counted).  The critic being trained (value loss) runs through autograd: forward,
then weight gradients and input gradients (none for its first layer).  Wherever the
critic is frozen (inference, targets, the engines' losses) it runs, from
``MIN_FAST_ROWS`` = 1,024 rows (states × actions) up on CPU, through
``FrozenReducedQ``: its first layer computes the state's share once per state and the
action's once per action, and wherever actions need a gradient its forward pass also
runs the backward w.r.t. the actions, with no weight gradients, sending each action
through the one member that attains the min (so B·N rows, not E·B·N).  Below
1,024 rows it runs through autograd, whose backward goes through every member and down
to the whole first-layer input [s, a] (``frozen_q_bwd``).  With
q = twin Q (E = 2, 23→256→256→1), π = Direct's 17→256→256→12, f = Iterative's
(17+4A)→256→256→4A network, B states, N samples, K iterations:

    fq(B, N)  = frozen forward: E·(B·S·H + B·N·(A·H + H·H + H))·2, with B·N·S·H for
                B·S·H through autograd below 1,024 rows
    bq(B, N)  = its gradient w.r.t. the actions (run in the forward pass): B·N·(H·H + H·A)·2,
                or E·B·N·(H + H·H + H·(S+A))·2 through autograd below 1,024 rows
    direct      next:   π fwd(B) + fq(B, 1)
                value:  q fwd(B) + q bwd(B; weights, no first-input)
                engine: π fwd(B) + fq(B, 1) + bq(B, 1) + π bwd(B; weights, no first-input)
    iterative   unroll = fq(B, 1) + bq(B, 1)  (differentiability check, once per objective;
                                            bq only from 1,024 states up, see update_flops)
                         + K·(fq(B, N) + bq(B, N) + f fwd(B))
                next:   unroll + fq(B, 1)                          (targets, at s')
                value:  as direct
                engine: unroll + fq(B, 1)  (J̃_0)  + K·(fq(B, 1) + bq(B, 1))  (J̃_k)
                        + f bwd(B; weights, no first-input)
                        + (K−1)·f bwd(B; weights and input)           (λ_k feeds step k+1)

The first (untimed) update of each setting runs under
``torch.utils.flop_counter.FlopCounterMode`` and its count is printed next to the
analytic one (the fused oneDNN linear+ReLU of ``FrozenReducedQ``'s hidden layers is
taught to it as a matmul).

    python benchmarks/iterative_cost.py [--repeats 5] [--threads 0]

Last line:

    iterative_cost direct_ms=<a> iterative_paper_ms=<b> iterative_cheap_ms=<c> peak_fraction=<f>
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from mbvi import ConstantTanhGaussianPrior, TwinQ, UniformPrior, VariationalAgent
from mbvi._private_torch import LINEAR_RELU_OP
from mbvi.models import q as q_module
from mbvi.models.q import MIN_FAST_ROWS
from mbvi.planners import Direct, Iterative

ENV_ID, OBS, ACT, HIDDEN, MEMBERS = "HalfCheetah-v5", 17, 6, (256, 256), 2
FILL = 1000  # random warm-up transitions in the replay buffer

if LINEAR_RELU_OP is not None:

    @register_flop_formula(LINEAR_RELU_OP)
    def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """x [rows, in] · wᵀ, w [out, in] (bias and pointwise post-op not counted)."""
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]


class _Mlp:
    """Matmul FLOPs of an MLP (``members`` copies) with layer sizes ``dims``."""

    def __init__(self, dims: list[int], members: int = 1):
        self.dims, self.members = dims, members

    def fwd(self, rows: int) -> int:
        return sum(2 * rows * i * o for i, o in zip(self.dims, self.dims[1:])) * self.members

    def bwd(self, rows: int, weights: bool, first_input: bool) -> int:
        first = 2 * rows * self.dims[0] * self.dims[1] * self.members
        return (self.fwd(rows) if weights else 0) + self.fwd(rows) - (0 if first_input else first)


def frozen_q_fwd(b: int, n: int) -> int:
    """Matmul FLOPs of the frozen critic's forward on B states × N actions: the state's
    share of the first layer once per state (``FrozenReducedQ``), or once per row below
    ``MIN_FAST_ROWS`` rows (autograd through ``QEnsemble.forward``)."""
    h0, h1 = HIDDEN
    states = b * n if b * n < MIN_FAST_ROWS else b
    return 2 * MEMBERS * (states * OBS * h0 + b * n * (ACT * h0 + h0 * h1 + h1))


def frozen_q_bwd(b: int, n: int) -> int:
    """Matmul FLOPs of its backward w.r.t. the actions: with ``FrozenReducedQ`` (min: one
    member per action), or, below ``MIN_FAST_ROWS`` rows, with autograd through every
    member and down to the whole first-layer input [s, a]."""
    h0, h1 = HIDDEN
    if b * n < MIN_FAST_ROWS:
        return 2 * MEMBERS * b * n * (h1 + h1 * h0 + h0 * (OBS + ACT))
    return 2 * b * n * (h1 * h0 + h0 * ACT)


def update_flops(engine: str, batch: int, n_samples: int = 0, iterations: int = 0) -> int:
    """Matmul FLOPs of one ``update`` (see the module docstring)."""
    q = _Mlp([OBS + ACT, *HIDDEN, 1], MEMBERS)
    fq, bq, b = frozen_q_fwd, frozen_q_bwd, batch
    value = q.fwd(b) + q.bwd(b, weights=True, first_input=False)
    if engine == "direct":
        pi = _Mlp([OBS, *HIDDEN, 2 * ACT])
        nxt = pi.fwd(b) + fq(b, 1)
        eng = pi.fwd(b) + fq(b, 1) + bq(b, 1) + pi.bwd(b, weights=True, first_input=False)
        return nxt + value + eng
    f, k = _Mlp([OBS + 4 * ACT, *HIDDEN, 4 * ACT]), iterations
    # The differentiability probe's action gradient is computed only where
    # FrozenReducedQ computes it in its forward pass: autograd never runs its backward.
    probe = fq(b, 1) + (bq(b, 1) if b >= MIN_FAST_ROWS else 0)
    unroll = probe + k * (fq(b, n_samples) + bq(b, n_samples) + f.fwd(b))
    nxt = unroll + fq(b, 1)
    eng = unroll + fq(b, 1) + k * (fq(b, 1) + bq(b, 1))
    eng += f.bwd(b, weights=True, first_input=False) + (k - 1) * f.bwd(b, True, True)
    return nxt + value + eng


def update_ms(agent: VariationalAgent, batch: int, repeats: int, warmup: int = 2, anchor=None):
    """(median wall time in ms of ``agent.update`` on replay batches of ``batch``, matmul
    FLOPs of one update counted by torch's FlopCounterMode during the first warm-up,
    the list of timed updates in ms, ``anchor()`` evaluated right before each of them).
    The anchor is the matmul peak: measured beside every update, so that both see the
    same load on a shared machine."""
    agent.setup("fit")
    for _ in range(FILL):
        agent._act_and_store()  # random actions: env_steps < warmup_steps
    opt = agent.configure_optimizers()
    agent.optimizers = lambda use_pl_optimizer=True: opt
    agent.manual_backward = lambda loss: loss.backward()
    # FlopCounterMode sees only this thread's ops: count with the chunks unsplit.
    parallel, q_module.PARALLEL_CHUNKS = q_module.PARALLEL_CHUNKS, False
    try:
        with FlopCounterMode(display=False) as counter:
            agent.update(*agent.buffer.sample(batch))
    finally:
        q_module.PARALLEL_CHUNKS = parallel
    times, anchors = [], []
    for i in range(warmup - 1 + repeats):
        if i >= warmup - 1 and anchor is not None:
            anchors.append(anchor())
        t0 = time.perf_counter()
        agent.update(*agent.buffer.sample(batch))
        if i >= warmup - 1:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), counter.get_total_flops(), times, anchors


def make_agent(engine, prior, batch: int) -> VariationalAgent:
    return VariationalAgent(
        ENV_ID,
        prior=prior,
        engine=engine,
        value=TwinQ(hidden=HIDDEN),
        batch_size=batch,
        total_env_steps=10 * FILL + 1,  # only the warm-up is stepped: updates are timed directly
        warmup_steps=10 * FILL,
        progress_refresh_s=0,
    )


def matmul_peak_gflops(repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of square matmuls (512 and 1024)."""
    best = 0.0
    for n in (512, 1024):
        x, y = torch.randn(n, n), torch.randn(n, n)
        x @ y  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per setting")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    peak = matmul_peak_gflops(10)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)
    settings = {
        "direct": (Direct(hidden=HIDDEN), UniformPrior(), 256, {}),
        "iterative_paper": (Iterative(hidden=HIDDEN, iterations=2, n_samples=200),
                            ConstantTanhGaussianPrior(), 128, dict(n_samples=200, iterations=2)),
        "iterative_cheap": (Iterative(hidden=HIDDEN, iterations=2, n_samples=4, antithetic=True),
                            ConstantTanhGaussianPrior(), 128, dict(n_samples=4, iterations=2)),
    }  # fmt: skip
    ms, flops = {}, {}
    for name, (engine, prior, batch, shape) in settings.items():
        paper = name == "iterative_paper"
        repeats = args.repeats * (4 if not paper else 1)  # cheap ones: more
        agent = make_agent(engine, prior, batch)
        anchor = matmul_peak_gflops if paper else None
        ms[name], counted, times, peaks = update_ms(agent, batch, repeats, anchor=anchor)
        flops[name] = update_flops(name.split("_")[0], batch, **shape)
        achieved = flops[name] / ms[name] / 1e6
        print(f"{name}: {ms[name]:.2f} ms, {flops[name] / 1e9:.3f} GFLOP "
              f"(FlopCounterMode: {counted / 1e9:.3f}), {achieved:.1f} GFLOP/s "
              f"({achieved / peak:.0%} of the first peak)", flush=True)  # fmt: skip
        if paper:
            # Each update against the peak measured just before it; the median ratio.
            fractions = [flops[name] / t / 1e6 / p for t, p in zip(times, peaks)]
            fraction = statistics.median(fractions)
            print(f"  peaks beside the updates: {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; "
                  f"fractions {', '.join(f'{f:.2f}' for f in fractions)}", flush=True)  # fmt: skip
    print(
        f"iterative_cost direct_ms={ms['direct']:.2f} "
        f"iterative_paper_ms={ms['iterative_paper']:.1f} "
        f"iterative_cheap_ms={ms['iterative_cheap']:.2f} peak_fraction={fraction:.2f}"
    )


if __name__ == "__main__":
    main()
