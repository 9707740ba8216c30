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
(``mbvi.figures``) written to ``--output``: ``<experiment>_returns.png`` (Fig. 3b; for
another ``--metric``, ``<experiment>_<metric with / as _>.png``) and,
when a run logged ``engine/j_iter_k``, ``<experiment>_inference_improvement.png`` (Fig. 2).

``--at-step N`` compares the runs at equal env steps: every curve (the metric's and
J̃_k's) is cut after step N, so "final" means the last value at or before N.  That is
how runs with different budgets are compared (e.g. direct SAC trained for 100k steps
against iterative SAC trained for 50k).  Wall-clock and steps/s stay whole-run figures.

Figures, table (``compare.txt``) and ``summary.json`` are logged as artifacts of a new
run named ``compare`` in the same experiment, tagged ``mbvi.compare`` (later compares
skip it): the comparison belongs to the set of runs, so the compared runs stay untouched.
Aggregation is pure functions of plain data (``RunData``), testable without MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from mbvi.errors import ComparisonError, MbviError, TrackingError

Curve = dict[int, float]
"""A metric's history: env step -> value."""
GROUP_PARAMS = ("engine", "prior", "value", "env_id")
COMPARE_TAG = "mbvi.compare"
SPEED = "perf/env_steps_per_s"
J_ITER = "engine/j_iter_"


@dataclass
class RunData:
    """What ``mbvi compare`` reads from one run."""

    run_id: str
    name: str
    group: tuple[str, ...]  # values of GROUP_PARAMS
    seed: str
    curve: Curve  # the compared metric
    duration_s: float
    env_steps: int = 0  # the last env step the run logged anything at
    j_iter: dict[int, Curve] = field(default_factory=dict)  # k -> J̃_k history
    params: dict[str, str] = field(default_factory=dict)  # every logged parameter


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


def join_resumed(chain: Sequence[RunData]) -> RunData:
    """One sample of a seed trained in several runs, each resumed from a checkpoint of
    the one before (``chain``, oldest first): a later run's points replace the earlier
    runs' from its first logged step on, and the wall-clock times add up."""

    def join(curves: Sequence[Curve]) -> Curve:
        joined: Curve = {}
        for curve in curves:
            start = min(curve, default=None)
            joined = {k: v for k, v in joined.items() if start is None or k < start} | curve
        return joined

    last = chain[-1]
    ks = sorted(set().union(*(r.j_iter for r in chain)))
    return replace(
        last,
        curve=join([r.curve for r in chain]),
        duration_s=sum(r.duration_s for r in chain),
        j_iter={k: join([r.j_iter.get(k, {}) for r in chain]) for k in ks},
    )


def resume_chains(
    runs: Sequence[tuple[str, str, str | None, int]],
) -> tuple[list[list[str]], list[str]]:
    """Which runs make one sample of a seed: ``runs`` are (run id, status, id of the run
    it resumed from or None, start time).  Every FINISHED run that no FINISHED run
    resumed ends a chain that walks back through the runs it resumed, whatever their
    status; a run resumed more than once belongs to the latest-started chain only.
    Returns the chains (run ids, oldest first) and the ids of the runs in none."""
    info = {rid: (status, parent, start) for rid, status, parent, start in runs}
    resumed_by_finished = {p for st, p, _ in info.values() if st == "FINISHED" and p in info}
    ends = [rid for rid, (st, _, _) in info.items()
            if st == "FINISHED" and rid not in resumed_by_finished]  # fmt: skip
    claimed: set[str] = set()
    chains = []
    for end in sorted(ends, key=lambda rid: info[rid][2], reverse=True):
        chain, parent = [end], info[end][1]
        claimed.add(end)
        while parent in info and parent not in claimed:
            chain.insert(0, parent)
            claimed.add(parent)
            parent = info[parent][1]
        chains.append(chain)
    return chains, [rid for rid in info if rid not in claimed]


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


def iteration_keys(metric_names) -> list[int]:
    """The k of every ``engine/j_iter_k`` metric; none unless J̃_0 is among them."""
    ks = sorted(int(m[len(J_ITER) :]) for m in metric_names
                if m.startswith(J_ITER) and m[len(J_ITER) :].isdigit())  # fmt: skip
    return ks if 0 in ks else []


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


# ---- MLflow -----------------------------------------------------------------------------
def open_store(uri: str):
    """An ``MlflowClient`` on ``uri``; never creates an SQLite store that is not there."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        raise TrackingError(
            f"no MLflow store at {uri!r}: run `mbvi fit` in this folder first, or point "
            "--tracking_uri (or MLFLOW_TRACKING_URI) at the store that holds the runs."
        )
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(uri)


def _points(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _history(client, run_id: str, key: str) -> Curve:
    # A step logged twice keeps its last value.
    return {m.step: m.value for m in _points(client, run_id, key)}


def load_runs(client, experiment: str, metric: str) -> tuple[str, list[RunData]]:
    """(experiment id, the experiment's finished runs); ``ComparisonError`` when the
    experiment is missing or a run lacks a parameter or ``metric``."""
    try:
        exp = client.get_experiment_by_name(experiment)
        names = sorted(e.name for e in client.search_experiments())
    except Exception as err:  # any failure to open the store is the user's to fix
        raise TrackingError(f"cannot read the MLflow store: {type(err).__name__}: {err}") from None
    if exp is None:
        raise ComparisonError(
            f"experiment {experiment!r} not found; existing experiments: "
            f"{', '.join(map(repr, names)) or 'none'}. Pass one with --experiment."
        )
    from mbvi.tracking import RESUMED_FROM_TAG

    found = client.search_runs([exp.experiment_id], max_results=50_000)
    by_id = {r.info.run_id: r for r in found if COMPARE_TAG not in r.data.tags}
    ids, skipped_ids = resume_chains(
        [(rid, r.info.status, r.data.tags.get(RESUMED_FROM_TAG), r.info.start_time)
         for rid, r in by_id.items()]
    )  # fmt: skip
    chains = [[by_id[rid] for rid in c] for c in ids]  # each ends with a finished run
    skipped = [f"{by_id[rid].info.run_name} ({by_id[rid].info.status})" for rid in skipped_ids]

    if skipped:
        print(f"mbvi compare: skipping unfinished runs: {', '.join(skipped)}", file=sys.stderr)
    if not chains:
        raise ComparisonError(f"experiment {experiment!r} has no finished runs to compare.")
    problems = []
    for chain in chains:
        r = chain[-1]
        missing = [p for p in (*GROUP_PARAMS, "seed") if p not in r.data.params]
        missing += [m for m in [metric] if all(m not in c.data.metrics for c in chain)]
        if missing:
            problems.append(f"{r.info.run_name} ({r.info.run_id}) lacks {', '.join(missing)}")
    if problems:
        raise ComparisonError(
            f"cannot compare experiment {experiment!r}: {'; '.join(problems)}. Delete these "
            "runs, or pick another --metric or --experiment."
        )
    return exp.experiment_id, [
        join_resumed([_run_data(client, c, metric) for c in chain]) for chain in chains
    ]


def _run_data(client, run, metric: str) -> RunData:
    rid = run.info.run_id
    ks = iteration_keys(run.data.metrics)
    points = _points(client, rid, metric) + _points(client, rid, SPEED)
    curve = {m.step: m.value for m in points if m.key == metric}
    # A run killed hard (SIGKILL, out of memory) never got an end time: it ran until
    # its last logged point.
    end = run.info.end_time or max((m.timestamp for m in points), default=run.info.start_time)
    return RunData(
        run_id=rid,
        name=run.info.run_name,
        group=tuple(run.data.params[p] for p in GROUP_PARAMS),
        seed=run.data.params["seed"],
        curve=curve,
        duration_s=(end - run.info.start_time) / 1e3,
        env_steps=max((m.step for m in points), default=0),
        j_iter={k: _history(client, rid, f"{J_ITER}{k}") for k in ks},
        params=dict(run.data.params),
    )


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
    from mbvi.tracking import resolve_tracking_uri

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
    from mbvi.figures import plot_curves, plot_improvement  # matplotlib only when plotting

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
