"""Wall-clock of a 2×2 sweep against the same four runs one after another.

Two configs (``configs/pendulum/tiny.yaml``, model-free, and ``mb_tiny.yaml``,
model-based) × two seeds, each run ``--steps`` env steps:

* sequential: four ``mbvi fit`` as a user types them, one after another, each with
  torch's default thread count (one per core; ``--sequential_threads`` sets
  ``OMP_NUM_THREADS`` instead), logging to an SQLite store in a fresh folder;
* sweep: one ``mbvi sweep --config tiny.yaml --config mb_tiny.yaml --seeds 0-1`` in
  another fresh folder: its tracking server, Ray's start, the trials (one thread each,
  as many at once as there are cores) and the closing comparison all counted.

Both arms run the real console script from start to exit; the sweep arm runs first or
second as ``--order`` says (on a shared machine, run both orders).  The last line:

    sweep_speedup sequential_s=… sweep_s=… ratio=…

ratio = sweep_s / sequential_s.

    python benchmarks/sweep_speedup.py [--steps 1500] [--order sequential-first]
                                       [--sequential_threads 0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "pendulum" / name for name in ("tiny.yaml", "mb_tiny.yaml")]
SEEDS = (0, 1)
MBVI = str(Path(sys.executable).with_name("mbvi"))


def _run(argv: list[str], cwd: str, threads: int = 0) -> float:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return took


def sequential(steps: int, threads: int) -> float:
    took = 0.0
    with tempfile.TemporaryDirectory() as cwd:
        for config in CONFIGS:
            for seed in SEEDS:
                argv = [MBVI, "fit", "--config", str(config), f"--model.seed={seed}",
                        f"--model.total_env_steps={steps}"]  # fmt: skip
                took += _run(argv, cwd, threads)
    return took


def sweep(steps: int) -> float:
    configs = [arg for config in CONFIGS for arg in ("--config", str(config))]
    seeds = f"{SEEDS[0]}-{SEEDS[-1]}"
    with tempfile.TemporaryDirectory() as cwd:
        return _run([MBVI, "sweep", *configs, "--seeds", seeds, "--grid",
                     f"model.total_env_steps={steps}", "--refresh_s", "30"], cwd)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="env steps of every run")
    parser.add_argument("--sequential_threads", type=int, default=0,
                        help="OMP_NUM_THREADS of sequential runs; 0: torch default")  # fmt: skip
    parser.add_argument("--order", choices=["sequential-first", "sweep-first"],
                        default="sequential-first")  # fmt: skip
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    if args.order == "sweep-first":
        sweep_s = sweep(args.steps)
        sequential_s = sequential(args.steps, args.sequential_threads)
    else:
        sequential_s = sequential(args.steps, args.sequential_threads)
        sweep_s = sweep(args.steps)
    load_after = os.getloadavg()[0]
    print(f"2 configs × {len(SEEDS)} seeds × {args.steps} env steps on {os.cpu_count()} cores; "
          f"1-min load average {load_before:.1f} before, {load_after:.1f} after")  # fmt: skip
    print(f"sweep_speedup sequential_s={sequential_s:.1f} sweep_s={sweep_s:.1f} "
          f"ratio={sweep_s / sequential_s:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
