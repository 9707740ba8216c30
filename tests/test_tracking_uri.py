"""The default tracking URI follows the working directory (MLflow caches a store per URI
string, so a relative one would keep writing to the first folder's store)."""

from mbvi.tracking.logger import resolve_tracking_uri


def test_a_relative_sqlite_store_is_made_absolute_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///runs/a.db") == f"sqlite:///{tmp_path / 'runs/a.db'}"
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"


def test_absolute_and_server_uris_are_kept(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert resolve_tracking_uri().endswith("/x.db") and resolve_tracking_uri().count("////") == 1
