"""``mbvi sweep``: every (config, grid override, seed) trial as one ``mbvi fit``, on Ray.

    mbvi sweep --config A.yaml [--config B.yaml] --seeds 0-4 [--grid model.value_lr=3e-4,1e-3]
               [--threads_per_trial 1] [--num_cpus N] [--address auto|HOST:PORT]
               [--tracking_uri http://...] [--experiment NAME] [--refresh_s 10]
               [--log_dir DIR] [--output DIR]

Each trial is a Ray task that runs ``mbvi fit`` as a subprocess with ``OMP_NUM_THREADS``
set to ``--threads_per_trial`` and asks Ray for as many CPUs, so trials never
oversubscribe the cores.  Without ``--address`` Ray runs on this machine's cores; with
it, the same sweep runs on a Ray cluster.

Before any trial starts: every trial's command is parsed by ``mbvi fit`` itself (an
unknown option is the CLI's error naming it), the Ray address must answer, and the
tracking server must answer.  Trials log to an MLflow server: ``--tracking_uri``, else
one the sweep starts over the working directory's ``sqlite:///mlflow.db`` and stops at
the end.  A trial is identified by its resolved config (seed included; experiment, run
name and tracking URI aside), logged as the run tag ``mbvi.sweep.trial``: running the
sweep again skips the trials that already have a FINISHED run in the experiment.

While trials run, a table of each trial's state, env step and last returns is printed
every ``--refresh_s``; the sweep ends with ``mbvi compare``'s table of the experiment.
Exit status: 0 when every trial finished, 1 when one failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mbvi.errors import ConfigError, MbviError
from mbvi.tracking.uri import TAGS_ENV

TRIAL_TAG = "mbvi.sweep.trial"
NAME_TAG = "mbvi.sweep.name"
_LOGGER_KEYS = ("experiment_name", "run_name", "tracking_uri")  # not part of a trial's identity


@dataclass(frozen=True)
class Trial:
    """One ``mbvi fit``: a config, the grid's overrides and a seed."""

    config: str
    overrides: tuple[str, ...]
    seed: int
    label: str = ""
    """What the name calls the config: its file name without suffix, or more of its path
    where two configs share one (``make_trials``)."""

    @property
    def name(self) -> str:
        pairs = (o.lstrip("-").partition("=") for o in self.overrides)
        grid = ",".join(f"{key.split('.')[-1]}={value}" for key, _, value in pairs)
        label = self.label or Path(self.config).stem
        return f"{label}{f'[{grid}]' if grid else ''}-seed{self.seed}"

    def argv(self, experiment: str | None = None) -> list[str]:
        """``mbvi`` arguments of the trial, in ``experiment`` when given."""
        argv = ["fit", "--config", self.config, *self.overrides, f"--model.seed={self.seed}"]
        if experiment is not None:
            argv += [f"--trainer.logger.init_args.experiment_name={experiment}",
                     f"--trainer.logger.init_args.run_name={self.name}"]  # fmt: skip
        return argv


# ---- building the trials ---------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,3,5-6"`` -> [0, 3, 5, 6]."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ConfigError(f"--seeds {text!r}: expected seeds like 0-4 or 0,2,5 or 0-2,7.")
        seeds += range(int(m[1]), int(m[2] or m[1]) + 1)
    return list(dict.fromkeys(seeds))


def parse_grid(texts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["model.value_lr=3e-4,1e-3"]`` -> [("model.value_lr", ["3e-4", "1e-3"])]; a comma
    inside brackets belongs to its value (``model.engine.hidden=[64,64],[32,32]``)."""
    grid: list[tuple[str, list[str]]] = []
    for text in texts:
        key, _, values = text.partition("=")
        key = key.strip().lstrip("-")
        split = _split_top_level(values)
        if not key or not all(split):
            raise ConfigError(
                f"--grid {text!r}: expected KEY=V1,V2,... with an `mbvi fit` option as KEY "
                "(e.g. --grid model.value_lr=3e-4,1e-3)."
            )
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid names {key!r} twice: list all its values in one --grid.")
        grid.append((key, split))
    return grid


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def make_trials(configs: Sequence[str], grid, seeds: Sequence[int]) -> list[Trial]:
    """Every config × grid point × seed, seeds innermost."""
    points = itertools.product(*([f"--{key}={v}" for v in values] for key, values in grid))
    points = list(points)
    labels = config_labels(configs)
    return [Trial(c, tuple(p), s, labels[c]) for c in configs for p in points for s in seeds]


def config_labels(configs: Sequence[str]) -> dict[str, str]:
    """{config: its label in trial names}: the file name without suffix, prefixed with
    as many parent folders as it takes to tell configs of one file name apart
    (``pendulum/sac`` and ``halfcheetah/sac``), so that no two trials share a run name
    or a log file."""
    parts = {c: Path(c).with_suffix("").parts for c in configs}
    labels = {}
    for config, mine in parts.items():
        depth = 1
        while depth < len(mine) and any(
            p[-depth:] == mine[-depth:] for c, p in parts.items() if c != config
        ):
            depth += 1
        labels[config] = "/".join(mine[-depth:])
    return labels


def resolve(trial: Trial) -> dict:
    """The trial's config as ``mbvi fit --print_config`` resolves it; ``ConfigError``
    carrying the CLI's own message (e.g. the unknown option) when it does not parse."""
    from mbvi.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    environ, path, argv = dict(os.environ), list(sys.path), sys.argv
    sys.argv = ["mbvi"]  # LightningCLI warns when it sees both `args` and sys.argv's options
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main([*trial.argv(), "--print_config"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        sys.argv = argv
    if code:
        lines = err.getvalue().strip().splitlines()
        first = next((i for i, line in enumerate(lines) if "error:" in line), 0)
        message = " ".join(line.strip() for line in lines[first:])
        raise ConfigError(f"trial {trial.name} (mbvi {' '.join(trial.argv())}): {message}")
    return yaml.safe_load(out.getvalue())


def trial_key(resolved: dict) -> str:
    """A trial's identity: a hash of its resolved config, logger bookkeeping aside."""
    config = json.loads(json.dumps(resolved))
    logger = (config.get("trainer") or {}).get("logger") or {}
    for entry in logger if isinstance(logger, list) else [logger]:
        for key in _LOGGER_KEYS:
            (entry.get("init_args") or {}).pop(key, None)
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def experiment_of(resolved: dict) -> str:
    logger = (resolved.get("trainer") or {}).get("logger") or {}
    init = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    return init.get("experiment_name") or "mbvi"


# ---- the command ---------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> int:
    """Run the sweep ``args`` describes; returns the exit status."""
    from mbvi.tracking import sweep_services as services

    ray = services.import_ray()
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(
            f"--num_cpus must be >= 1 (leave it out for all cores), got {args.num_cpus}"
        )
    cores = args.num_cpus or os.cpu_count() or 1
    if args.threads_per_trial < 1 or (args.address is None and args.threads_per_trial > cores):
        raise ConfigError(
            f"--threads_per_trial {args.threads_per_trial}: pass 1 to {cores} (the CPUs of "
            "this machine's Ray instance; --num_cpus sets them)."
        )
    trials = make_trials(args.config, parse_grid(args.grid), parse_seeds(args.seeds))
    resolved = [resolve(t) for t in trials]
    experiment = args.experiment or experiment_of(resolved[0])
    keys = [trial_key(r) for r in resolved]
    if len(set(keys)) < len(keys):
        twins = [t.name for t, k in zip(trials, keys) if keys.count(k) > 1]
        raise ConfigError(f"trials {', '.join(twins)} resolve to the same config; drop repeats.")
    if args.address is not None:
        services.check_address(args.address)
    log_dir = Path(args.log_dir or Path("sweep_logs") / experiment).resolve()
    host = "127.0.0.1"
    if args.address is not None and args.tracking_uri is None:
        host = _node_ip()  # trials on other nodes must reach the server started here
    slots = []  # Ray starts while the tracking server does

    def start_ray() -> None:
        slots.append(services.connect(args.address, args.num_cpus, args.threads_per_trial))

    try:
        with services.tracking(args.tracking_uri, log_dir, host, start_ray) as uri:
            return _run(ray, trials, keys, experiment, uri, slots[0], log_dir, args)
    finally:
        ray.shutdown()  # also when the server never came up (Ray started meanwhile)


def _run(ray, trials, keys, experiment, uri, slots, log_dir, args) -> int:
    """Launch the trials that have no FINISHED run, follow them, then compare; SIGTERM
    and SIGHUP stop it as Ctrl-C does meanwhile (set after ray.init, which sets its own)."""
    previous = _stop_like_ctrl_c(signal.SIGTERM, signal.SIGHUP)
    try:
        return _run_trials(ray, trials, keys, experiment, uri, slots, log_dir, args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_trials(ray, trials, keys, experiment, uri, slots, log_dir, args) -> int:
    from mlflow import MlflowClient

    from mbvi.tracking import sweep_services as services
    from mbvi.tracking.sweep_table import finished_keys, follow

    client = MlflowClient(uri)
    done = finished_keys(client, experiment)
    todo = [(t, k) for t, k in zip(trials, keys) if k not in done]
    for trial, key in zip(trials, keys):
        if key in done:
            print(f"mbvi sweep: {trial.name} already FINISHED (run {done[key]}); skipped")
    if not todo:
        print(f"mbvi sweep: all {len(trials)} trials already FINISHED in {experiment!r}")
        return _compare(experiment, uri, args.output, 0)
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment {experiment!r} was deleted (it is in the store's trash); restore "
            f"it (`mlflow experiments restore --experiment-id {found.experiment_id}`), or "
            "pass another --experiment"
        )
    if found is None:
        # Trials started together would race to create it, and all but one would fail.
        client.create_experiment(experiment)
    print(f"mbvi sweep: {len(todo)} of {len(trials)} trials to run in experiment "
          f"{experiment!r}, {slots} at a time, {args.threads_per_trial} thread(s) each; "
          f"logs in {log_dir}", flush=True)  # fmt: skip
    task = ray.remote(services.run_trial).options(num_cpus=args.threads_per_trial, max_retries=0)
    threads = str(args.threads_per_trial)
    refs = {}
    for trial, key in todo:
        tags = json.dumps({TRIAL_TAG: key, NAME_TAG: trial.name})
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "MLFLOW_TRACKING_URI": uri, "PYTHONWARNINGS": "ignore", TAGS_ENV: tags}  # fmt: skip
        argv = [*trial.argv(experiment), f"--trainer.logger.init_args.tracking_uri={uri}"]
        log = str(log_dir / f"{_filename(trial.name)}.log")
        refs[key] = task.remote(argv, env, os.getcwd(), log)
    names = {k: t.name for t, k in zip(trials, keys)}
    try:
        failed = follow(ray, client, experiment, names, done, refs, args.refresh_s)
    finally:
        ray.shutdown()  # before the server stops: no trial outlives it
    return _compare(experiment, uri, args.output, 1 if failed else 0)


_STOPPED_BY: list[int] = []
"""The signals other than Ctrl-C that stopped this sweep (``_stop_like_ctrl_c``)."""


def _stop_like_ctrl_c(*signums: int) -> dict:
    """SIGTERM (a scheduler) and SIGHUP (a closed terminal) stop the sweep as Ctrl-C
    does: trials cancelled and their runs ended, Ray and the tracking server stopped.
    Left to their defaults (Ray's SIGTERM handler exits at once), they leave runs
    RUNNING and the server, in a session of its own, running.  The signal is noted
    aside: a KeyboardInterrupt raised inside a Ray call comes out as Ray's own.  Returns
    the handlers it replaced, by signal."""

    def stop(signum, frame):
        _STOPPED_BY.append(signum)
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, stop) for signum in signums}


def _compare(experiment: str, uri: str, output: str, status: int) -> int:
    """Print ``mbvi compare``'s table of the experiment; returns ``status``."""
    from mbvi.tracking.compare import main as compare_main

    print(flush=True)
    compare_main(["--experiment", experiment, "--tracking_uri", uri, "--output", output])
    return status


def _node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def _filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=\[\]-]+", "_", name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mbvi sweep",
        description="Run config × grid × seed trials of `mbvi fit` as Ray tasks, logged to an "
        "MLflow tracking server; trials that already FINISHED are skipped.",
    )
    p.add_argument(
        "--config", action="append", required=True, help="an `mbvi fit` config; repeat for several"
    )
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0-4 or 0,2,5 (default 0)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an option and its values, e.g. model.value_lr=3e-4,1e-3; repeatable "
        "(the grid is their product)",
    )
    p.add_argument(
        "--threads_per_trial",
        type=int,
        default=1,
        help="intra-op threads of each trial, and the CPUs Ray reserves for it",
    )
    p.add_argument(
        "--num_cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray instance (default: all cores)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: this machine)",
    )
    p.add_argument(
        "--tracking_uri",
        default=None,
        help="an MLflow tracking server (http://HOST:PORT); default: start one over "
        "MLFLOW_TRACKING_URI or sqlite:///mlflow.db for the sweep",
    )
    p.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of every trial (default: the first config's)",
    )
    p.add_argument("--refresh_s", type=float, default=10.0, help="seconds between table prints")
    p.add_argument(
        "--log_dir",
        default=None,
        help="folder of the trials' output (default sweep_logs/<experiment>)",
    )
    p.add_argument("--output", default=".", help="folder of mbvi compare's figures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mbvi sweep ...``; returns the exit status (2 on bad input)."""
    args = parser().parse_args(argv)
    try:
        return sweep(args)
    except MbviError as err:
        print(f"mbvi: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = _STOPPED_BY[0] if _STOPPED_BY else signal.SIGINT
        by = f" by {signal.Signals(signum).name}" if _STOPPED_BY else ""
        print(f"mbvi sweep: interrupted{by}; running trials were stopped (KILLED)", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
