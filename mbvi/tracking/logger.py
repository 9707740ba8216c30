"""MLflow tracking: an embedded SQLite store by default, any URI by option.

``MLflowTracker`` is Lightning's ``MLFlowLogger`` with mbvi's defaults:

* the URI is ``--trainer.logger.init_args.tracking_uri``, else ``MLFLOW_TRACKING_URI``,
  else ``sqlite:///mlflow.db`` in the working directory (never the ``./mlruns``
  file store that MLflow 3 refuses);
* metrics are logged asynchronously, so that a call does not wait for the store;
* a run ends FINISHED on success, FAILED on an exception and KILLED on Ctrl-C;
* a run whose process died without ending it (SIGKILL, out of memory, a lost machine)
  stays RUNNING until a resume from its checkpoint ends it FAILED (``continue_run``).
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager

import mlflow
from lightning.pytorch.loggers import MLFlowLogger

from mbvi.errors import TrackingError
from mbvi.tracking.uri import (
    DEFAULT_TRACKING_URI,
    RESUMED_FROM_TAG,
    TAGS_ENV,
    resolve_tracking_uri,
)

_SQLITE = "sqlite:///"

try:
    import fcntl
except ImportError:  # Windows: no lock; start runs on a new store one at a time
    fcntl = None


ORPHANED_TAG = "mbvi.orphaned"
"""Note on a run that a resume found RUNNING with its process gone, and ended FAILED."""
HOST_TAG, PID_TAG = "mbvi.host", "mbvi.pid"
"""Where a run's process runs, so that a resume can tell a dead run from a live one."""


class MLflowTracker(MLFlowLogger):
    """MLflow logger for mbvi runs.

    Args:
        experiment_name: MLflow experiment that groups comparable runs.
        run_name: name of the run; None names it ``<engine>-<prior>[-H<horizon>]-seed<seed>``
            (e.g. ``Direct-Uniform-seed0``, ``Direct-Uniform-H3-seed0`` for a model-based
            value) when trained through ``mbvi fit``.
        tracking_uri: store URI; None reads MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
        tags: extra run tags, added to those of the MBVI_RUN_TAGS environment variable
            (a JSON object).
    """

    def __init__(
        self,
        experiment_name: str = "mbvi",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        kwargs = dict(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=resolve_tracking_uri(tracking_uri),
            tags={**_process_tags(), **_env_tags(), **(tags or {})},
            log_model=False,
            synchronous=False,
        )
        # Runs started together (one per seed) would race to create a new SQLite
        # store's tables: the lock lets one build them while the others wait.  Any
        # failure (an unknown scheme, a path that cannot be a file) is the user's to fix.
        with _store_lock(kwargs["tracking_uri"]):
            try:
                super().__init__(**kwargs)
            except Exception as err:
                raise _tracking_error(kwargs["tracking_uri"], err) from None
        self._killed = False

    def check_reachable(self) -> None:
        """Open the store now, so a bad URI fails before training, naming the URI."""
        # Fail fast here only: left in place, no retries and a short timeout would drop
        # the run's later (asynchronous) logging whenever a busy server answers slowly.
        fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        saved = {k: os.environ.get(k) for k in fast}
        os.environ.update({k: v for k, v in fast.items() if saved[k] is None})
        try:
            with _store_lock(self._tracking_uri):  # runs started together create one experiment
                _ = self.experiment
                _ = self.run_id
        except Exception as err:  # any failure to open the store is the user's to fix
            raise _tracking_error(self._tracking_uri, err) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)

    def default_run_name(self, name: str) -> None:
        """Name the run ``name`` unless a run name was configured (call before the run
        is created, i.e. before anything is logged)."""
        if self._run_name is None and self._run_id is None:
            self._run_name = name

    def continue_run(self, previous: str, env_steps: int) -> None:
        """Tag this run as the continuation of run ``previous`` (whose checkpoint at
        ``env_steps`` it resumes), and end ``previous`` FAILED, with an
        ``mbvi.orphaned`` note, when it is still RUNNING and its process is gone.

        Such a run was killed without a chance to end itself; left RUNNING, it would
        read as live forever.  Its end time is its last logged metric, so its duration
        is the time it trained.  A run whose process still runs on this machine is left
        alone (a resume that branches from a live run); one on another machine cannot
        be checked and counts as gone.  A ``previous`` outside this store is only named.
        """
        client = self.experiment
        client.set_tag(self.run_id, RESUMED_FROM_TAG, previous)
        try:
            old = client.get_run(previous)
        except Exception:  # the checkpoint comes from another store
            return
        if old.info.status != "RUNNING" or _process_alive(old.data.tags):
            return
        client.set_tag(
            previous,
            ORPHANED_TAG,
            "its process ended without ending the run (killed: SIGKILL, out of memory or a "
            f"lost machine); marked FAILED when run {self.run_id} resumed from its checkpoint "
            f"at env step {env_steps}",
        )
        client.set_terminated(previous, "FAILED", end_time=_last_logged(client, old))

    def mark_killed(self) -> None:
        self._killed = True

    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        mlflow.flush_async_logging()
        super().finalize("KILLED" if self._killed else status)


@contextmanager
def _store_lock(uri: str):
    """For an SQLite store, hold an exclusive lock on ``<store>.lock`` beside it: MLflow
    creates a new store's tables and an experiment without guarding against another
    process doing the same at that moment.  Other stores need no lock."""
    if fcntl is None or not uri.startswith(_SQLITE):
        yield
        return
    try:
        handle = open(uri[len(_SQLITE) :].split("?")[0] + ".lock", "a")  # no ?query
    except OSError:  # no folder for the store: opening the store names the problem
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _process_alive(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's host and pid tags still runs (False when
    they are missing or name another machine)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_logged(client, run) -> int:
    """Time (ms) of ``run``'s last logged metric, else its start."""
    stamps = [
        m.timestamp
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    ]
    return max(stamps, default=run.info.start_time)


def _env_tags() -> dict[str, str]:
    text = os.environ.get(TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError as err:
        raise TrackingError(f"{TAGS_ENV} must be a JSON object of run tags: {err}") from None
    if not isinstance(tags, dict):
        raise TrackingError(f"{TAGS_ENV} must be a JSON object of run tags, got {text!r}")
    return {str(k): str(v) for k, v in tags.items()}


def _tracking_error(uri: str, err: Exception) -> TrackingError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return TrackingError(
        f"cannot use the MLflow tracking URI {uri!r}: {type(err).__name__}: {first_line}. "
        "Start the tracking server, fix the URI, or drop the option to use the embedded "
        f"store {DEFAULT_TRACKING_URI}."
    )
