"""The paper's own setting on one GPU: ``paper_iterative.yaml`` (K = 2, N = 200) against
``paper_direct.yaml`` on HalfCheetah-v5, two seeds each, all four runs at once.

One command for a short GPU window: it runs ``mbvi sweep`` over the pair in ``--out``
(a fresh folder: its SQLite store, checkpoints, trial logs and ``mbvi compare``'s table
and figures), with the machine's cores shared between the four trials and every trial
on the GPU (the CLI's ``accelerator: auto``), then prints each run's last eval return
and, last:

    gpu_paper steps=<S> iterative=<mean> direct=<mean> iterative_runs=<r0,r1> direct_runs=<r0,r1>

A trial that has not finished (the window closed) is reported with the last eval return
it logged, marked ``*``; re-running the command in the same ``--out`` skips the trials that
FINISHED and reruns the others.

    python benchmarks/gpu_paper.py [--steps 100000] [--seeds 0-1] [--out gpu_paper]
        [-- extra mbvi sweep options, e.g. --grid model.warmup_steps=5000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mbvi.tracking.sweep import parse_seeds

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "iterative": ROOT / "configs" / "halfcheetah" / "paper_iterative.yaml",
    "direct": ROOT / "configs" / "halfcheetah" / "paper_direct.yaml",
}
EXPERIMENT = "halfcheetah-paper-gpu"
MBVI = str(Path(sys.executable).with_name("mbvi"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="env steps per run")
    parser.add_argument("--seeds", default="0-1", help="seeds of each arm (mbvi sweep syntax)")
    parser.add_argument("--out", type=Path, default=Path("gpu_paper"), help="working folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    trials = len(ARMS) * len(parse_seeds(args.seeds))
    threads = max(1, (os.cpu_count() or 1) // trials)
    command = [MBVI, "sweep", *(f"--config={path}" for path in ARMS.values()),
               f"--seeds={args.seeds}", f"--grid=model.total_env_steps={args.steps}",
               f"--experiment={EXPERIMENT}", f"--threads_per_trial={threads}",
               "--refresh_s=60", *extra]  # fmt: skip
    status = subprocess.run(command, cwd=args.out).returncode
    finals = _final_returns(args.out)
    for arm, runs in finals.items():
        for name, value, done in runs:
            print(f"{arm:9s} {name}: {value:.1f}{'' if done else ' * (unfinished)'}")
    means = {arm: _mean([v for _, v, _ in runs]) for arm, runs in finals.items()}
    listed = {arm: ",".join(f"{v:.1f}{'' if d else '*'}" for _, v, d in runs)
              for arm, runs in finals.items()}  # fmt: skip
    print(f"gpu_paper steps={args.steps} iterative={means['iterative']:.1f} "
          f"direct={means['direct']:.1f} iterative_runs={listed['iterative'] or '-'} "
          f"direct_runs={listed['direct'] or '-'}")  # fmt: skip
    return status


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _final_returns(folder: Path) -> dict[str, list[tuple[str, float, bool]]]:
    """Per arm: (run name, last logged eval/return, FINISHED) of every trial run."""
    from mlflow import MlflowClient

    out: dict[str, list[tuple[str, float, bool]]] = {arm: [] for arm in ARMS}
    store = folder.resolve() / "mlflow.db"
    if not store.exists():
        return out
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return out
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"]):
        name = run.info.run_name or run.info.run_id
        arm = next((a for a, path in ARMS.items() if name.startswith(path.stem)), None)
        value = run.data.metrics.get("eval/return")
        if arm is not None and value is not None:
            out[arm].append((name, value, run.info.status == "FINISHED"))
    return out


if __name__ == "__main__":
    sys.exit(main())
