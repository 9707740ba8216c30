"""Training and rollout speed of mbvi's dynamics ensemble, against mbrl-lib's
``GaussianMLP`` on the same sizes.

Both train 7 members of 4×200 SiLU hidden layers, predicting a diagonal Gaussian over
(Δs, r) of HalfCheetah-v5's dimensions (17 state, 6 action dims; random data), with
learned log-variance bounds and Adam (lr 1e-3, weight decay 5e-5), on minibatches of
256 transitions per member ([7, 256, ·], each member its own rows).  A training step is
forward + backward + Adam step: ``DynamicsModule.training_step`` then
``loss.backward()`` and its optimiser's ``step`` for mbvi (as ``fit_transitions``
runs it), ``GaussianMLP.update`` with the plain ``torch.optim.Adam`` that mbrl-lib's
``ModelTrainer`` builds for mbrl-lib.  The rate is member-transitions per second
(7 × 256 per step).  The two alternate for ``--rounds`` rounds and the medians are
compared.

Each round also times an H=10 rollout of 1,024 particles through mbvi's ensemble
(``step`` with TS-1, Gaussian sampling included, under ``torch.no_grad``), and the
machine's fp32 matmul peak: the best rate of a 256×256×256 ``torch.mm``, in the same
process and thread count.  The rollout's FLOPs are those of the matmuls it actually
runs: every step pushes the 1,024 rows, padded to a multiple of the 5 elites (1,025),
through each layer once (2·rows·in·out per layer); bias adds, activations and sampling
are not counted, though their time is.  ``rollout_peak_fraction`` = rollout FLOP/s over
the peak.  Last line:

    model_rollout train_mbvi_per_s=<a> train_mbrl_per_s=<b> train_speedup=<a/b>
        rollout_peak_fraction=<c>

(one line).  The line before it gives the rate of the training step's matmuls alone,
the ceiling of either implementation.

Setup (mbrl-lib 0.2.0 pins an old gymnasium, hence ``--no-deps``):

    pip install --no-deps mbrl==0.2.0
    pip install hydra-core "omegaconf<2.4" "antlr4-python3-runtime==4.9.3" termcolor

Run it on an otherwise quiet machine: both sides are matmul-bound and share the cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.dynamics_module import DynamicsModule

OBS, ACT = 17, 6  # HalfCheetah-v5
MEMBERS, ELITES, HIDDEN, BATCH = 7, 5, (200, 200, 200, 200), 256
PARTICLES, HORIZON = 1024, 10
LR, WEIGHT_DECAY = 1e-3, 5e-5


def _best_seconds(fn, repeats: int, blocks: int = 5) -> float:
    """Seconds per call: the best mean over ``blocks`` blocks of ``repeats`` calls."""
    fn()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def _batch(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    shape = (MEMBERS, BATCH)
    return (torch.randn(*shape, OBS, generator=g), torch.rand(*shape, ACT, generator=g) * 2 - 1,
            torch.randn(*shape, generator=g), torch.randn(*shape, OBS, generator=g),
            torch.zeros(*shape))  # fmt: skip


def mbvi_trainer(seed: int):
    """A training step of mbvi's ensemble (what ``fit_transitions`` runs per batch)."""
    torch.manual_seed(seed)
    model = DynamicsEnsemble(members=MEMBERS, elites=ELITES, hidden=HIDDEN)
    model.build(OBS, ACT)
    fitter = DynamicsModule(model, lr=LR, weight_decay=WEIGHT_DECAY, batch_size=BATCH)
    opt = fitter.configure_optimizers()
    batch = _batch(torch.Generator().manual_seed(seed))
    model.fit_normalisers(*(x.flatten(0, 1) for x in batch[:4]))

    def step():
        loss = fitter.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def mbrl_trainer(seed: int):
    """A training step of mbrl-lib's GaussianMLP (``update``: forward, NLL, backward,
    Adam), on inputs and targets already normalised (its wrapper does that outside)."""
    from mbrl.models import GaussianMLP

    torch.manual_seed(seed)
    model = GaussianMLP(
        OBS + ACT, OBS + 1, "cpu", num_layers=len(HIDDEN), ensemble_size=MEMBERS,
        hid_size=HIDDEN[0], learn_logvar_bounds=True,
        activation_fn_cfg={"_target_": "torch.nn.SiLU"},
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(MEMBERS, BATCH, OBS + ACT, generator=g)
    y = torch.randn(MEMBERS, BATCH, OBS + 1, generator=g)
    return lambda: model.update(x, opt, y)


def matmul_floor(seed: int):
    """The training step's matmuls alone, on random tensors of the same shapes: the
    forward's and, in the backward, each layer's weight gradient and (but the first
    layer's) input gradient.  Neither implementation can step faster than this."""
    g = torch.Generator().manual_seed(seed)
    dims = [OBS + ACT, *HIDDEN, 2 * (OBS + 1)]
    ws = [torch.randn(MEMBERS, i, o, generator=g) for i, o in zip(dims[:-1], dims[1:])]
    hs = [torch.randn(MEMBERS, BATCH, d, generator=g) for d in dims]

    def step():
        h = hs[0]
        for w in ws:
            h = torch.bmm(h, w)
        for i in reversed(range(len(ws))):
            torch.bmm(hs[i].transpose(1, 2), hs[i + 1])
            if i > 0:
                torch.bmm(hs[i + 1], ws[i].transpose(1, 2))

    return step


def rollout_fn(model: DynamicsEnsemble, seed: int):
    g = torch.Generator().manual_seed(seed)
    s0 = torch.randn(PARTICLES, OBS, generator=g)
    actions = torch.rand(HORIZON, PARTICLES, ACT, generator=g) * 2 - 1
    model.set_elites(torch.randperm(MEMBERS, generator=g)[:ELITES])

    def roll():
        with torch.no_grad():
            s = s0
            for t in range(HORIZON):
                s = model.step(s, actions[t], "ts1", g).next_state

    return roll


def rollout_flops() -> int:
    rows = -(-PARTICLES // ELITES) * ELITES  # padded to equal groups, one per elite
    dims = [OBS + ACT, *HIDDEN, 2 * (OBS + 1)]
    return HORIZON * 2 * rows * sum(i * o for i, o in zip(dims[:-1], dims[1:]))


def matmul_peak() -> float:
    """FLOP/s of the best 256×256×256 fp32 ``torch.mm``."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    return 2 * 256**3 / _best_seconds(lambda: torch.mm(a, b), repeats=200, blocks=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args()
    try:
        import mbrl.models  # noqa: F401
    except ImportError:
        sys.exit(
            "model_rollout needs mbrl-lib 0.2.0 to compare against; install it with\n"
            '  pip install --no-deps mbrl==0.2.0 && pip install hydra-core "omegaconf<2.4" '
            '"antlr4-python3-runtime==4.9.3" termcolor'
        )
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    per_step = MEMBERS * BATCH
    ours, theirs, floors, fractions = [], [], [], []
    for r in range(args.rounds):
        step, model = mbvi_trainer(r)
        ours.append(per_step / _best_seconds(step, args.train_steps, blocks=3))
        theirs.append(per_step / _best_seconds(mbrl_trainer(r), args.train_steps, blocks=3))
        floors.append(per_step / _best_seconds(matmul_floor(r), args.train_steps, blocks=3))
        roll_s = _best_seconds(rollout_fn(model, r), repeats=5)
        peak = matmul_peak()
        fractions.append(rollout_flops() / roll_s / peak)
        print(
            f"round {r}: train mbvi {ours[-1]:.0f}/s, mbrl {theirs[-1]:.0f}/s, matmuls alone "
            f"{floors[-1]:.0f}/s member-transitions; "
            f"rollout {roll_s * 1e3:.1f} ms = {rollout_flops() / roll_s / 1e9:.1f} GFLOP/s, "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(fractions)
    floor = statistics.median(floors)
    print(
        f"train_matmul_floor_per_s={floor:.0f} (mbvi at {a / floor:.2f} of it; the speedup "
        f"over mbrl-lib can be at most {floor / b:.2f})"
    )
    print(
        f"model_rollout train_mbvi_per_s={a:.0f} train_mbrl_per_s={b:.0f} "
        f"train_speedup={a / b:.2f} rollout_peak_fraction={c:.2f}"
    )


if __name__ == "__main__":
    main()
