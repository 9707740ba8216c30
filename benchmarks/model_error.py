"""How well the dynamics ensemble fits an agent's own data: fit it to the replay buffer
of an agent checkpoint (e.g. a SAC run on HalfCheetah-v5) with the in-run refit loop,
then report the hold-out NLL (the fixed hold-out split's transitions) and the
open-loop error at horizons 1, 5 and 10 over 1,024 windows spread evenly over the
buffer's episodes (most of them training data).

    python benchmarks/model_error.py --ckpt checkpoints/<run id>/last.ckpt

The error at horizon h is the mean over state dims of the squared error of the
ensemble's mean prediction h steps ahead under the replayed actions, divided by each
dim's variance (1.0 is as bad as predicting the mean state).  The last line:

    model_error env=<id> transitions=<n> holdout_nll=<a> holdout_mse=<b>
        mse_h1=<c> mse_h5=<d> mse_h10=<e>     (one line)
"""

from __future__ import annotations

import argparse
import time

from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.dynamics_module import DynamicsModule
from mbvi.models.termination import termination_for_env
from mbvi.training.env import make_env
from mbvi.training.model_error import open_loop_errors
from mbvi.training.replay import ReplayBuffer
from mbvi.training.transitions import transitions_from_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="an mbvi agent checkpoint")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--members", type=int, default=7)
    parser.add_argument("--elites", type=int, default=5)
    args = parser.parse_args()

    data = transitions_from_checkpoint(args.ckpt)
    s, a, r, s2, d = data.fields()
    env = make_env(data.env_id)
    termination, _ = termination_for_env(env)
    model = DynamicsEnsemble(members=args.members, elites=args.elites)
    model.build(s.shape[1], a.shape[1], termination)
    start = time.perf_counter()
    fit = DynamicsModule(model, max_epochs=args.epochs, patience=args.patience)
    metrics = fit.fit_transitions(s, a, r, s2, d)
    seconds = time.perf_counter() - start
    buffer = ReplayBuffer(len(r), s.shape[1], a.shape[1])
    buffer.add_batch(s, a, r, s2, d)
    errors = open_loop_errors(model, buffer, (1, 5, 10), n_starts=1024)
    print(f"fit: {metrics['model/epochs']:.0f} epochs in {seconds:.0f} s")
    print(
        f"model_error env={data.env_id} transitions={len(r)} "
        f"holdout_nll={metrics['model/holdout_nll']:.3f} "
        f"holdout_mse={metrics['model/holdout_mse']:.4f} "
        f"mse_h1={errors['model/rollout_mse_h1']:.4f} mse_h5={errors['model/rollout_mse_h5']:.4f} "
        f"mse_h10={errors['model/rollout_mse_h10']:.4f}"
    )


if __name__ == "__main__":
    main()
