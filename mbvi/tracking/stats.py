"""Statistics over seeds for ``mbvi compare``, computed by rliable (Agarwal et al. 2021,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice").

* The interquartile mean (IQM): the mean of the middle half of the seeds' scores
  (``scipy.stats.trim_mean`` cutting a quarter at each end), less swayed by one lucky or
  unlucky seed than the mean and less noisy than the median.
* Its 95% confidence interval by the stratified bootstrap, percentile method: the seeds
  are resampled with replacement ``reps`` times and the interval spans the 2.5th to
  97.5th percentile of the resampled IQMs.
* The probability of improvement P(X > Y): the chance that a seed of row X scores above
  a seed of row Y (the Mann–Whitney U statistic over n_x·n_y, ties counting a half),
  with its 95% interval by bootstrapping each row's seeds independently.

A row is one env, so its scores are ``[seeds, 1]`` (rliable's runs × tasks).  rliable
draws its resamples from NumPy's global generator; every call here seeds that generator
for the call and restores it afterwards, so that a comparison is reproducible and the
caller's random state is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# rliable's default is 50,000 resamples, ~3-6 s a row on a 2-core machine.  At 10,000 the
# interval's ends move by under 1% of its width from one bootstrap seed to another
# (measured on 5 and 10 seeds; docs/compare.md), at a fifth of the time.
IQM_REPS = 10_000
# Each resample of the probability of improvement runs a Mann–Whitney U test (about
# 0.4 ms), so 50,000 would take 20 s a row; rliable's own examples use 2,000 for it.
POI_REPS = 2_000
# A curve's band is drawn, not read off as a number: 2,000 resamples (as rliable's
# examples use for their per-step curves' speed) keep a figure's bootstrap to ~a second.
CURVE_REPS = 2_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% confidence interval."""

    point: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.point:.2f} [{self.low:.2f}, {self.high:.2f}]"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _estimate(scores, func: Callable, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """rliable's point estimate and ``[2, ...]`` interval of ``func`` on ``scores`` (an
    array, or a tuple of arrays bootstrapped independently)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    from rliable import library as rly  # imports arch and statsmodels: seconds

    with _seeded(seed):
        points, intervals = rly.get_interval_estimates(
            {"x": scores}, func, reps=reps, confidence_interval_size=CONFIDENCE
        )
    return np.asarray(points["x"]), np.asarray(intervals["x"])


def _column(scores: Sequence[float]) -> np.ndarray:
    x = np.asarray(scores, dtype=float).reshape(-1, 1)
    if len(x) == 0:
        raise ValueError("no scores: a row needs at least one seed")
    return x


def iqm(scores: Sequence[float], reps: int = IQM_REPS, seed: int = 0) -> Interval:
    """IQM of one row's per-seed ``scores`` and its stratified-bootstrap 95% interval."""
    from rliable import metrics

    point, ci = _estimate(
        _column(scores), lambda x: np.array([metrics.aggregate_iqm(x)]), reps, seed
    )
    return Interval(float(point[0]), float(ci[0, 0]), float(ci[1, 0]))


def probability_of_improvement(
    x: Sequence[float], y: Sequence[float], reps: int = POI_REPS, seed: int = 0
) -> Interval:
    """P(a seed of ``x`` scores above a seed of ``y``) and its 95% interval, the seeds of
    each row resampled independently."""
    from rliable import metrics

    point, ci = _estimate((_column(x), _column(y)), metrics.probability_of_improvement, reps, seed)
    low, high = ci.ravel()
    return Interval(float(point), float(low), float(high))


def iqm_curve(
    values: np.ndarray, reps: int = CURVE_REPS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IQM over seeds at every step of ``values`` ``[seeds, steps]`` and its 95%
    band (point, low, high, each ``[steps]``), the seeds resampled as whole curves (one
    bootstrap for all steps, as rliable does for sample-efficiency curves)."""
    from scipy.stats import trim_mean

    scores = np.asarray(values, dtype=float)[:, None, :]  # [seeds, 1 task, steps]
    # For one task, rliable's aggregate_iqm at a step is this trimmed mean over seeds;
    # computing all steps at once keeps a resample to one call.
    point, ci = _estimate(scores, lambda s: trim_mean(s[:, 0, :], 0.25, axis=0), reps, seed)
    return point, ci[0], ci[1]
