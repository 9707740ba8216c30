"""Faults of real ``mbvi fit`` processes: a run killed with SIGKILL, and runs started
together on one fresh working directory."""

import os
import signal
import subprocess
import time

import torch
from mlflow import MlflowClient

from mbvi.tracking.logger import ORPHANED_TAG, PID_TAG, RESUMED_FROM_TAG, MLflowTracker
from mbvi.tracking.runs import load_runs
from tests.conftest import CONFIGS, MBVI, cli_env

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")


def mbvi_fit(cwd, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [MBVI, "fit", "--config", TINY, *args], cwd=cwd, env=cli_env(), text=True, **popen
    )


def tiny_runs(cwd) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("tiny").experiment_id])


def test_a_run_killed_with_sigkill_is_ended_failed_by_its_resume(workdir):
    proc = mbvi_fit(
        workdir, "--model.total_env_steps", "100000", "--model.eval_every", "100000",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(workdir.glob("checkpoints/*/last.ckpt")):  # tiny.yaml: one every 200 steps
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no periodic checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    client, (killed,) = tiny_runs(workdir)
    assert killed.info.status == "RUNNING"  # nothing could end it: it reads as live
    (ckpt,) = workdir.glob("checkpoints/*/last.ckpt")
    at = torch.load(ckpt, weights_only=True)["mbvi"]["env_steps"]

    resume = mbvi_fit(
        workdir, "--model.total_env_steps", str(at + 100), "--ckpt_path", str(ckpt),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err[-3000:]

    client, found = tiny_runs(workdir)
    old = client.get_run(killed.info.run_id)
    (new,) = [r for r in found if r.info.run_id != killed.info.run_id]
    assert old.info.status == "FAILED"
    note = old.data.tags[ORPHANED_TAG]
    assert "SIGKILL" in note and new.info.run_id in note and f"at env step {at}" in note
    # its end is its last logged metric, so its duration is the time it trained
    assert old.info.start_time <= old.info.end_time <= new.info.start_time
    assert new.info.status == "FINISHED"
    assert new.data.tags[RESUMED_FROM_TAG] == killed.info.run_id
    # `mbvi compare` reads the killed run and its resume as one sample
    _, samples = load_runs(client, "tiny", "eval/return")
    assert len(samples) == 1 and max(samples[0].curve) == at + 100


def test_a_resume_leaves_a_run_whose_process_still_runs_alone(workdir):
    uri = f"sqlite:///{workdir}/mlflow.db"
    live = MLflowTracker("tiny", tracking_uri=uri)
    live.log_metrics({"x": 1.0}, step=1)  # started by this process, which is alive
    MLflowTracker("tiny", tracking_uri=uri).continue_run(live.run_id, 1)
    client = MlflowClient(uri)
    assert client.get_run(live.run_id).info.status == "RUNNING"
    assert ORPHANED_TAG not in client.get_run(live.run_id).data.tags

    child = subprocess.Popen(["true"])
    child.wait()  # a process that has ended: the run's pid now names none
    client.set_tag(live.run_id, PID_TAG, str(child.pid))
    MLflowTracker("tiny", tracking_uri=uri).continue_run(live.run_id, 1)
    assert client.get_run(live.run_id).info.status == "FAILED"


def test_four_runs_started_at_once_on_a_fresh_folder_lose_nothing(workdir):
    procs = [
        mbvi_fit(workdir, "--model.seed", str(seed), "--model.total_env_steps", "200",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for seed in range(4)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    client, found = tiny_runs(workdir)
    assert sorted(r.data.params["seed"] for r in found) == ["0", "1", "2", "3"]
    assert {r.info.status for r in found} == {"FINISHED"}
    assert len({frozenset(r.data.params) for r in found}) == 1  # every param of every run
    assert len(found[0].data.params) > 30
    expected = {
        "perf/env_steps_per_s": [50, 100, 150, 200],
        "loss/value": [150, 200],
        "train/episode_return": [200],
        "eval/return": [200],
    }
    for run in found:
        rid = run.info.run_id
        history = {k: [m.step for m in client.get_metric_history(rid, k)] for k in run.data.metrics}
        assert {k: sorted(history[k]) for k in expected} == expected, run.info.run_name
        assert len(history) == len(found[0].data.metrics)
        assert {"config.yaml", "checkpoints"} <= {a.path for a in client.list_artifacts(rid)}
    assert os.path.exists(workdir / "mlflow.db.lock")  # the SQLite store is still guarded
