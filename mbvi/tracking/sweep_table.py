"""``mbvi sweep``'s view of its trials, read back from the tracking server: which trials
already FINISHED, and the live table of each trial's state, env step and last returns."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

from mbvi.tracking.runs import SPEED
from mbvi.tracking.sweep import TRIAL_TAG

EPISODE_RETURN = "train/episode_return"
EVAL_RETURN = "eval/return"
_MARGIN_MS = 60_000  # runs started this long before the sweep are not the sweep's (clock skew)


@dataclass
class Row:
    name: str
    state: str
    env_step: int | None = None
    episode_return: float | None = None
    eval_return: float | None = None


def finished_keys(client, experiment: str) -> dict[str, str]:
    """{trial key: run id} of the experiment's FINISHED runs that a sweep tagged."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=50_000)  # fmt: skip
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def follow(ray, client, experiment, names, done, refs, refresh_s) -> list[str]:
    """Wait for the trial tasks ``refs`` ({key: Ray ref}), printing the table of every
    trial in ``names`` ({key: name}; ``done``: {key: run id} of those skipped) every
    ``refresh_s`` and once at the end; returns the names of the trials that failed.
    A trial whose process died without ending its run (killed, out of memory) has that
    run marked FAILED.  Ctrl-C cancels the trials (each ends KILLED; a further Ctrl-C
    is ignored while they end, and a run that has not ended within 40 s is marked
    KILLED here) and re-raises."""
    since_ms = int(time.time() * 1e3) - _MARGIN_MS
    pending = dict(refs)
    exits: dict[str, tuple[int, str]] = {}
    steps: dict[str, tuple[str, int]] = {}  # run id -> (status, last env step) seen
    printed = 0.0
    try:
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=0.5)
            for key in [k for k, ref in pending.items() if ref in ready]:
                exits[key] = _outcome(ray, pending.pop(key))
                code, tail = exits[key]
                if code:
                    last = tail.splitlines()[-1] if tail else ""
                    print(f"mbvi sweep: {names[key]} FAILED (exit {code}): {last}", flush=True)
                    _end_unfinished(client, experiment, [key], since_ms, "FAILED")
            if time.monotonic() - printed >= refresh_s and pending:
                _print(client, experiment, names, done, exits, steps, since_ms)
                printed = time.monotonic()
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the trials end
        try:
            for ref in pending.values():
                ray.cancel(ref)  # the task interrupts its trial: the run ends KILLED
            ray.wait(list(pending.values()), num_returns=len(pending), timeout=40)
            _end_unfinished(client, experiment, list(pending), since_ms, "KILLED")
        finally:
            signal.signal(signal.SIGINT, previous)
        raise
    _print(client, experiment, names, done, exits, steps, since_ms)
    for key, (code, tail) in exits.items():
        if code:
            print(f"\nmbvi sweep: {names[key]} failed with exit {code}; its output ends:\n{tail}")
    return [names[k] for k, (code, _) in exits.items() if code]


def _end_unfinished(client, experiment, keys, since_ms, status: str) -> None:
    """Mark this sweep's runs of the trials ``keys`` that are still RUNNING as
    ``status``: their process is gone, so nothing else will end them."""
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        )
        for run in runs:
            if run.data.tags.get(TRIAL_TAG) in keys and run.info.start_time >= since_ms:
                client.set_terminated(run.info.run_id, status)
    except Exception as err:  # the server is going away: say so, do not mask the stop
        print(f"mbvi sweep: could not mark unfinished runs {status} ({err})", file=sys.stderr)


def _outcome(ray, ref) -> tuple[int, str]:
    try:
        return ray.get(ref)
    except Exception as err:  # the worker died or the task was cancelled
        return -1, f"{type(err).__name__}: {str(err).strip().splitlines()[-1:] or ''}"


def rows(client, experiment, names, done, exits, steps, since_ms) -> list[Row]:
    """One ``Row`` per trial, from the experiment's runs tagged with the trials' keys."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50_000) if exp else []
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        key = run.data.tags.get(TRIAL_TAG)
        if key in names and (run.info.run_id == done.get(key) or run.info.start_time >= since_ms):
            latest[key] = run
    out = []
    for key, name in names.items():
        run = latest.get(key)
        if run is None:
            code = exits.get(key, (0, ""))[0]
            out.append(Row(name, f"FAILED (exit {code})" if code else "waiting"))
            continue
        rid, status = run.info.run_id, run.info.status
        if steps.get(rid, ("RUNNING", 0))[0] == "RUNNING":  # read once more after it ended
            history = client.get_metric_history(rid, SPEED)
            history += client.get_metric_history(rid, EPISODE_RETURN)
            steps[rid] = (status, max((m.step for m in history), default=0))
        state = f"{status} (before)" if key in done else status
        metrics = run.data.metrics
        out.append(Row(name, state, steps[rid][1], metrics.get(EPISODE_RETURN),
                       metrics.get(EVAL_RETURN)))  # fmt: skip
    return out


def format_rows(table: list[Row]) -> str:
    """The rows as an aligned text table."""

    def number(x: float | None) -> str:
        return "" if x is None else f"{x:.1f}"

    head = ["trial", "state", "env step", "last return", "last eval/return"]
    body = [[r.name, r.state, "" if r.env_step is None else str(r.env_step),
             number(r.episode_return), number(r.eval_return)] for r in table]  # fmt: skip
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _print(client, experiment, names, done, exits, steps, since_ms) -> None:
    try:
        table = rows(client, experiment, names, done, exits, steps, since_ms)
    except Exception as err:  # a slow or restarting server: try again at the next refresh
        print(f"mbvi sweep: cannot read the trials' runs now ({err})", file=sys.stderr)
        return
    counts: dict[str, int] = {}
    for row in table:
        counts[row.state.split(" ")[0]] = counts.get(row.state.split(" ")[0], 0) + 1
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    print(f"\nmbvi sweep {time.strftime('%H:%M:%S')}: {summary}\n{format_rows(table)}", flush=True)
