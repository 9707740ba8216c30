"""``mbvi table``: Table 1 trained on the tiny preset through the real console script
(parallel ``mbvi fit`` processes writing one SQLite store), rendered, logged, re-rendered;
the failure paths on cheap fakes."""

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from mbvi.tracking import table as table_mod
from mbvi.tracking.runs import COMPARE_TAG
from mbvi.tracking.table import Job, run_jobs, speed_after_warmup
from mbvi.tracking.table_cells import COLUMNS, POSTERIORS, TABLE_1, TITLES, Skip
from mbvi.tracking.table_render import Measured, markdown, render
from tests.conftest import MBVI, cli_env

EXPERIMENT = "table-test"
TRAINED = sorted(cell for cell, spec in TABLE_1.items() if not isinstance(spec, Skip))
SKIPPED = sorted(cell for cell, spec in TABLE_1.items() if isinstance(spec, Skip))


def mbvi_table(cwd, *args) -> subprocess.CompletedProcess:
    cmd = [MBVI, "table", "--env", "Pendulum-v1", "--preset", "tiny", "--experiment",
           EXPERIMENT, *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{row title: its cells} of the markdown table in ``stdout``."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    rows = [line.strip("|").split(" | ") for line in lines[2:]]  # past the head and the rule
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The whole tiny table, two runs at once (both cores), once for the module."""
    cwd = tmp_path_factory.mktemp("table")
    done = mbvi_table(cwd, "--steps", "120", "--jobs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cwd, done


def test_every_cell_is_a_value_or_a_dash_with_its_note(trained):
    _, done = trained
    rows = table_rows(done.stdout)
    assert list(rows) == [TITLES[p] for p in POSTERIORS]
    for posterior in POSTERIORS:
        for (value, prior), text in zip(COLUMNS, rows[TITLES[posterior]], strict=True):
            if (posterior, value, prior) in SKIPPED:
                assert text.startswith("— [1]"), text
            else:
                assert "±" in text and "steps/s" in text and "ms/step" in text, text
    assert "[1] SMC plans H steps through a world model" in done.stdout
    assert "FAILED" not in done.stdout


def test_the_experiment_holds_one_finished_run_per_cell_and_the_table_run(trained):
    cwd, _ = trained
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    fits = [r for r in runs if COMPARE_TAG not in r.data.tags]
    assert sorted(r.info.run_name for r in fits) == sorted(
        f"table-{p}-{v}-{q}-seed0" for p, v, q in TRAINED
    )
    assert {r.info.status for r in fits} == {"FINISHED"}
    assert sorted(table_mod.cell_of(r.data.params) for r in fits) == TRAINED
    (logged,) = [r for r in runs if r.info.run_name == "table"]
    assert logged.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {f"{EXPERIMENT}_table1.png", "table1.md"} <= artifacts
    assert (cwd / f"{EXPERIMENT}_table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_only_redraws_the_table_without_training(trained):
    cwd, first = trained
    again = mbvi_table(cwd, "--render-only")
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stdout
    assert table_rows(again.stdout) == table_rows(first.stdout)


# ---- failure paths, on cheap fakes ------------------------------------------------------
def test_an_unknown_env_names_the_envs_that_have_configs(tmp_path):
    done = subprocess.run([MBVI, "table", "--env", "Pendulum-v9"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert "no 'tiny' Table 1 configs for env 'Pendulum-v9'" in done.stderr
    assert "Pendulum-v1 (tiny in" in done.stderr


def test_run_jobs_runs_everything_and_names_the_failures(tmp_path):
    ok = [sys.executable, "-c", "import os; assert os.environ['OMP_NUM_THREADS'] == '1'"]
    bad = [sys.executable, "-c", "raise SystemExit('boom')"]
    jobs = [Job(("direct", "model-free", "uniform"), f"ok{i}", ok) for i in range(3)]
    jobs.insert(1, Job(("smc", "model-based", "learned"), "bad", bad))
    failed = run_jobs(jobs, 2, tmp_path)
    assert list(failed) == ["bad"]
    assert "boom" in failed["bad"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.log",
        "ok0.log",
        "ok1.log",
        "ok2.log",
    ]


def test_a_failed_cell_is_marked_and_named_and_the_others_kept():
    done = Measured(-150.0, 10.0, 2, 50.0, "TwinQ")
    cells = {("direct", "model-free", "uniform"): done}
    failed = {("smc", "model-based", "learned"): ["table-smc-model-based-learned-seed0"]}
    head, body, notes = render(cells, failed, "Pendulum-v1")
    text = markdown(head, body, notes)
    rows = table_rows(text)
    assert rows[TITLES["direct"]][0] == "-150.0 ± 10.0 (n=2) · 50.0 steps/s · 20.0 ms/step"
    assert rows[TITLES["smc"]][3] == "FAILED [2]"
    assert "[2] FAILED: table-smc-model-based-learned-seed0" in text
    assert rows[TITLES["iterative"]][0] == "not run"


def test_a_run_that_fails_makes_the_command_exit_1(tmp_path, monkeypatch, capsys):
    # One cell whose config is rejected (no particles), every other cell skipped.
    cell = ("importance", "model-free", "uniform")
    fake = {c: Skip("skipped here") for c in TABLE_1}
    fake[cell] = ("--model.engine=mbvi.planners.ImportanceSampling", "--model.engine.n_particles=0")
    monkeypatch.setattr(table_mod, "TABLE_1", fake)
    monkeypatch.chdir(tmp_path)
    status = table_mod.main(["--env", "Pendulum-v1", "--experiment", "failing"])
    out = capsys.readouterr()
    assert status == 1
    assert "FAILED [2]" in out.out  # [1]: the cells skipped here
    assert "[2] FAILED: table-importance-model-free-uniform-seed0 (log: " in out.out
    assert (
        "n_particles"
        in (tmp_path / "failing_logs" / "table-importance-model-free-uniform-seed0.log").read_text()
    )


def test_speed_after_warmup_is_total_steps_over_total_time():
    # windows of 50 steps: warm-up ones (fast, no updates) are left out
    assert speed_after_warmup(
        [(50, 1000.0), (100, 1000.0), (150, 50.0), (200, 25.0)], 100
    ) == pytest.approx(1 / ((1 / 50 + 1 / 25) / 2))
    assert speed_after_warmup([(50, 10.0)], 100) == 10.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--configs", "/nowhere"], "--configs '/nowhere' is not a folder"),
    ],
)
def test_bad_options_are_refused_before_any_run_starts(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        table_mod.main(["--env", "Pendulum-v1", "--output", str(tmp_path), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
