"""Final evaluation returns of one config over several seeds, through the real CLI.

    python benchmarks/returns.py --config configs/pendulum/sac.yaml --seeds 0 1 2
    python benchmarks/returns.py --config configs/halfcheetah/sac.yaml --seeds 0 1 \
        -- --model.total_env_steps 50000

Each seed is one ``mbvi fit`` run (extra options after ``--`` are passed on), logged to
the MLflow store of the working directory.  Last line:

    returns config=<path> seeds=<s,...> final_eval_returns=<r,...> mean=<m> min=<m>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from mbvi.tracking.logger import resolve_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="options after -- go to mbvi fit")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    mbvi = str(Path(sys.executable).with_name("mbvi"))
    client = MlflowClient(resolve_tracking_uri())
    finals = []
    for seed in args.seeds:
        tag = f"returns-{os.getpid()}-{seed}"
        cmd = [
            mbvi,
            "fit",
            "--config",
            args.config,
            "--model.seed",
            str(seed),
            "--model.progress_refresh_s",
            "0",
            "--trainer.logger.init_args.run_name",
            tag,
            *extra,
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        (run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"attributes.run_name = '{tag}'",
        )
        history = client.get_metric_history(run.info.run_id, "eval/return")
        final = max(history, key=lambda m: m.step)
        print(f"seed {seed}: eval/return {final.value:.1f} at env step {final.step}", flush=True)
        finals.append(final.value)
    mean = sum(finals) / len(finals)
    print(
        f"returns config={args.config} seeds={','.join(map(str, args.seeds))} "
        f"final_eval_returns={','.join(f'{r:.1f}' for r in finals)} "
        f"mean={mean:.1f} min={min(finals):.1f}"
    )


if __name__ == "__main__":
    main()
