"""``mbvi compare``: the real entry point on a store made by real tiny ``mbvi fit`` runs
(the aggregation on synthetic runs is in ``test_compare_tables``)."""

import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from mbvi import VariationalAgent, compare
from mbvi.cli import main as cli_main
from mbvi.errors import CheckpointError
from mbvi.tracking import stats
from mbvi.tracking.runs import (
    COMPARE_TAG,
    load_runs,
)
from mbvi.training.checkpoints import validate_checkpoint
from tests.conftest import CONFIGS, MBVI, ROOT, cli_env

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")
SHORT = ["--model.total_env_steps", "200", "--model.eval_every", "100"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECT = ("Direct", "UniformPrior", "TwinQ", "Pendulum-v1")
ITERATIVE = ("Iterative", "ConstantTanhGaussianPrior", "TwinQ", "Pendulum-v1")


# ---- the real entry point ---------------------------------------------------------------
def mbvi(cwd, *args, timeout=300):
    return subprocess.run(
        [MBVI, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three tiny runs in one store: Direct seeds 0 and 1, Iterative seed 0, each of
    200 env steps with evaluations at 100 and 200.  The Iterative run also trains on
    batches of 16 rather than 32, as iterative_sac.yaml did against sac.yaml."""
    cwd = tmp_path_factory.mktemp("compare")
    iterative = ["--model.prior", "mbvi.ConstantTanhGaussianPrior",
                 "--model.engine", "mbvi.planners.Iterative",
                 "--model.engine.hidden", "[32, 32]", "--model.engine.n_samples", "4",
                 "--model.batch_size", "16"]  # fmt: skip
    for args in (["--model.seed", "0"], ["--model.seed", "1"], ["--model.seed", "0", *iterative]):
        proc = mbvi(cwd, "fit", "--config", TINY, *SHORT, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


def finals(client, runs):
    return [client.get_metric_history(r.info.run_id, "eval/return")[-1].value for r in runs]


def test_compare_prints_the_table_writes_the_figures_and_logs_them(store):
    reps = 200  # bootstrap resamples: few, for speed
    proc = mbvi(store, "compare", "--experiment", "tiny", "--output", "figs",
                "--baseline", "Direct", "--reps", str(reps))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    found = client.search_runs([exp.experiment_id])
    direct = [r for r in found if r.data.params.get("engine") == "Direct"]
    iterative = [r for r in found if r.data.params.get("engine") == "Iterative"]
    assert len(direct) == 2 and len(iterative) == 1

    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    mean, std = np.mean(finals(client, direct)), np.std(finals(client, direct))
    assert lines["Direct"].split()[:4] == list(DIRECT)
    assert "2 [0, 1]" in lines["Direct"] and f"{mean:.2f} ± {std:.2f}" in lines["Direct"]
    assert " 200 " in lines["Direct"]  # env steps
    assert "1 [0]" in lines["Iterative"] and "± 0.00" in lines["Iterative"]
    # The intervals, as rliable gives them on the runs' final returns, and P(> baseline).
    iqm = stats.iqm(finals(client, direct), reps)
    assert str(iqm) in lines["Direct"] and "baseline" in lines["Direct"]
    versus = stats.probability_of_improvement(finals(client, iterative), finals(client, direct),
                                              reps)  # fmt: skip
    assert str(versus) in lines["Iterative"]
    assert "IQM: interquartile mean of the final values over seeds" in proc.stdout
    # The Iterative run trained on batches of 16, the Direct ones on 32: named under the
    # table; the engines' own settings (engine.hidden, n_samples) are not.
    (note,) = [line for line in proc.stdout.splitlines() if line.startswith("  batch_size")]
    assert note == (
        "  batch_size: Direct · UniformPrior · TwinQ (Pendulum-v1) = 32; "
        "Iterative · ConstantTanhGaussianPrior · TwinQ (Pendulum-v1) = 16"
    )
    assert "engine." not in proc.stdout

    markdown = (store / "figs" / "tiny_compare.md").read_text().splitlines()
    assert markdown[0].startswith("| engine") and "IQM [95% CI]" in markdown[0]
    assert str(iqm) in markdown[2] and str(versus) in markdown[3]
    assert "  batch_size: " in "\n".join(markdown)

    figures = ["tiny_returns.png", "tiny_inference_improvement.png"]
    for name in figures:
        path = store / "figs" / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert imread(path).shape[2] in (3, 4)  # decodes as an image

    (logged,) = [r for r in found if COMPARE_TAG in r.data.tags]
    assert logged.info.run_name == "compare" and logged.info.status == "FINISHED"
    assert logged.info.run_id in proc.stdout
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {*figures, "tiny_compare.md", "compare.txt", "summary.json"} <= artifacts
    summary = client.download_artifacts(logged.info.run_id, "summary.json", str(store))
    rows = {tuple(r["group"]): r for r in json.load(open(summary))}
    assert rows[DIRECT]["final_mean"] == pytest.approx(mean)
    assert rows[DIRECT]["iqm"] == {"point": iqm.point, "low": iqm.low, "high": iqm.high}
    assert rows[ITERATIVE]["improvement"]["point"] == versus.point
    assert tuple(rows[ITERATIVE]["baseline"]) == DIRECT
    assert sorted(rows[DIRECT]["run_ids"]) == sorted(r.info.run_id for r in direct)


def checkpoints(store, engine):
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"params.engine = '{engine}'")
    return [store / "checkpoints" / r.info.run_id / "last.ckpt" for r in runs]


def test_inference_improvement_on_a_trained_agent(store, tmp_path, capsys):
    """Fig. 2 from a checkpoint: the benchmark rolls out the agent, scores λ_0..λ_K and
    plots; a direct agent is refused with the reason (the script's ``main`` runs in this
    process)."""
    spec = importlib.util.spec_from_file_location(
        "inference_improvement", ROOT / "benchmarks" / "inference_improvement.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (ckpt,) = checkpoints(store, "Iterative")
    out = tmp_path / "fig2.png"
    args = ["--episodes", "2", "--samples", "8", "--out", str(out)]
    script.main([*args, "--ckpt", str(ckpt)])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("episode ") and "200 states" in line for line in lines) == 2
    last = dict(kv.split("=") for kv in lines[-1].split()[1:])
    assert lines[-1].startswith("inference_improvement ") and last["K"] == "2"
    assert last["episodes"] == "2" and np.isfinite(float(last["abs_K"]))
    assert out.read_bytes()[:8] == PNG_MAGIC

    direct = checkpoints(store, "Direct")[0]
    with pytest.raises(SystemExit) as exit_:
        script.main([*args, "--ckpt", str(direct)])
    assert exit_.value.code == 2
    assert "Direct does not infer in iterations" in capsys.readouterr().err


def test_an_iterative_checkpoint_of_an_older_state_format_is_refused(store, tmp_path):
    """Iterative's inputs changed meaning at format 2 with the same shapes: a format-1
    file must not load silently, neither for analysis nor to resume."""
    (ckpt,) = checkpoints(store, "Iterative")
    current = VariationalAgent.load_from_checkpoint(ckpt, weights_only=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["mbvi"]["engine_format"] == 2
    del state["mbvi"]["engine_format"]  # as written before formats were recorded
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    message = "holds Iterative parameters of state format 1, but .* reads format 2"
    with pytest.raises(CheckpointError, match=message):
        VariationalAgent.load_from_checkpoint(old, weights_only=False)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(old, current)


def test_missing_experiment_lists_the_existing_ones(store, tmp_path, capsys):
    uri = f"sqlite:///{store}/mlflow.db"
    with pytest.raises(SystemExit) as exit_:  # the console script's own dispatch, in-process
        cli_main(["compare", "--experiment", "tinny", "--tracking_uri", uri])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "experiment 'tinny' not found; existing experiments: 'Default', 'tiny'" in err


@pytest.fixture
def store_copy(store, tmp_path):
    """A copy of the store that a test may add runs to."""
    shutil.copy(store / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.get_experiment_by_name("tiny").experiment_id


def compare_main(uri, tmp_path, *args):
    return compare.main(["--experiment", "tiny", "--tracking_uri", uri, "--output", str(tmp_path),
                         "--reps", "50", *args])  # fmt: skip


def test_a_run_without_the_metric_is_named(store_copy, tmp_path, capsys):
    uri, client, exp_id = store_copy
    run = client.create_run(exp_id, run_name="no-eval")
    for key, value in zip(("engine", "prior", "value", "env_id", "seed"), (*DIRECT, "7")):
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "perf/env_steps_per_s", 1.0, step=50)
    client.set_terminated(run.info.run_id, "FINISHED")
    no_params = client.create_run(exp_id, run_name="no-params")
    client.set_terminated(no_params.info.run_id, "FINISHED")

    assert compare_main(uri, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbvi: error: cannot compare experiment 'tiny'")
    assert f"no-eval ({run.info.run_id}) lacks eval/return" in err
    assert (
        f"no-params ({no_params.info.run_id}) lacks engine, prior, value, env_id, seed, eval/return"
        in err
    )
    assert not (tmp_path / "tiny_returns.png").exists()


def test_a_metric_no_run_logged_lists_the_metrics_they_did(store, tmp_path, capsys):
    uri = f"sqlite:///{store}/mlflow.db"
    assert compare_main(uri, tmp_path, "--metric", "eval/retrun") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no finished run of experiment 'tiny' logged the metric 'eval/retrun'" in err
    assert "eval/return" in err.split("the metrics they logged:")[1]
    assert "Delete" not in err and not list(tmp_path.glob("*.png"))


def test_unfinished_runs_are_skipped(store_copy, tmp_path, capsys):
    uri, client, exp_id = store_copy
    client.create_run(exp_id, run_name="still-running")
    assert compare_main(uri, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "skipping unfinished runs: still-running (RUNNING)" in err
    assert "2 [0, 1]" in out and (tmp_path / "tiny_returns.png").exists()


def test_a_failed_run_is_never_counted(store_copy, tmp_path, capsys):
    """A FAILED run that logged everything a finished one does, and that no run resumed,
    is skipped and named: its curve stopped where it crashed."""
    uri, client, exp_id = store_copy
    run = client.create_run(exp_id, run_name="crashed")
    for key, value in zip(("engine", "prior", "value", "env_id", "seed"), (*DIRECT, "5")):
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "eval/return", 1e6, step=100)
    client.set_terminated(run.info.run_id, "FAILED")
    assert compare_main(uri, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "skipping unfinished runs: crashed (FAILED)" in err
    (row,) = [line for line in out.splitlines() if line.startswith("Direct")]
    assert "2 [0, 1]" in row and "1000000" not in row


def test_a_baseline_that_is_no_row_is_refused_before_anything_is_written(store, tmp_path, capsys):
    uri = f"sqlite:///{store}/mlflow.db"
    assert compare_main(uri, tmp_path, "--baseline", "SAC") == 2
    err = capsys.readouterr().err
    assert err.startswith("mbvi: error: --baseline 'SAC' matches no row. Rows")
    assert "Direct,UniformPrior,TwinQ,Pendulum-v1" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        compare_main(uri, tmp_path, "--reps", "0")
    assert "--reps must be >= 1, got 0" in capsys.readouterr().err


def test_an_interrupted_then_resumed_seed_counts_once(store_copy, tmp_path, capsys):
    """A run killed hard (left RUNNING, no end time) and the run resumed from its
    checkpoint (tagged mbvi.resumed_from) are one sample: neither skipped nor counted
    twice, and the wall-clock adds the first run's time up to its last logged point."""
    uri, client, exp_id = store_copy
    t0, ids = 1_700_000_000_000, []
    for name, start, step, value in [("half", t0, 100, -1e4), ("rest", t0 + 100_000, 200, 7.0)]:
        tags = {"mbvi.resumed_from": ids[-1]} if ids else {}
        run = client.create_run(exp_id, run_name=name, tags=tags, start_time=start)
        for key, param in zip(("engine", "prior", "value", "env_id", "seed"), (*DIRECT, "2")):
            client.log_param(run.info.run_id, key, param)
        client.log_metric(run.info.run_id, "eval/return", value, start + 60_000, step)
        ids.append(run.info.run_id)
    client.set_terminated(ids[-1], "FINISHED", end_time=t0 + 130_000)  # "half" stays RUNNING

    _, runs = load_runs(client, "tiny", "eval/return")
    (joined,) = [r for r in runs if r.seed == "2"]
    assert joined.curve == {100: -1e4, 200: 7.0} and joined.run_id == ids[-1]
    assert joined.duration_s == 60.0 + 30.0
    assert compare_main(uri, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "skipping" not in err and "more than one run" not in err
    (row,) = [line for line in out.splitlines() if line.startswith("Direct")]
    assert "3 [0, 1, 2]" in row


def test_another_metric_is_compared_and_plotted_under_its_own_name(store, tmp_path, capsys):
    uri = f"sqlite:///{store}/mlflow.db"
    assert compare_main(uri, tmp_path, "--metric", "loss/value") == 0
    assert "loss/value" in capsys.readouterr().out
    assert (tmp_path / "tiny_loss_value.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "tiny_returns.png").exists()


def test_a_folder_without_a_store_is_an_error_and_stays_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compare.main(["--experiment", "tiny"]) == 2
    assert f"no MLflow store at 'sqlite:///{tmp_path / 'mlflow.db'}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
