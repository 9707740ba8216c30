"""MLflow tracking: an embedded SQLite store by default, any URI by option.

``MLflowTracker`` is Lightning's ``MLFlowLogger`` with mbvi's defaults:

* the URI is ``--trainer.logger.init_args.tracking_uri``, else ``MLFLOW_TRACKING_URI``,
  else ``sqlite:///mlflow.db`` in the working directory (never the ``./mlruns``
  file store that MLflow 3 refuses);
* metrics are logged asynchronously (~0.1 ms a call instead of ~5 ms);
* a run ends FINISHED on success, FAILED on an exception and KILLED on Ctrl-C.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import mlflow
from lightning.pytorch.loggers import MLFlowLogger

from mbvi.errors import TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_SQLITE = "sqlite:///"

try:
    import fcntl
except ImportError:  # Windows: no lock; start runs on a new store one at a time
    fcntl = None


RESUMED_FROM_TAG = "mbvi.resumed_from"
"""Tag of a run resumed from a checkpoint: the MLflow run id that wrote the checkpoint."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MLflowTracker(MLFlowLogger):
    """MLflow logger for mbvi runs.

    Args:
        experiment_name: MLflow experiment that groups comparable runs.
        run_name: name of the run; None names it ``<engine>-<prior>-seed<seed>`` (e.g.
            ``Direct-Uniform-seed0``) when trained through ``mbvi fit``.
        tracking_uri: store URI; None reads MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
        tags: extra run tags.
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
            tags=tags,
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
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            with _store_lock(self._tracking_uri):  # runs started together create one experiment
                _ = self.experiment
                _ = self.run_id
        except Exception as err:  # any failure to open the store is the user's to fix
            raise _tracking_error(self._tracking_uri, err) from None

    def default_run_name(self, name: str) -> None:
        """Name the run ``name`` unless a run name was configured (call before the run
        is created, i.e. before anything is logged)."""
        if self._run_name is None and self._run_id is None:
            self._run_name = name

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


def _tracking_error(uri: str, err: Exception) -> TrackingError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return TrackingError(
        f"cannot use the MLflow tracking URI {uri!r}: {type(err).__name__}: {first_line}. "
        "Start the tracking server, fix the URI, or drop the option to use the embedded "
        f"store {DEFAULT_TRACKING_URI}."
    )
