"""Where runs are tracked and the names both sides of a store share: the store URI mbvi
resolves, the environment variable that carries extra run tags, and the tag of a
resumed run.  Free of Lightning and MLflow, so that ``mbvi compare`` and ``mbvi sweep``
read them without importing either."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RESUMED_FROM_TAG = "mbvi.resumed_from"
"""Tag of a run resumed from a checkpoint: the MLflow run id that wrote the checkpoint."""
TAGS_ENV = "MBVI_RUN_TAGS"
"""Environment variable holding a JSON object of extra run tags (``mbvi sweep`` names
its trials with it); tags given by option win over it."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else MLFLOW_TRACKING_URI, else the working directory's SQLite store.  A
    relative SQLite path is made absolute: MLflow caches one store per URI string, so a
    process that changes directory would otherwise keep writing to the first folder's."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = uri[len(prefix) :]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return prefix + str(Path.cwd() / path)
    return uri
