"""``mbvi compare``: a table and learning curves of one MLflow experiment's runs, with
intervals that say whether a difference between rows is real.

    mbvi compare --experiment NAME [--tracking_uri URI] [--output DIR] [--metric eval/return]
                 [--at-step N] [--baseline ROW] [--reps N]

Reads the experiment's FINISHED runs and groups them by (engine, prior, value, env_id);
a run resumed from a checkpoint (tag ``mbvi.resumed_from``) is joined with the runs it
continues, finished or not, into one sample (one curve, their wall-clocks added); a
FAILED, KILLED or RUNNING run that no finished run continues is skipped and named.
A warning names any other setting that differs within a group (seed, budget and
bookkeeping aside), and a group whose runs end at different env steps (``--at-step``
compares them at equal steps).
A table row per group: the seeds; the final metric (each run's value at its last logged
step), mean ± std over seeds (population std, 0 for one seed); its interquartile mean
(IQM) with a 95% stratified-bootstrap confidence interval (``mbvi.tracking.stats``, by
rliable); with ``--baseline ROW``, the probability that a seed of the row beats a seed of
the baseline row of its env, with its interval; the env steps reached (the group's
smallest last step); the wall-clock (mean run duration); steps/s (mean over seeds of each
run's env steps reached divided by its duration: warm-up, evaluation and start-up
included, what a researcher waits for).  Under the table, the settings other than
engine, prior and value in which rows of one env differ: a difference between such rows
is not the design choice's alone.  Figures (``mbvi.tracking.figures``) written to
``--output``: ``<experiment>_returns.png`` (Fig. 3b with IQM curves and their bands, and
the final IQM of each row with its interval; for another ``--metric``,
``<experiment>_<metric with / as _>.png``) and, when a run logged ``engine/j_iter_k``,
``<experiment>_inference_improvement.png`` (Fig. 2).

``--at-step N`` compares the runs at equal env steps: every curve (the metric's and
J̃_k's) is cut after step N, so "final" means the last value at or before N.  That is
how runs with different budgets are compared (e.g. direct SAC trained for 100k steps
against iterative SAC trained for 50k).  Wall-clock and steps/s stay whole-run figures.

Figures, the table (``compare.txt``, and as markdown ``<experiment>_compare.md``, also
written to ``--output``) and ``summary.json`` are logged as artifacts of a new run named
``compare`` in the same experiment, tagged ``mbvi.tracking.compare`` (later compares skip
it): the comparison belongs to the set of runs, so the compared runs stay untouched.
Runs are read, joined and grouped by ``mbvi.tracking.runs``; the aggregation here is pure
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
from mbvi.tracking import stats
from mbvi.tracking.runs import (
    COMPARE_TAG,
    Curve,
    Group,
    RunData,
    group_runs,
    label,
    load_runs,
    mixed_settings,
    open_store,
    settings_between_rows,
)
from mbvi.tracking.stats import Interval


@dataclass
class GroupSummary:
    """One row of the table."""

    group: Group
    seeds: list[str]
    run_ids: list[str]
    final_mean: float
    final_std: float
    env_steps: int
    wall_clock_s: float
    steps_per_s: float
    iqm: Interval | None = None  # of the final values over seeds, with its 95% CI
    improvement: Interval | None = None  # P(a seed of this row > a seed of the baseline)
    baseline: Group | None = None  # the row ``improvement`` is against


# ---- pure aggregation ------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) of ``values``."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std())


def final_value(curve: Curve) -> float:
    """The value at the last logged step."""
    return curve[max(curve)]


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


def summarize(runs: Sequence[RunData]) -> list[GroupSummary]:
    """One ``GroupSummary`` per (engine, prior, value, env_id), sorted by group, without
    the bootstrap statistics (``add_intervals`` adds them)."""
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


def find_baselines(groups: Sequence[Group], spec: str) -> dict[str, Group]:
    """The baseline row of each env that has one: the row whose engine, prior, value or
    env equal every comma-separated part of ``spec`` (``Direct``,
    ``Direct,UniformPrior``).  ``ComparisonError`` when no row matches, or several rows
    of one env do."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    found: dict[str, list[Group]] = {}
    for group in groups:
        if parts and all(p in group for p in parts):
            found.setdefault(group[-1], []).append(group)
    rows = "; ".join(",".join(g) for g in groups)
    if not found:
        raise ComparisonError(
            f"--baseline {spec!r} matches no row. Rows (engine,prior,value,env): {rows}. "
            "Pass the baseline row's engine, or as many of its parts as single it out."
        )
    for env, matches in found.items():
        if len(matches) > 1:
            raise ComparisonError(
                f"--baseline {spec!r} matches {len(matches)} rows of {env}: "
                f"{'; '.join(','.join(g) for g in matches)}. Add the parts that single one "
                f"out, e.g. --baseline {','.join(matches[0][:3])}."
            )
    return {env: matches[0] for env, matches in found.items()}


def add_intervals(
    rows: Sequence[GroupSummary],
    groups: dict[Group, list[RunData]],
    baselines: dict[str, Group] | None = None,
    reps: int | None = None,
    seed: int = 0,
) -> list[GroupSummary]:
    """``rows`` with the IQM of each row's final values and its 95% interval and, for a
    row whose env has a baseline in ``baselines`` (env -> row), the probability of
    improvement over it.  ``reps`` resamples (None: ``stats``' defaults), bootstrap
    ``seed`` fixed so that a comparison repeats exactly."""
    finals = {g: [final_value(r.curve) for r in members] for g, members in groups.items()}
    iqm_reps, poi_reps = (reps, reps) if reps else (stats.IQM_REPS, stats.POI_REPS)
    out = []
    for row in rows:
        base = (baselines or {}).get(row.group[-1])
        versus = None
        if base is not None and base != row.group:
            versus = stats.probability_of_improvement(
                finals[row.group], finals[base], poi_reps, seed
            )
        iqm = stats.iqm(finals[row.group], iqm_reps, seed)
        out.append(replace(row, iqm=iqm, improvement=versus, baseline=base))
    return out


def duplicate_seeds(summary: GroupSummary) -> list[str]:
    return sorted({s for s in summary.seeds if summary.seeds.count(s) > 1})


def format_settings(differ: dict[str, dict[Group, str]]) -> str:
    """The note under the table that names the settings rows differ in; '' if none."""
    if not differ:
        return ""
    lines = ["Rows differ in settings other than engine, prior and value, so a difference "
             "between them is not the design choice's alone:"]  # fmt: skip
    for name, values in differ.items():
        lines.append(f"  {name}: " + "; ".join(f"{label(g)} = {v}" for g, v in values.items()))
    return "\n".join(lines)


# ---- the text ----------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


def _versus(row: GroupSummary) -> str:
    if row.baseline is None:
        return "—"  # no baseline row for this env
    return "baseline" if row.baseline == row.group else str(row.improvement)


def format_table(rows: Sequence[GroupSummary], metric: str, markdown: bool = False) -> str:
    """The comparison, one row per group: an aligned text table, or a markdown one.
    The IQM column appears once ``add_intervals`` has filled it, the probability of
    improvement once a row has a baseline."""
    with_iqm = any(r.iqm is not None for r in rows)
    with_poi = any(r.baseline is not None for r in rows)
    head = ["engine", "prior", "value", "env", "seeds", f"final {metric} (mean ± std)"]
    head += ["IQM [95% CI]"] * with_iqm + ["P(> baseline) [95% CI]"] * with_poi
    head += ["env steps", "wall-clock", "steps/s"]
    body = [
        [
            *r.group,
            f"{len(r.seeds)} [{', '.join(r.seeds)}]",
            f"{r.final_mean:.2f} ± {r.final_std:.2f}",
            *[str(r.iqm) if r.iqm else "—"] * with_iqm,
            *[_versus(r)] * with_poi,
            str(r.env_steps),
            _duration(r.wall_clock_s),
            f"{r.steps_per_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
                 for row in [head, *body]]  # fmt: skip
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([lines[0], rule, *lines[1:]])
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def legend(rows: Sequence[GroupSummary], reps: int | None) -> str:
    """What the statistics columns mean, for the lines under the table."""
    lines = []
    if any(r.iqm is not None for r in rows):
        lines.append(
            "IQM: interquartile mean of the final values over seeds; 95% CI by stratified "
            f"bootstrap over seeds ({reps or stats.IQM_REPS} resamples, rliable)."
        )
    if bases := sorted({r.baseline for r in rows if r.baseline is not None}):
        lines.append(
            "P(> baseline): probability that a seed of the row ends above a seed of "
            f"{'; '.join(map(label, bases))} (0.5: no difference; an interval that holds "
            f"0.5 means the difference may not be real; {reps or stats.POI_REPS} resamples)."
        )
    return "\n".join(lines)


def log_comparison(client, experiment_id, metric, files, text, rows, at_step=None) -> str:
    """Log ``files`` (figures, the markdown table), the table ``text`` and the summary as
    artifacts of a new ``compare`` run."""
    run = client.create_run(experiment_id, run_name="compare", tags={COMPARE_TAG: "true"})
    rid = run.info.run_id
    try:
        client.log_param(rid, "metric", metric)
        client.log_param(rid, "at_step", at_step)
        client.log_param(rid, "compared_runs", sum(len(r.run_ids) for r in rows))
        for path in files:
            client.log_artifact(rid, str(path))
        client.log_text(rid, text + "\n", "compare.txt")
        client.log_text(rid, json.dumps([asdict(r) for r in rows], indent=2), "summary.json")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def row_warnings(rows: Sequence[GroupSummary], groups: dict[Group, list[RunData]]) -> list[str]:
    """What a row's own runs do not share: other settings, the env step their curves end
    at (each run's final value is read at its own last step), a seed twice."""
    out = []
    for row in rows:
        members, name = groups[row.group], label(row.group)
        if mixed := mixed_settings(members):
            differences = "; ".join(f"{k}: {', '.join(v)}" for k, v in mixed.items())
            out.append(
                f"{name}: its runs differ in {differences}; the row averages over them "
                "(compare such runs in separate experiments)"
            )
        ends = sorted({max(r.curve) for r in members})
        if len(ends) > 1:
            out.append(
                f"{name}: its runs end at different env steps ({', '.join(map(str, ends))}); "
                "each run's final value is read at its own last step and the row shows the "
                f"smallest; pass --at-step {ends[0]} to compare them at equal steps"
            )
        if dup := duplicate_seeds(row):
            out.append(
                f"{name}: seed(s) {', '.join(dup)} appear in more than one run; each run "
                "counts as one sample"
            )
    return out


def compare(
    experiment: str,
    tracking_uri: str | None = None,
    output: str = ".",
    metric: str = "eval/return",
    at_step: int | None = None,
    baseline: str | None = None,
    reps: int | None = None,
) -> list[GroupSummary]:
    """Print the table, write the figures and log them; returns the table's rows.
    ``reps``: bootstrap resamples, None for ``mbvi.tracking.stats``' defaults."""
    from mbvi.tracking.uri import resolve_tracking_uri

    client = open_store(resolve_tracking_uri(tracking_uri))
    experiment_id, runs = load_runs(client, experiment, metric)
    if at_step is not None:
        runs = truncate(runs, at_step)
    groups = group_runs(runs)
    baselines = find_baselines(list(groups), baseline) if baseline is not None else None
    rows = add_intervals(summarize(runs), groups, baselines, reps)
    notes = "\n".join(filter(None, [legend(rows, reps),
                                    format_settings(settings_between_rows(groups))]))  # fmt: skip
    table = "\n\n".join(filter(None, [format_table(rows, metric), notes]))
    print(table)
    for warning in row_warnings(rows, groups):
        print(f"mbvi compare: {warning}", file=sys.stderr)
    from mbvi.tracking import figures  # matplotlib only when plotting

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    name = "returns" if metric == "eval/return" else metric.replace("/", "_")
    finals = {label(r.group): r.iqm for r in rows}
    files = [
        figures.plot_curves(runs, metric, experiment, out / f"{experiment}_{name}.png",
                            finals, reps or stats.CURVE_REPS)
    ]  # fmt: skip
    if any(r.j_iter for r in runs):
        path = out / f"{experiment}_inference_improvement.png"
        files.append(figures.plot_improvement(runs, experiment, path))
    md = out / f"{experiment}_compare.md"
    md.write_text("\n\n".join(filter(None, [format_table(rows, metric, markdown=True), notes])))
    rid = log_comparison(client, experiment_id, metric, [*files, md], table, rows, at_step)
    for path in [*files, md]:
        print(f"wrote {path}")
    print(f"logged the comparison as MLflow run {rid} ('compare') in experiment {experiment!r}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``mbvi compare ...``; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="mbvi compare",
        description="Table and learning curves (paper Fig. 3b, Fig. 2) of an MLflow "
        "experiment, with interquartile means and 95% bootstrap confidence intervals.",
    )
    add = parser.add_argument
    add("--experiment", required=True, help="MLflow experiment to compare")
    add("--tracking_uri", default=None,
        help="MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")  # fmt: skip
    add("--output", default=".", help="folder for the PNG figures and the markdown table")
    add("--metric", default="eval/return", help="metric to compare")
    add("--at-step", type=int, default=None,
        help="compare at this env step: curves are cut after it (runs of different "
        "budgets)")  # fmt: skip
    add("--baseline", default=None, metavar="ROW",
        help="report each row's probability of improvement over this row: its engine, or "
        "comma-separated parts of it that single it out (e.g. Direct,UniformPrior)")  # fmt: skip
    add("--reps", type=int, default=None,
        help=f"bootstrap resamples (default {stats.IQM_REPS} for the IQM, "
        f"{stats.POI_REPS} for P(> baseline) and the curves' bands)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    try:
        compare(args.experiment, args.tracking_uri, args.output, args.metric, args.at_step,
                args.baseline, args.reps)  # fmt: skip
    except MbviError as err:
        print(f"mbvi: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
