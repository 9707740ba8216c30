"""``mbvi compare``'s aggregation, tables and figures on synthetic runs (the real entry
point on a store of real runs is in ``test_compare``)."""

import numpy as np
import pytest

from mbvi.errors import ComparisonError
from mbvi.tracking.compare import (
    GroupSummary,
    duplicate_seeds,
    final_value,
    format_settings,
    format_table,
    mean_std,
    row_warnings,
    summarize,
    truncate,
)
from mbvi.tracking.compare import main as compare_main
from mbvi.tracking.figures import improvement, improvement_by_group, plot_improvement
from mbvi.tracking.runs import (
    RunData,
    align,
    mixed_settings,
    settings_between_rows,
)

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


def test_runs_of_one_row_that_end_at_different_steps_are_named_with_the_fix():
    runs = [
        run_data(DIRECT, "0", {100: 0.0, 500: 1.0}),
        run_data(DIRECT, "1", {100: 0.0, 500: 1.0, 3400: 9.0}),
        run_data(ITERATIVE, "0", {100: 0.0, 500: 1.0}),
    ]
    groups = {DIRECT: runs[:2], ITERATIVE: runs[2:]}
    (warning,) = row_warnings(summarize(runs), groups)
    assert warning.startswith("Direct · UniformPrior · TwinQ (Pendulum-v1): its runs end at")
    assert "different env steps (500, 3400)" in warning and "--at-step 500" in warning
    cut = truncate(runs, 500)
    assert row_warnings(summarize(cut), {DIRECT: cut[:2], ITERATIVE: cut[2:]}) == []


def test_help_names_the_statistics(capsys):
    with pytest.raises(SystemExit):
        compare_main(["--help"])
    assert "95% bootstrap confidence intervals" in " ".join(capsys.readouterr().out.split())
