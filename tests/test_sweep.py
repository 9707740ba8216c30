"""``mbvi sweep``: tiny Pendulum trials as Ray tasks through the real console script, read
back from a real MLflow tracking server; and the bad input refused before any trial."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from mbvi.errors import ConfigError
from mbvi.tracking.sweep import (
    NAME_TAG,
    TRIAL_TAG,
    Trial,
    make_trials,
    parse_grid,
    parse_seeds,
    resolve,
    trial_key,
)
from tests.conftest import CONFIGS, MBVI, cli_env, run_cli_in_process, stop_once_checkpointed

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")
# Two trials of 150 env steps: the grid point and two seeds.
SWEEP = ["sweep", "--config", TINY, "--seeds", "0-1", "--experiment", "sw",
         "--grid", "model.total_env_steps=150", "--refresh_s", "2"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(cwd, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([MBVI, *SWEEP, *extra], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep run once, with the server it starts itself over ./mlflow.db."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = sweep(cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd, done


@pytest.fixture(scope="module")
def server(swept):
    """An MLflow server over the sweep's store, as a user would start one."""
    cwd, _ = swept
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--no-serve-artifacts"],
        cwd=cwd, env={**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sw")
    return [r for r in client.search_runs([exp.experiment_id]) if TRIAL_TAG in r.data.tags]


@pytest.mark.slow  # two sweeps, about a minute and a half in all
def test_each_trial_is_one_finished_run_with_its_seed_and_override(swept, server):
    cwd, done = swept
    runs = trial_runs(server)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["total_env_steps"] for r in runs} == {"150"}
    names = {r.data.tags[NAME_TAG] for r in runs}
    assert names == {"tiny[total_env_steps=150]-seed0", "tiny[total_env_steps=150]-seed1"}
    assert {r.info.run_name for r in runs} == names
    assert len({r.data.tags[TRIAL_TAG] for r in runs}) == 2
    client = MlflowClient(server)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return")]
        assert max(steps) == 150
    # It served the working directory's store, on localhost, and stopped the server.
    assert "MLflow server http://127.0.0.1:" in done.stdout
    assert f"over sqlite:///{cwd / 'mlflow.db'}" in done.stdout
    # On this machine's cores (a slot per core), one thread each.
    assert "2 of 2 trials to run in experiment 'sw'" in done.stdout
    assert f"{os.cpu_count()} at a time, 1 thread(s) each" in done.stdout
    for name in names:
        assert (cwd / "sweep_logs" / "sw" / f"{name}.log").is_file()


@pytest.mark.slow  # two sweeps, about a minute and a half in all
def test_the_live_table_shows_state_step_and_return_then_compare(swept):
    _, done = swept
    out = done.stdout
    assert "trial" in out and "env step" in out and "last return" in out
    final = out[out.rindex("mbvi sweep ") :]  # the last table
    rows = [line.split() for line in final.splitlines() if line.startswith("tiny[")]
    assert len(rows) == 2
    for row in rows:
        assert row[1] == "FINISHED" and row[2] == "150"
        assert -2000 < float(row[3]) < 0  # a Pendulum return
    compare = out[out.rindex("engine  prior") :]
    assert "Direct  UniformPrior  TwinQ  Pendulum-v1  2 [0, 1]" in compare


@pytest.mark.slow  # two sweeps, about a minute and a half in all
def test_rerun_skips_finished_trials_and_reruns_the_others(swept, server):
    cwd, _ = swept
    client = MlflowClient(server)
    runs = sorted(trial_runs(server), key=lambda r: r.data.params["seed"])
    client.set_terminated(runs[1].info.run_id, "FAILED")  # seed 1 must run again
    done = sweep(cwd, "--tracking_uri", server)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"seed0 already FINISHED (run {runs[0].info.run_id}); skipped" in done.stdout
    assert "1 of 2 trials to run" in done.stdout
    assert "MLflow server http" not in done.stdout  # it used the server it was given
    after = trial_runs(server)
    assert len(after) == 3
    seed1 = [r for r in after if r.data.params["seed"] == "1"]
    assert sorted(r.info.status for r in seed1) == ["FAILED", "FINISHED"]


def _niceness() -> int:
    return os.nice(0)


def test_trials_run_at_the_niceness_of_the_sweep_not_rays(monkeypatch):
    """Ray's workers default to niceness 15, which a trial inherits: beside any other
    process it would run many times slower than the same ``mbvi fit`` typed by hand."""
    from mbvi.tracking import sweep_services as services

    monkeypatch.setenv(services.WORKER_NICENESS_ENV, "15")
    monkeypatch.delenv(services.WORKER_NICENESS_ENV)  # unset here, restored to unset after
    ray = services.import_ray()
    try:
        assert services.connect(None, 1, 1) == 1
        worker_niceness = ray.get(ray.remote(_niceness).remote())
    finally:
        ray.shutdown()
    assert worker_niceness == os.nice(0)


# ---- bad input: refused before any trial starts --------------------------------------------
def refused(capsys, workdir, *extra: str) -> str:
    code, _, err = run_cli_in_process(capsys, *SWEEP, *extra)
    assert code == 2, err
    assert not (workdir / "sweep_logs").exists() and not (workdir / "mlflow.db").exists()
    return err


def test_an_unknown_grid_key_is_the_cli_error_naming_it(workdir, capsys):
    err = refused(capsys, workdir, "--grid", "model.value_lrr=3e-4,1e-3")
    assert "unrecognized arguments: --model.value_lrr=3e-4" in err
    assert "trial tiny[total_env_steps=150,value_lrr=3e-4]-seed0" in err


def test_a_bad_grid_value_is_the_cli_error(workdir, capsys):
    err = refused(capsys, workdir, "--grid", "model.batch_size=many")
    assert "model.batch_size" in err and "many" in err


def test_a_ray_address_that_does_not_answer_is_named(workdir, capsys):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    err = refused(capsys, workdir, "--address", address)
    assert f"the Ray cluster at {address} does not answer" in err
    assert time.monotonic() - start < 30


def test_a_port_that_answers_in_another_protocol_is_no_ray_cluster(workdir, capsys):
    """A web server (say) on the port: ray.init would hang there, so it is refused."""
    import http.server
    import threading

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{web.server_address[1]}"
        err = refused(capsys, workdir, "--address", address)
    finally:
        web.shutdown()
    assert f"{address} answers, but not as a Ray cluster" in err


def test_a_port_that_speaks_http2_passes_the_address_check():
    """A Ray head's GCS is a gRPC server: it answers HTTP/2's client preface with a
    SETTINGS frame (checked by hand against `ray start --head`, 2026-12-04).  A socket
    that answers the same way stands in for it here, without starting or stopping a
    cluster on the machine."""
    import threading

    from mbvi.tracking.sweep_services import check_address

    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(bytes([0, 0, 0, 0x04, 0, 0, 0, 0, 0]))  # an empty SETTINGS frame

    threading.Thread(target=answer, daemon=True).start()
    try:
        check_address(f"127.0.0.1:{listener.getsockname()[1]}")  # SweepError if refused
    finally:
        listener.close()


def test_address_auto_names_the_address_it_found(workdir, capsys, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    err = refused(capsys, workdir, "--address", "auto")
    assert f"the Ray cluster at auto ({address}) does not answer" in err


def test_an_unreachable_tracking_server_is_named(workdir, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    err = refused(capsys, workdir, "--tracking_uri", uri)
    assert f"the MLflow tracking server {uri!r} does not answer" in err


def test_a_store_file_is_no_tracking_server(workdir, capsys):
    err = refused(capsys, workdir, "--tracking_uri", "sqlite:///mlflow.db")
    assert "'sqlite:///mlflow.db' is not a tracking server" in err


def test_more_threads_per_trial_than_cores_is_refused(workdir, capsys):
    err = refused(capsys, workdir, "--num_cpus", "2", "--threads_per_trial", "3")
    assert "--threads_per_trial 3: pass 1 to 2" in err


def test_a_cpu_count_below_one_is_refused(workdir, capsys):
    assert "--num_cpus must be >= 1 (leave it out for all cores), got 0" in refused(
        capsys, workdir, "--num_cpus", "0"
    )


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.delete_experiment(client.create_experiment("gone"))
    done = subprocess.run(
        [MBVI, "sweep", "--config", TINY, "--seeds", "0", "--experiment", "gone"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        "experiment 'gone' was deleted" in done.stderr
        and "mlflow experiments restore" in done.stderr
    )


def test_missing_ray_names_the_extra(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = refused(capsys, workdir)
    assert 'pip install -e ".[sweep]"' in err


# ---- building the trials ---------------------------------------------------------------------
def test_seeds_and_grid_parse_and_bad_text_says_the_form():
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    assert parse_grid(["model.engine.hidden=[64,64],[32,32]", "--model.value_lr=1e-3"]) == [
        ("model.engine.hidden", ["[64,64]", "[32,32]"]),
        ("model.value_lr", ["1e-3"]),
    ]
    with pytest.raises(ConfigError, match="expected seeds like 0-4"):
        parse_seeds("3-1")
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid(["model.value_lr"])
    with pytest.raises(ConfigError, match="names 'model.value_lr' twice"):
        parse_grid(["model.value_lr=1", "model.value_lr=2"])


def test_trials_are_the_product_and_the_key_ignores_logger_bookkeeping(workdir):
    grid = parse_grid(["model.value_lr=3e-4,1.5e-3"])
    trials = make_trials([TINY], grid, [0, 1])
    assert [t.name for t in trials] == ["tiny[value_lr=3e-4]-seed0", "tiny[value_lr=3e-4]-seed1",
                                        "tiny[value_lr=1.5e-3]-seed0", "tiny[value_lr=1.5e-3]-seed1"]  # fmt: skip
    keys = [trial_key(resolve(t)) for t in trials]
    assert len(set(keys)) == 4  # seed and override are each part of a trial's identity
    moved = Trial(TINY, trials[0].overrides + (
        "--trainer.logger.init_args.experiment_name=other",
        "--trainer.logger.init_args.tracking_uri=http://127.0.0.1:1"), 0)  # fmt: skip
    assert trial_key(resolve(moved)) == keys[0]


def test_run_tags_from_the_environment_join_the_options_and_bad_json_is_named(workdir, monkeypatch):
    from mbvi.errors import TrackingError
    from mbvi.tracking.logger import TAGS_ENV, MLflowTracker

    monkeypatch.setenv(TAGS_ENV, '{"mbvi.sweep.trial": "abc", "team": "env"}')
    logger = MLflowTracker(tracking_uri=f"sqlite:///{workdir}/mlflow.db", tags={"team": "option"})
    assert logger.tags["mbvi.sweep.trial"] == "abc"
    assert logger.tags["team"] == "option"
    monkeypatch.setenv(TAGS_ENV, "trial=abc")
    with pytest.raises(TrackingError, match="MBVI_RUN_TAGS must be a JSON object of run tags"):
        MLflowTracker(tracking_uri=f"sqlite:///{workdir}/mlflow.db")


def test_configs_that_share_a_file_name_get_trials_of_their_own_names():
    trials = make_trials(["configs/pendulum/sac.yaml", "configs/halfcheetah/sac.yaml",
                          "configs/pendulum/tiny.yaml"], [], [0])  # fmt: skip
    assert [t.name for t in trials] == ["pendulum/sac-seed0", "halfcheetah/sac-seed0", "tiny-seed0"]


@pytest.mark.slow  # a sweep stopped once its trial has written a checkpoint: about a minute
def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path):
    """A scheduler's SIGTERM to the sweep: the trial ends KILLED (never left RUNNING), the
    tracking server is stopped, and the status says how the sweep ended."""
    code, out = stop_once_checkpointed(
        ["sweep", "--config", TINY, "--seeds", "0", "--experiment", "term",
         "--grid", "model.total_env_steps=1000000", "--grid", "model.buffer_size=5000",
         "--refresh_s", "2"],
        tmp_path, "checkpoints/*/last.ckpt", signal.SIGTERM, wait_s=240,
    )  # fmt: skip
    assert code == 143, out[-3000:]
    assert "interrupted by SIGTERM" in out
    port = int(out.split("MLflow server http://127.0.0.1:")[1].split()[0].rstrip(","))
    with pytest.raises(OSError):  # the sweep's server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("term")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if TRIAL_TAG in r.data.tags]
    assert run.info.status == "KILLED"
