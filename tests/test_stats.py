"""The statistics of ``mbvi compare`` (``mbvi.tracking.stats``) against rliable called
directly on a fixed table of returns, and the module layout that keeps compare and its
figures from importing each other."""

import subprocess
import sys

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics
from scipy.stats import trim_mean

from mbvi.errors import ComparisonError
from mbvi.tracking import stats
from mbvi.tracking.compare import add_intervals, find_baselines, format_table, summarize
from mbvi.tracking.runs import RunData, group_runs

REPS = 300  # enough to exercise the bootstrap, fast enough for the suite
# Final returns of five seeds per arm, as `mbvi compare` reads them: a direct arm, an
# iterative arm with one unlucky seed (the IQM drops it, the mean does not) and a short
# arm of two seeds.
DIRECT = [2289.0, 2410.5, 1980.2, 2655.1, 2120.7]
ITERATIVE = [2792.3, 3011.8, 2540.6, 812.4, 2905.0]
SHORT = [1500.0, 1720.0]


def rliable_direct(scores: dict, func, reps: int, seed: int = 0):
    """rliable's own call, seeded as it must be (its bootstrap draws from NumPy's
    global generator)."""
    np.random.seed(seed)
    return rly.get_interval_estimates(scores, func, reps=reps)


def iqm_func(x):
    return np.array([metrics.aggregate_iqm(x)])


@pytest.mark.parametrize("scores", [DIRECT, ITERATIVE, SHORT, [42.0]])
def test_iqm_and_its_interval_match_rliable(scores):
    column = np.array(scores)[:, None]
    points, intervals = rliable_direct({"arm": column}, iqm_func, REPS)
    got = stats.iqm(scores, reps=REPS)
    assert got.point == pytest.approx(points["arm"][0], abs=1e-9)
    assert (got.low, got.high) == pytest.approx(tuple(intervals["arm"][:, 0]), abs=1e-9)
    assert got.low <= got.point <= got.high


def test_the_iqm_is_the_mean_of_the_middle_seeds_and_ignores_one_outlier():
    got = stats.iqm(ITERATIVE, reps=REPS)
    assert got.point == pytest.approx(np.mean(sorted(ITERATIVE)[1:4]))  # 5 seeds: cut 1 a side
    assert got.point > np.mean(ITERATIVE) + 300  # the unlucky 812 seed weighs on the mean


def test_probability_of_improvement_matches_rliable():
    x, y = np.array(ITERATIVE)[:, None], np.array(DIRECT)[:, None]
    points, intervals = rliable_direct({"it,dir": (x, y)}, metrics.probability_of_improvement, REPS)
    got = stats.probability_of_improvement(ITERATIVE, DIRECT, reps=REPS)
    assert got.point == pytest.approx(float(points["it,dir"]), abs=1e-9)
    assert (got.low, got.high) == pytest.approx(tuple(intervals["it,dir"].ravel()), abs=1e-9)
    # Three iterative seeds beat all 5 direct ones, 2540.6 beats 4, 812.4 none: 19 of 25.
    assert got.point == pytest.approx(19 / 25)
    assert stats.probability_of_improvement(DIRECT, DIRECT, reps=REPS).point == 0.5


def test_the_curve_band_is_rliables_per_step_iqm():
    values = np.array([DIRECT, ITERATIVE, [0.0, 1.0, 2.0, 3.0, 4.0]]).T  # [5 seeds, 3 steps]

    def per_step(scores):  # rliable's README form for sample-efficiency curves
        return np.array([metrics.aggregate_iqm(scores[..., t]) for t in range(scores.shape[-1])])

    points, intervals = rliable_direct({"arm": values[:, None, :]}, per_step, REPS)
    point, low, high = stats.iqm_curve(values, reps=REPS)
    np.testing.assert_allclose(point, points["arm"], atol=1e-9)
    np.testing.assert_allclose(low, intervals["arm"][0], atol=1e-9)
    np.testing.assert_allclose(high, intervals["arm"][1], atol=1e-9)
    np.testing.assert_allclose(point, trim_mean(values, 0.25, axis=0))


def test_the_bootstrap_repeats_and_leaves_the_callers_random_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = stats.iqm(DIRECT, reps=REPS)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert stats.iqm(DIRECT, reps=REPS) == first
    ten = DIRECT + ITERATIVE  # few seeds have few distinct resamples: use ten to see
    assert stats.iqm(ten, reps=REPS, seed=1) != stats.iqm(ten, reps=REPS)  # the seed picks them
    with pytest.raises(ValueError, match="reps must be >= 1, got 0"):
        stats.iqm(DIRECT, reps=0)


def runs_of(arms: dict[str, list[float]]) -> list[RunData]:
    return [
        RunData(
            f"{engine}-{i}",
            f"run-{i}",
            (engine, "UniformPrior", "TwinQ", "HalfCheetah-v5"),
            str(i),
            {100: 0.0, 50_000: r},
            1.0,
        )  # fmt: skip
        for engine, returns in arms.items()
        for i, r in enumerate(returns)
    ]


def test_rows_get_the_iqm_and_the_probability_of_improvement_over_the_baseline():
    runs = runs_of({"Direct": DIRECT, "Iterative": ITERATIVE})
    groups = group_runs(runs)
    baselines = find_baselines(list(groups), "Direct")
    direct, iterative = add_intervals(summarize(runs), groups, baselines, REPS)
    assert iterative.iqm == stats.iqm(ITERATIVE, REPS)
    assert iterative.improvement == stats.probability_of_improvement(ITERATIVE, DIRECT, REPS)
    assert direct.improvement is None and direct.baseline == direct.group
    table = format_table([direct, iterative], "eval/return")
    assert "IQM [95% CI]" in table and "P(> baseline) [95% CI]" in table
    direct_line, iterative_line = table.splitlines()[2:]
    assert str(direct.iqm) in direct_line and "baseline" in direct_line
    assert f"{iterative.improvement.point:.2f} [" in iterative_line
    markdown = format_table([direct, iterative], "eval/return", markdown=True).splitlines()
    assert markdown[0].startswith("| engine") and set(markdown[1]) <= {"|", "-"}
    assert str(iterative.iqm) in markdown[3] and markdown[3].count("|") == markdown[0].count("|")


def test_a_baseline_that_matches_no_row_or_several_is_refused_with_the_rows():
    groups = list(group_runs(runs_of({"Direct": DIRECT, "Iterative": ITERATIVE})))
    with pytest.raises(ComparisonError, match=r"--baseline 'SAC' matches no row\. Rows .*"
                       r"Direct,UniformPrior,TwinQ,HalfCheetah-v5"):  # fmt: skip
        find_baselines(groups, "SAC")
    with pytest.raises(ComparisonError, match=r"matches 2 rows of HalfCheetah-v5: .* Add the "
                       r"parts that single one out, e\.g\. --baseline Direct,UniformPrior"):  # fmt: skip
        find_baselines(groups, "UniformPrior")
    assert find_baselines(groups, " Iterative , TwinQ") == {"HalfCheetah-v5": groups[1]}


def test_figures_and_compare_do_not_import_each_other():
    """In a fresh interpreter: the grouping loads without either, the figures load
    before and without the comparison, and the comparison loads after them."""
    code = (
        "import sys; import mbvi.tracking.runs; "
        "assert not {'mbvi.tracking.compare', 'mbvi.tracking.figures'} & set(sys.modules); "
        "import mbvi.tracking.figures; "
        "assert 'mbvi.tracking.compare' not in sys.modules, 'figures imports compare'; "
        "import mbvi.tracking.compare"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
