"""``mbvi compare``: a table and learning curves of one MLflow experiment's runs.

    mbvi compare --experiment NAME [--tracking_uri URI] [--output DIR] [--metric eval/return]
                 [--at-step N]

Reads the experiment's FINISHED runs and groups them by (engine, prior, value, env_id);
a run resumed from a checkpoint (tag ``mbvi.resumed_from``) is joined with the runs it
continues, finished or not, into one sample (one curve, their wall-clocks added);
a warning names any other setting that differs within a group (seed, budget and
bookkeeping aside).
A table row per group: the seeds; the final metric (each run's value at its last logged
step), mean ± std over seeds (population std, 0 for one seed); the env steps reached
(the group's smallest last step); the wall-clock (mean run duration); steps/s (mean over
seeds of each run's env steps reached divided by its duration: warm-up, evaluation and
start-up included, what a researcher waits for).  Figures
(``mbvi.tracking.figures``) written to ``--output``: ``<experiment>_returns.png`` (Fig. 3b; for
another ``--metric``, ``<experiment>_<metric with / as _>.png``) and,
when a run logged ``engine/j_iter_k``, ``<experiment>_inference_improvement.png`` (Fig. 2).

``--at-step N`` compares the runs at equal env steps: every curve (the metric's and
J̃_k's) is cut after step N, so "final" means the last value at or before N.  That is
how runs with different budgets are compared (e.g. direct SAC trained for 100k steps
against iterative SAC trained for 50k).  Wall-clock and steps/s stay whole-run figures.

Figures, table (``compare.txt``) and ``summary.json`` are logged as artifacts of a new
run named ``compare`` in the same experiment, tagged ``mbvi.tracking.compare`` (later compares
skip it): the comparison belongs to the set of runs, so the compared runs stay untouched.
Runs are read and resumed runs joined by ``mbvi.tracking.runs``; the aggregation here is pure
functions of plain data (``RunData``), testable without MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mbvi.errors import ComparisonError, MbviError
from mbvi.tracking.runs import COMPARE_TAG, Curve, RunData, load_runs, open_store


@dataclass
class GroupSummary:
    """One row of the table."""

    group: tuple[str, ...]
    seeds: list[str]
    run_ids: list[str]
    final_mean: float
    final_std: float
    env_steps: int
    wall_clock_s: float
    steps_per_s: float


# ---- pure aggregation ------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) of ``values``."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std())


def final_value(curve: Curve) -> float:
    """The value at the last logged step."""
    return curve[max(curve)]


def align(curves: Sequence[Curve]) -> tuple[list[int], np.ndarray]:
    """The steps common to all ``curves`` and their values ``[runs, steps]``."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves], dtype=float)


def truncate(runs: Sequence[RunData], at_step: int) -> list[RunData]:
    """The runs with every curve cut after ``at_step``; ``ComparisonError`` naming the
    runs that logged the metric only after it."""
    late = [f"{r.name} (first at {min(r.curve)})" for r in runs if min(r.curve) > at_step]
    if late:
        raise ComparisonError(
            f"--at-step {at_step}: these runs have no value at or before that step: "
            f"{', '.join(late)}. Pass a later --at-step."
        )

    def cut(curve: Curve) -> Curve:
        return {step: v for step, v in curve.items() if step <= at_step}

    return [
        replace(r, curve=cut(r.curve), j_iter={k: cut(c) for k, c in r.j_iter.items()})
        for r in runs
    ]


def group_runs(runs: Sequence[RunData]) -> dict[tuple[str, ...], list[RunData]]:
    groups: dict[tuple[str, ...], list[RunData]] = {}
    for run in sorted(runs, key=lambda r: (r.group, r.seed, r.run_id)):
        groups.setdefault(run.group, []).append(run)
    return groups


def summarize(runs: Sequence[RunData]) -> list[GroupSummary]:
    """One ``GroupSummary`` per (engine, prior, value, env_id), sorted by group."""
    rows = []
    for group, members in group_runs(runs).items():
        speeds = [r.env_steps / r.duration_s for r in members if r.env_steps and r.duration_s > 0]
        final_mean, final_std = mean_std([final_value(r.curve) for r in members])
        rows.append(
            GroupSummary(
                group=group,
                seeds=[r.seed for r in members],
                run_ids=[r.run_id for r in members],
                final_mean=final_mean,
                final_std=final_std,
                env_steps=min(max(r.curve) for r in members),
                wall_clock_s=float(np.mean([r.duration_s for r in members])),
                steps_per_s=float(np.mean(speeds)) if speeds else float("nan"),
            )
        )
    return rows


def improvement(j_iter: dict[int, Curve]) -> tuple[np.ndarray, np.ndarray]:
    """One run's mean over logged steps of J̃_k − J̃_0 and of (J̃_k − J̃_0)/|J̃_0|,
    each ``[K+1]`` (k = 0 is 0); steps where J̃_0 = 0 are left out of the relative."""
    absolute, relative = [], []
    for k in range(max(j_iter) + 1):
        steps, values = align([j_iter[0], j_iter.get(k, {})])
        diff, scale = values[1] - values[0], np.abs(values[0])
        ok = scale > 0
        absolute.append(diff.mean() if steps else np.nan)
        relative.append((diff[ok] / scale[ok]).mean() if ok.any() else np.nan)
    return np.array(absolute), np.array(relative)


def duplicate_seeds(summary: GroupSummary) -> list[str]:
    return sorted({s for s in summary.seeds if summary.seeds.count(s) > 1})


# Parameters that may differ between the seeds of one row: the seed, the budget (runs
# of different lengths are compared with --at-step) and bookkeeping.
PER_RUN_PARAMS = frozenset(
    {"seed", "total_env_steps", "checkpoint_every", "checkpoint_dir", "progress_refresh_s",
     "log_every", "ckpt_path"}
)  # fmt: skip


def mixed_settings(members: Sequence[RunData]) -> dict[str, list[str]]:
    """Parameters other than ``PER_RUN_PARAMS`` whose values differ between the runs of
    one row, with their distinct values: the row averages over different settings."""
    names = sorted(set().union(*(r.params for r in members)) - PER_RUN_PARAMS)
    mixed = {}
    for name in names:
        values = sorted({r.params.get(name, "<unset>") for r in members})
        if len(values) > 1:
            mixed[name] = values
    return mixed


def label(group: tuple[str, ...]) -> str:
    engine, prior, value, env_id = group
    return f"{engine} · {prior} · {value} ({env_id})"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


def format_table(rows: Sequence[GroupSummary], metric: str) -> str:
    """The comparison as an aligned text table, one row per group."""
    head = f"engine|prior|value|env|seeds|final {metric}|env steps|wall-clock|steps/s".split("|")
    body = [
        [
            *r.group,
            f"{len(r.seeds)} [{', '.join(r.seeds)}]",
            f"{r.final_mean:.2f} ± {r.final_std:.2f}",
            str(r.env_steps),
            _duration(r.wall_clock_s),
            f"{r.steps_per_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def log_comparison(client, experiment_id, metric, files, table, rows, at_step=None) -> str:
    """Log ``files``, the table and the summary as artifacts of a new ``compare`` run."""
    run = client.create_run(experiment_id, run_name="compare", tags={COMPARE_TAG: "true"})
    rid = run.info.run_id
    try:
        client.log_param(rid, "metric", metric)
        client.log_param(rid, "at_step", at_step)
        client.log_param(rid, "compared_runs", sum(len(r.run_ids) for r in rows))
        for path in files:
            client.log_artifact(rid, str(path))
        client.log_text(rid, table + "\n", "compare.txt")
        client.log_text(rid, json.dumps([asdict(r) for r in rows], indent=2), "summary.json")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def compare(
    experiment: str,
    tracking_uri: str | None = None,
    output: str = ".",
    metric: str = "eval/return",
    at_step: int | None = None,
) -> list[GroupSummary]:
    """Print the table, write the figures and log them; returns the table's rows."""
    from mbvi.tracking.logger import resolve_tracking_uri

    client = open_store(resolve_tracking_uri(tracking_uri))
    experiment_id, runs = load_runs(client, experiment, metric)
    if at_step is not None:
        runs = truncate(runs, at_step)
    rows = summarize(runs)
    table = format_table(rows, metric)
    print(table)
    groups = group_runs(runs)
    for row in rows:
        if mixed := mixed_settings(groups[row.group]):
            differences = "; ".join(f"{k}: {', '.join(v)}" for k, v in mixed.items())
            print(
                f"mbvi compare: {label(row.group)}: its runs differ in {differences}; the "
                "row averages over them (compare such runs in separate experiments)",
                file=sys.stderr,
            )
        if dup := duplicate_seeds(row):
            print(
                f"mbvi compare: {label(row.group)}: seed(s) {', '.join(dup)} appear in more "
                "than one run; each run counts as one sample",
                file=sys.stderr,
            )
    from mbvi.tracking.figures import plot_curves, plot_improvement  # matplotlib only when plotting

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    name = "returns" if metric == "eval/return" else metric.replace("/", "_")
    files = [plot_curves(runs, metric, experiment, out / f"{experiment}_{name}.png")]
    if any(r.j_iter for r in runs):
        files.append(
            plot_improvement(runs, experiment, out / f"{experiment}_inference_improvement.png")
        )
    rid = log_comparison(client, experiment_id, metric, files, table, rows, at_step)
    for path in files:
        print(f"wrote {path}")
    print(f"logged the comparison as MLflow run {rid} ('compare') in experiment {experiment!r}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``mbvi compare ...``; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="mbvi compare",
        description="Table and learning curves (paper Fig. 3b, Fig. 2) of an MLflow experiment.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment to compare")
    parser.add_argument(
        "--tracking_uri",
        default=None,
        help="MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    parser.add_argument("--output", default=".", help="folder for the PNG figures")
    parser.add_argument("--metric", default="eval/return", help="metric to compare")
    parser.add_argument(
        "--at-step",
        type=int,
        default=None,
        help="compare at this env step: curves are cut after it (runs of different budgets)",
    )
    args = parser.parse_args(argv)
    try:
        compare(args.experiment, args.tracking_uri, args.output, args.metric, args.at_step)
    except MbviError as err:
        print(f"mbvi: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
