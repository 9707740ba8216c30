"""``mbvi table``: the paper's Table 1 (prior × posterior × value) filled with measured runs.

    mbvi table --env Pendulum-v1 [--preset tiny|full] [--steps N] [--seeds 0 1] [--jobs J]
               [--experiment NAME] [--tracking_uri URI] [--output DIR] [--render-only]

Every cell of ``TABLE_1`` (posterior row × value × prior column) that makes sense is one
``mbvi fit`` per seed: the env's base config of the cell's value (``PRESETS``) plus the
cell's overrides.  The runs go to one MLflow experiment, as parallel subprocesses of one
thread each (``OMP_NUM_THREADS=1``), at most ``--jobs`` (default: the cores) at once.
Then the table is printed as markdown, one cell per (posterior, value, prior):

* final ``eval/return``, mean ± std over seeds (population std, as ``mbvi compare``);
* env steps/s after warm-up: the ``perf/env_steps_per_s`` windows past ``warmup_steps``
  (acting, M-step updates and evaluation), averaged as total steps over total time;
* ms per env step: 1000 / that rate.  mbvi logs no finer timer, so this is the whole
  cost of an env step (planning *and* learning), not the planner's time alone;
* "—" where the combination makes no sense (the reason in a note), "FAILED" where a run
  failed (its name and log in a note; the command then exits 1).

The table is also drawn as a PNG (``<experiment>_table1.png`` in ``--output``) and
logged, with the markdown, to a run named ``table`` in the experiment (tagged like
``mbvi compare``'s run, so that compare and table skip it).  ``--render-only`` draws the
table from an experiment's existing runs without training; cells are recognised by the
runs' ``engine``, ``prior`` and ``value`` parameters, so runs started by hand count too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbvi.errors import MbviError
from mbvi.tracking.compare import GroupSummary, summarize
from mbvi.tracking.runs import COMPARE_TAG, SPEED, group_runs, load_runs, mixed_settings, open_store
from mbvi.tracking.table_cells import (
    PRESETS,
    TABLE_1,
    Skip,
    cell_of,
)
from mbvi.tracking.table_render import Measured, markdown, plot_table, render

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class Job:
    cell: tuple[str, str, str]
    run_name: str
    argv: list[str]


# ---- building the runs -------------------------------------------------------------------
def find_configs(env_id: str, preset: str, configs: Path = CONFIGS) -> dict[str, Path]:
    """The base config of each value for ``env_id``: the first folder of ``configs``
    whose preset files name that env; ``MbviError`` listing the envs that have them."""
    import yaml

    found: dict[str, list[str]] = {}
    for folder in sorted(p for p in configs.iterdir() if p.is_dir()):
        for name, files in PRESETS.items():
            paths = {v: folder / f for v, f in files["configs"].items()}
            if not all(p.is_file() for p in paths.values()):
                continue
            envs = {(yaml.safe_load(p.read_text())["model"] or {}).get("env_id")
                    for p in paths.values()}  # fmt: skip
            if envs == {env_id} and name == preset:
                return paths
            for env in envs:
                found.setdefault(str(env), []).append(f"{name} in {folder}")
    have = "; ".join(f"{env} ({', '.join(where)})" for env, where in sorted(found.items()))
    raise MbviError(
        f"no {preset!r} Table 1 configs for env {env_id!r} in {configs}: the table needs "
        f"{' and '.join(PRESETS[preset]['configs'].values())} naming it. Envs with configs: "
        f"{have or 'none'}. Pass one of them with --env (and its --preset)."
    )


def make_jobs(base: dict[str, Path], preset: str, steps: int, seeds: Sequence[int],
              experiment: str, tracking_uri: str) -> list[Job]:  # fmt: skip
    """One ``mbvi fit`` per non-skipped cell and seed, in TABLE_1's order."""
    sizes = PRESETS[preset]
    jobs = []
    for (posterior, value, prior), overrides in TABLE_1.items():
        if isinstance(overrides, Skip):
            continue
        for seed in seeds:
            name = f"table-{posterior}-{value}-{prior}-seed{seed}"
            argv = [sys.executable, "-m", "mbvi.cli", "fit", "--config", str(base[value]),
                    *(o.format(**sizes) for o in overrides),
                    f"--model.updates_per_step={sizes['updates']}",
                    f"--model.total_env_steps={steps}", f"--model.seed={seed}",
                    f"--trainer.logger.init_args.experiment_name={experiment}",
                    f"--trainer.logger.init_args.run_name={name}",
                    f"--trainer.logger.init_args.tracking_uri={tracking_uri}"]  # fmt: skip
            jobs.append(Job((posterior, value, prior), name, argv))
    return jobs


def run_jobs(jobs: Sequence[Job], n_parallel: int, log_dir: Path) -> dict[str, Path]:
    """Run ``jobs``, ``n_parallel`` at a time, each on one thread, output to
    ``log_dir/<run name>.log``; returns {run name: log} of the runs that failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < n_parallel:
            job = pending.pop(0)
            log = log_dir / f"{job.run_name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            running.append((job, proc, log, time.perf_counter()))
            print(f"mbvi table: started {job.run_name}", flush=True)
        for item in list(running):
            job, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            took = time.perf_counter() - t0
            if proc.returncode:
                failed[job.run_name] = log
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                print(f"mbvi table: {job.run_name} FAILED (exit {proc.returncode}, "
                      f"{took:.0f} s): {tail[0]}", flush=True)  # fmt: skip
            else:
                print(f"mbvi table: finished {job.run_name} ({took:.0f} s)", flush=True)
        time.sleep(0.2)
    return failed


# ---- reading the runs back ---------------------------------------------------------------
def speed_after_warmup(points: Sequence[tuple[int, float]], warmup: int) -> float:
    """Env steps/s of the ``(step, rate)`` windows that end after ``warmup`` (all of
    them if none do): total steps over total time, windows of equal length assumed."""
    rates = [r for s, r in points if s > warmup and r > 0] or [r for _, r in points if r > 0]
    return 1.0 / float(np.mean([1.0 / r for r in rates])) if rates else float("nan")


def measure(client, experiment: str) -> tuple[str, dict[tuple[str, str, str], Measured]]:
    """(experiment id, the filled cells) from the experiment's finished runs."""
    experiment_id, runs = load_runs(client, experiment, "eval/return")
    rows: dict[tuple[str, str, str], list[tuple[GroupSummary, float]]] = {}
    groups = group_runs(runs)
    for row in summarize(runs):
        members = groups[row.group]
        cell = cell_of(members[0].params)
        if cell is None:
            print(f"mbvi table: {', '.join(row.group)} is no cell of Table 1; left out",
                  file=sys.stderr)  # fmt: skip
            continue
        if mixed := mixed_settings(members):
            print(f"mbvi table: {'/'.join(cell)}: its runs differ in {', '.join(mixed)}; "
                  "the cell averages over them", file=sys.stderr)  # fmt: skip
        speeds = [speed_after_warmup(
            [(m.step, m.value) for m in client.get_metric_history(r.run_id, SPEED)],
            int(r.params.get("warmup_steps", 0))) for r in members]  # fmt: skip
        rows.setdefault(cell, []).append((row, float(np.mean(speeds))))
    cells = {}
    for cell, found in rows.items():
        row, speed = max(found, key=lambda f: len(f[0].seeds))
        if len(found) > 1:
            print(f"mbvi table: {'/'.join(cell)} has runs of several settings "
                  f"({'; '.join(', '.join(f[0].group) for f in found)}); showing "
                  f"{', '.join(row.group)}", file=sys.stderr)  # fmt: skip
        cells[cell] = Measured(row.final_mean, row.final_std, len(row.seeds), speed, row.group[2])
    return experiment_id, cells


def failed_runs(client, experiment_id: str) -> dict[tuple[str, str, str], list[str]]:
    """The names of the experiment's FAILED runs, by cell."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for run in client.search_runs([experiment_id], "attributes.status = 'FAILED'"):
        if (cell := cell_of(run.data.params)) is not None:
            out.setdefault(cell, []).append(run.info.run_name)
    return out


def log_table(client, experiment_id: str, png: Path, text: str, params: dict) -> str:
    """Log the PNG and the markdown to a new run named ``table``."""
    run = client.create_run(experiment_id, run_name="table", tags={COMPARE_TAG: "table"})
    rid = run.info.run_id
    try:
        for key, value in params.items():
            client.log_param(rid, key, value)
        client.log_artifact(rid, str(png))
        client.log_text(rid, text + "\n", "table1.md")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


# ---- the command -------------------------------------------------------------------------
def table(env_id: str, preset: str = "tiny", steps: int | None = None,
          seeds: Sequence[int] = (0,), jobs: int | None = None, experiment: str | None = None,
          tracking_uri: str | None = None, output: str = ".", render_only: bool = False,
          configs: Path = CONFIGS) -> int:  # fmt: skip
    """Train Table 1's cells (unless ``render_only``), print and log the table; returns
    the exit status: 1 if a run failed, else 0."""
    from mbvi.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or f"table1-{env_id}-{preset}"
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[tuple[str, str, str], list[str]] = {}
    if not render_only:
        base = find_configs(env_id, preset, configs)
        todo = make_jobs(base, preset, steps or PRESETS[preset]["steps"], seeds, experiment, uri)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n_parallel = min(jobs or cores, cores)
        if jobs and jobs > cores:
            print(f"mbvi table: --jobs {jobs} > {cores} cores; running {cores} at once",
                  file=sys.stderr)  # fmt: skip
        print(f"mbvi table: {len(todo)} runs, {n_parallel} at once, into experiment "
              f"{experiment!r} at {uri}", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        logs = run_jobs(todo, n_parallel, out / f"{experiment}_logs")
        print(f"mbvi table: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        for job in todo:
            if job.run_name in logs:
                failed.setdefault(job.cell, []).append(
                    f"{job.run_name} (log: {logs[job.run_name]})"
                )
    try:
        client = open_store(uri)
        experiment_id, cells = measure(client, experiment)
    except MbviError:
        if not failed:
            raise
        experiment_id, cells = _experiment_id(uri, experiment), {}  # every run failed
    if render_only:
        failed = {c: n for c, n in failed_runs(client, experiment_id).items() if c not in cells}
    head, body, notes = render(cells, failed, env_id, TABLE_1)
    text = markdown(head, body, notes)
    print(text)
    png = plot_table(head, body, notes, f"Table 1 measured: {experiment}",
                     out / f"{experiment}_table1.png")  # fmt: skip
    print(f"wrote {png}")
    if experiment_id is None:  # every run failed before it reached MLflow
        print(f"mbvi table: every run failed before logging; experiment {experiment!r} does "
              "not exist, so the table is not logged", file=sys.stderr)  # fmt: skip
        return 1
    params = {"env_id": env_id, "preset": preset, "render_only": render_only,
              "cells": len(cells), "failed_cells": len(failed)}  # fmt: skip
    rid = log_table(open_store(uri), experiment_id, png, text, params)
    print(f"logged the table as MLflow run {rid} ('table') in experiment {experiment!r}")
    if failed:
        print(f"mbvi table: {sum(map(len, failed.values()))} run(s) failed; the table marks "
              "their cells FAILED", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _experiment_id(uri: str, experiment: str) -> str | None:
    """The experiment's id; None when it or its store does not exist."""
    try:
        exp = open_store(uri).get_experiment_by_name(experiment)
    except MbviError:
        return None
    return exp.experiment_id if exp else None


def main(argv: Sequence[str] | None = None) -> int:
    """``mbvi table ...``; returns the exit status (2 on bad input, 1 if a run failed)."""
    parser = argparse.ArgumentParser(
        prog="mbvi table",
        description="Paper Table 1 (prior × posterior × value) trained and filled with "
        "measured return and speed.",
    )
    add = parser.add_argument
    add("--env", required=True, help="env id with configs, e.g. Pendulum-v1")
    add("--preset", choices=sorted(PRESETS), default="tiny",
        help="tiny: tiny.yaml + mb_tiny.yaml; full: sac.yaml + mb_direct.yaml")  # fmt: skip
    add("--steps", type=int, default=None, help="env steps per run (tiny 150, full 3000)")
    add("--seeds", type=int, nargs="+", default=[0], help="seeds per cell")
    add("--jobs", type=int, default=None,
        help="runs at once, one thread each (default, and most: the cores)")  # fmt: skip
    add("--experiment", default=None, help="MLflow experiment (table1-<env>-<preset>)")
    add("--tracking_uri", default=None,
        help="MLflow store (default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")  # fmt: skip
    add("--output", default=".", help="folder for the PNG and the run logs")
    add("--render-only", action="store_true", help="draw the table from the experiment's runs")
    add("--configs", type=Path, default=CONFIGS, help="configs folder")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.configs.is_dir():
        parser.error(
            f"--configs {str(args.configs)!r} is not a folder; pass the folder of per-env "
            "config folders (the repository's configs/, e.g. configs/pendulum/tiny.yaml)"
        )
    try:
        return table(args.env, args.preset, args.steps, args.seeds, args.jobs, args.experiment,
                     args.tracking_uri, args.output, args.render_only, args.configs)  # fmt: skip
    except MbviError as err:
        print(f"mbvi: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
