"""Runs read back from an MLflow store, for ``mbvi compare`` and ``mbvi table``: one
``RunData`` per seed, a resumed run joined with the runs it continues (tag
``mbvi.resumed_from``), and the runs grouped into rows by design choice.

``resume_chains``, ``join_resumed``, the grouping (``group_runs``, ``label``, ``align``)
and the settings of rows (``mixed_settings``, ``settings_between_rows``) are pure
functions of plain data; ``load_runs`` and ``open_store`` are the only parts that talk to
MLflow.  The comparison (``mbvi.tracking.compare``) and its figures
(``mbvi.tracking.figures``) both build on this module and never on each other's
grouping, so neither imports the other for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from mbvi.errors import ComparisonError, TrackingError
from mbvi.tracking.uri import RESUMED_FROM_TAG

Curve = dict[int, float]
"""A metric's history: env step -> value."""
Group = tuple[str, ...]
"""A row: the values of GROUP_PARAMS."""
UNSET = "<unset>"
GROUP_PARAMS = ("engine", "prior", "value", "env_id")
COMPARE_TAG = "mbvi.tracking.compare"
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


def _group(params: dict[str, str]) -> tuple[str, ...]:
    """The run's GROUP_PARAMS; a model-based value is named with its horizon
    (``ModelBasedValue(H=5)``), so that horizons never share a row."""
    group = [params[p] for p in GROUP_PARAMS]
    if "value.horizon" in params:
        group[GROUP_PARAMS.index("value")] += f"(H={params['value.horizon']})"
    return tuple(group)


def group_runs(runs: Sequence[RunData]) -> dict[tuple[str, ...], list[RunData]]:
    """The runs by ``group`` (one table row or figure line each), groups sorted, the
    runs of a group by seed and run id."""
    groups: dict[tuple[str, ...], list[RunData]] = {}
    for run in sorted(runs, key=lambda r: (r.group, r.seed, r.run_id)):
        groups.setdefault(run.group, []).append(run)
    return groups


def label(group: tuple[str, ...]) -> str:
    """A row's name for people: ``engine · prior · value (env_id)``."""
    engine, prior, value, env_id = group
    return f"{engine} · {prior} · {value} ({env_id})"


def align(curves: Sequence[Curve]) -> tuple[list[int], np.ndarray]:
    """The steps common to all ``curves`` and their values ``[runs, steps]``."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves], dtype=float)


# Parameters that may differ between the seeds of one row: the seed, the budget (runs
# of different lengths are compared with --at-step) and bookkeeping.
PER_RUN_PARAMS = frozenset(
    {"seed", "total_env_steps", "checkpoint_every", "checkpoint_dir", "progress_refresh_s",
     "log_every", "ckpt_path"}
)  # fmt: skip
# Parameters a row's name already shows (the model-based horizon is part of its value).
ROW_PARAMS = frozenset({*GROUP_PARAMS, "value.horizon"})
CHOICES = ("engine", "prior", "value")


def mixed_settings(members: Sequence[RunData]) -> dict[str, list[str]]:
    """Parameters other than ``PER_RUN_PARAMS`` whose values differ between the runs of
    one row, with their distinct values: the row averages over different settings."""
    names = sorted(set().union(*(r.params for r in members)) - PER_RUN_PARAMS)
    mixed = {}
    for name in names:
        values = sorted({r.params.get(name, UNSET) for r in members})
        if len(values) > 1:
            mixed[name] = values
    return mixed


def row_settings(members: Sequence[RunData]) -> dict[str, str]:
    """The parameters of a row's runs (``PER_RUN_PARAMS`` aside), each with its value, or
    its distinct values comma-separated where the runs differ (``mixed_settings``)."""
    names = set().union(*(r.params for r in members)) - PER_RUN_PARAMS
    return {n: ", ".join(sorted({r.params.get(n, UNSET) for r in members})) for n in names}


def settings_between_rows(groups: dict[Group, list[RunData]]) -> dict[str, dict[Group, str]]:
    """Parameters other than engine, prior and value (and the env) whose values differ
    between rows of one env: name -> {row: value} for the rows that differ.

    An engine's, prior's or value's own settings (``engine.hidden``, ``value.leaf.tau``)
    come with it, so they count only between rows that use the same one: Direct's
    network against Iterative's is part of the engine choice, Iterative's against
    Iterative's is not."""
    settings = {g: row_settings(members) for g, members in groups.items()}
    out: dict[str, dict[Group, str]] = {}
    for env in sorted({g[-1] for g in groups}):
        rows = [g for g in groups if g[-1] == env]
        names = sorted(set().union(*(settings[g] for g in rows)) - ROW_PARAMS)
        for name in names:
            owner = name.split(".")[0] if "." in name else None
            buckets: dict[str | None, list[Group]] = {}
            for g in rows:
                key = settings[g].get(owner) if owner in CHOICES else None
                buckets.setdefault(key, []).append(g)
            for members in buckets.values():
                values = {g: settings[g].get(name, UNSET) for g in members}
                if len(set(values.values())) > 1:
                    out.setdefault(name, {}).update(values)
    return out


def iteration_keys(metric_names) -> list[int]:
    """The k of every ``engine/j_iter_k`` metric; none unless J̃_0 is among them."""
    ks = sorted(int(m[len(J_ITER) :]) for m in metric_names
                if m.startswith(J_ITER) and m[len(J_ITER) :].isdigit())  # fmt: skip
    return ks if 0 in ks else []


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
    if not any(metric in r.data.metrics for chain in chains for r in chain):
        logged = sorted({k for chain in chains for r in chain for k in r.data.metrics})
        raise ComparisonError(
            f"no finished run of experiment {experiment!r} logged the metric {metric!r}; "
            f"the metrics they logged: {', '.join(logged) or 'none'}. Pass one of them "
            "with --metric (the default is eval/return)."
        )
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
        group=_group(run.data.params),
        seed=run.data.params["seed"],
        curve=curve,
        duration_s=(end - run.info.start_time) / 1e3,
        env_steps=max((m.step for m in points), default=0),
        j_iter={k: _history(client, rid, f"{J_ITER}{k}") for k in ks},
        params=dict(run.data.params),
    )
