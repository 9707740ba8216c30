"""The MLflow tracker on a real SQLite store: runs started together on a new store."""

import multiprocessing

from mlflow import MlflowClient

from mbvi.tracking.logger import MLflowTracker


def _start_run(uri: str, barrier, results) -> None:
    barrier.wait()  # all at once, as seeds launched together do
    try:
        tracker = MLflowTracker(experiment_name="together", tracking_uri=uri)
        tracker.check_reachable()
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.finalize("success")
        results.put("ok")
    except Exception as err:  # reported to the test, which names it
        results.put(f"{type(err).__name__}: {err}")


def test_runs_started_together_share_a_new_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start_run, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = [results.get(timeout=1) for _ in procs]
    assert outcomes == ["ok"] * 4, outcomes
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "together"]
    assert len(client.search_runs([exp.experiment_id])) == 4
