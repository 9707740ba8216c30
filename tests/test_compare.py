"""``mbvi compare``: the aggregation on synthetic runs, and the real entry point on a store
made by real tiny ``mbvi fit`` runs."""

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
from mbvi.errors import CheckpointError, ComparisonError
from mbvi.tracking import stats
from mbvi.tracking.compare import (
    GroupSummary,
    duplicate_seeds,
    final_value,
    format_settings,
    format_table,
    mean_std,
    summarize,
    truncate,
)
from mbvi.tracking.figures import improvement, improvement_by_group, plot_improvement
from mbvi.tracking.runs import (
    COMPARE_TAG,
    RunData,
    align,
    load_runs,
    mixed_settings,
    settings_between_rows,
)
from mbvi.training.checkpoints import validate_checkpoint
from tests.conftest import CONFIGS, MBVI, ROOT, cli_env

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")
SHORT = ["--model.total_env_steps", "200", "--model.eval_every", "100"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECT = ("Direct", "UniformPrior", "TwinQ", "Pendulum-v1")
ITERATIVE = ("Iterative", "ConstantTanhGaussianPrior", "TwinQ", "Pendulum-v1")


def run_data(group=DIRECT, seed="0", curve=None, **kw):
    return RunData(
        run_id=f"id-{group[0]}-{seed}",
        name=f"run-{seed}",
        group=group,
        seed=seed,
        curve=curve or {100: 0.0, 200: 1.0},
        duration_s=kw.pop("duration_s", 10.0),
        **kw,
    )


# ---- pure aggregation -------------------------------------------------------------------
def test_mean_std_is_the_population_std_over_seeds():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_final_value_is_at_the_last_step_whatever_the_order():
    assert final_value({300: -1.0, 100: 7.0, 200: 3.0}) == -1.0


def test_align_keeps_only_steps_common_to_all_seeds_in_order():
    steps, values = align([{300: 3.0, 100: 1.0, 200: 2.0}, {200: 20.0, 300: 30.0, 400: 40.0}])
    assert steps == [200, 300]
    np.testing.assert_array_equal(values, [[2.0, 3.0], [20.0, 30.0]])
    steps, values = align([{1: 0.0}, {2: 0.0}])
    assert steps == [] and values.shape == (2, 0)


def test_summarize_groups_by_design_choice():
    runs = [
        run_data(DIRECT, "1", {100: 0.0, 200: 4.0}, duration_s=30.0, env_steps=600),
        run_data(ITERATIVE, "0", {100: -5.0, 150: -3.0}, env_steps=150),
        run_data(DIRECT, "0", {100: 0.0, 250: 2.0}, duration_s=10.0, env_steps=400),
    ]
    direct, iterative = summarize(runs)  # sorted by group: Direct before Iterative
    assert direct.group == DIRECT and direct.seeds == ["0", "1"]
    assert (direct.final_mean, direct.final_std) == (3.0, 1.0)
    assert direct.env_steps == 200  # the smaller of the last steps 250 and 200
    assert direct.wall_clock_s == 20.0
    assert direct.steps_per_s == 30.0  # mean of 400 steps / 10 s and 600 steps / 30 s
    assert iterative.seeds == ["0"] and (iterative.final_mean, iterative.final_std) == (-3.0, 0.0)


def test_at_step_compares_runs_of_different_budgets_at_equal_steps():
    long = run_data(DIRECT, "0", {100: 1.0, 200: 2.0, 300: 9.0}, j_iter={0: {100: -1.0, 300: 0.0}})
    short = run_data(ITERATIVE, "0", {100: 3.0, 200: 4.0})
    direct, iterative = summarize(truncate([long, short], 200))
    assert (direct.final_mean, direct.env_steps) == (2.0, 200)
    assert (iterative.final_mean, iterative.env_steps) == (4.0, 200)
    assert truncate([long], 250)[0].j_iter == {0: {100: -1.0}}
    assert long.curve[300] == 9.0  # the runs read from the store are not modified
    with pytest.raises(ComparisonError, match=r"--at-step 50: .*run-0 \(first at 100\)"):
        truncate([long], 50)


def test_improvement_over_iterations_absolute_and_relative():
    j_iter = {
        0: {10: -2.0, 20: -4.0},
        1: {10: -1.0, 20: -3.0},
        2: {10: 0.0, 20: -2.0, 30: 5.0},  # step 30 has no J̃_0: left out
    }
    absolute, relative = improvement(j_iter)
    np.testing.assert_allclose(absolute, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(relative, [0.0, (0.5 + 0.25) / 2, (1.0 + 0.5) / 2])


def test_runs_with_different_iteration_counts_are_plotted_apart(tmp_path):
    """K = 2 and K = 10 runs of one engine/prior/value/env: two Fig. 2 lines."""
    k2 = {k: {10: -2.0 + k} for k in range(3)}
    k10 = {k: {10: -4.0 + 0.1 * k} for k in range(11)}
    runs = [
        run_data(ITERATIVE, "0", j_iter=k2),
        run_data(ITERATIVE, "1", j_iter=k2),
        run_data(ITERATIVE, "2", j_iter=k10),
        run_data(DIRECT, "0"),
    ]
    bands = improvement_by_group(runs)
    assert set(bands) == {(ITERATIVE, 2), (ITERATIVE, 10)}
    assert bands[(ITERATIVE, 2)][0].shape == (2, 3)
    np.testing.assert_allclose(bands[(ITERATIVE, 10)][0], [[0.1 * k for k in range(11)]])
    path = plot_improvement(runs, "mixed", tmp_path / "fig2.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_table_lists_each_group_with_seeds_and_mean_std():
    rows = summarize([run_data(DIRECT, "0"), run_data(DIRECT, "1", {100: 0.0, 200: 3.0})])
    table = format_table(rows, "eval/return")
    header, rule, line = table.splitlines()
    assert header.split()[:5] == ["engine", "prior", "value", "env", "seeds"]
    assert "final eval/return" in header and set(rule) <= {"-", " "}
    assert line.split()[:4] == list(DIRECT)
    assert "2 [0, 1]" in line and "2.00 ± 1.00" in line and "10.0 s" in line


def test_settings_that_differ_within_a_row_are_named():
    runs = [
        run_data(seed="0", params={"seed": "0", "batch_size": "256", "total_env_steps": "100000"}),
        run_data(seed="1", params={"seed": "1", "batch_size": "128", "total_env_steps": "50000"}),
        run_data(seed="2", params={"seed": "2", "batch_size": "128", "gamma": "0.9"}),
    ]
    assert mixed_settings(runs) == {"batch_size": ["128", "256"], "gamma": ["0.9", "<unset>"]}
    assert mixed_settings(runs[1:2]) == {}


def test_settings_that_differ_between_rows_are_named_beside_the_design_choices():
    """batch_size differs between rows: named.  Direct's and Iterative's own networks
    (engine.hidden) are part of the engine choice: not named; two Iterative rows (with
    different priors) that differ in engine.hidden: named.  Rows of another env are not
    compared with these."""
    constant = ("Iterative", "ConstantTanhGaussianPrior", "TwinQ", "Pendulum-v1")
    hopper = ("Direct", "UniformPrior", "TwinQ", "Hopper-v5")

    def row(group, **params):
        engine, prior, value, env_id = group
        base = {"engine": engine, "prior": prior, "value": value, "env_id": env_id}
        return run_data(group, params={**base, "gamma": "0.99", **params})

    runs = [
        row(DIRECT, batch_size="256", **{"engine.hidden": "(256, 256)"}),
        row(ITERATIVE[:1] + ("UniformPrior",) + ITERATIVE[2:], batch_size="128",
            **{"engine.hidden": "(64, 64)", "engine.n_samples": "200"}),
        row(constant, batch_size="128", **{"engine.hidden": "(32, 32)", "engine.n_samples": "200"}),
        row(hopper, batch_size="512", gamma="0.9"),
    ]  # fmt: skip
    groups = {r.group: [r] for r in runs}
    differ = settings_between_rows(groups)
    assert set(differ) == {"batch_size", "engine.hidden"}
    assert differ["batch_size"] == {DIRECT: "256", runs[1].group: "128", constant: "128"}
    assert differ["engine.hidden"] == {runs[1].group: "(64, 64)", constant: "(32, 32)"}
    note = format_settings(differ)
    assert note.startswith("Rows differ in settings other than engine, prior and value")
    assert "  batch_size: Direct · UniformPrior · TwinQ (Pendulum-v1) = 256; " in note
    assert settings_between_rows({DIRECT: runs[:1], hopper: runs[3:]}) == {}
    assert format_settings({}) == ""


def test_duplicate_seeds_are_reported():
    row = GroupSummary(DIRECT, ["0", "0", "1"], ["a", "b", "c"], 0.0, 0.0, 1, 1.0, 1.0)
    assert duplicate_seeds(row) == ["0"]


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
