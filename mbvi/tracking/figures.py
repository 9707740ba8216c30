"""The figures of ``mbvi compare`` (Agg backend: no display needed), and the data of
Fig. 2.  Built on ``mbvi.tracking.runs`` and ``mbvi.tracking.stats`` alone: the comparison
imports this module, never the other way round."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mbvi.tracking import stats  # noqa: E402
from mbvi.tracking.runs import Curve, Group, RunData, align, group_runs, label  # noqa: E402
from mbvi.tracking.stats import Interval  # noqa: E402


def improvement(j_iter: dict[int, Curve]) -> tuple[np.ndarray, np.ndarray]:
    """One run's mean over logged steps of J̃_k − J̃_0 and of (J̃_k − J̃_0)/|J̃_0|,
    each ``[K+1]`` (k = 0 is 0); steps where J̃_0 = 0 are left out of the relative."""
    absolute, relative = [], []
    for k in range(max(j_iter) + 1):
        steps, values = align([j_iter[0], j_iter.get(k, {})])
        diff, scale = values[1] - values[0], np.abs(values[0])
        ok = scale > 0
        absolute.append(diff.mean() if steps else np.nan)
        relative.append((diff[ok] / scale[ok]).mean() if ok.any() else np.nan)
    return np.array(absolute), np.array(relative)


def improvement_by_group(
    runs: Sequence[RunData],
) -> dict[tuple[Group, int], tuple[np.ndarray, np.ndarray]]:
    """Fig. 2's data: for each (group, K) of the runs that logged J̃ per iteration, the
    absolute and relative ``improvement`` of every seed, each ``[seeds, K+1]``.  Runs
    with different K (say 2 and 10) in one group are kept apart."""
    by_k: dict[tuple[Group, int], list[RunData]] = {}
    for group, members in group_runs([r for r in runs if r.j_iter]).items():
        for r in members:
            by_k.setdefault((group, max(r.j_iter)), []).append(r)
    out = {}
    for key, members in by_k.items():
        absolute, relative = zip(*(improvement(r.j_iter) for r in members))
        out[key] = (np.stack(absolute), np.stack(relative))
    return out


def _band(ax, x, values: np.ndarray, text: str) -> None:
    """Mean ± std over the rows of ``values`` [runs, len(x)] as a line and a band."""
    mean, std = values.mean(0), values.std(0)
    (line,) = ax.plot(x, mean, marker="." if len(x) < 30 else None, label=text)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(
    runs: Sequence[RunData],
    metric: str,
    title: str,
    path: Path,
    finals: dict[str, Interval | None] | None = None,
    reps: int = stats.CURVE_REPS,
) -> Path:
    """Paper Fig. 3b: ``metric`` vs env steps per group, the IQM over seeds with its 95%
    stratified-bootstrap band (``reps`` resamples), on the steps that every seed of the
    group logged.  With ``finals`` (row label -> the IQM of its final values and its
    interval, as in the table), a second panel draws those intervals side by side."""
    fig, axes = plt.subplots(
        1, 2 if finals else 1, figsize=(13 if finals else 7, 4.5), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]} if finals else None,
    )  # fmt: skip
    ax, colors = axes[0, 0], {}
    for group, members in group_runs(runs).items():
        steps, values = align([r.curve for r in members])
        if not steps:
            print(f"mbvi compare: {label(group)}: no common step, not plotted", file=sys.stderr)
            continue
        n = len(members)
        point, low, high = stats.iqm_curve(values, reps)
        text = f"{label(group)}, {n} seed{'s' if n > 1 else ''}"
        (line,) = ax.plot(steps, point, marker="." if len(steps) < 30 else None, label=text)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        colors[label(group)] = line.get_color()
    ax.set(xlabel="environment steps", ylabel=f"{metric} (IQM, 95% CI)", title=title)
    if finals:
        _plot_finals(axes[0, 1], finals, colors, metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_finals(ax, finals: dict[str, Interval | None], colors: dict[str, str], metric: str):
    """The final IQM of each row as a point with its 95% interval as a bar."""
    shown = [(text, iv) for text, iv in finals.items() if iv is not None]
    for y, (text, iv) in enumerate(shown):
        color = colors.get(text, "black")
        ax.plot([iv.low, iv.high], [y, y], color=color, linewidth=6, alpha=0.4,
                solid_capstyle="butt")  # fmt: skip
        ax.plot([iv.point], [y], marker="|", markersize=14, color=color)
    ax.set_yticks(range(len(shown)), [text.replace(" (", "\n(") for text, _ in shown],
                  fontsize="small")  # fmt: skip
    ax.set_ylim(-0.5, len(shown) - 0.5)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set(xlabel=f"final {metric}: IQM over seeds, 95% CI", title="final value")
    ax.grid(alpha=0.3, axis="x")


def plot_improvement(runs: Sequence[RunData], title: str, path: Path) -> Path:
    """Paper Fig. 2 from training logs: J̃_k − J̃_0 and (J̃_k − J̃_0)/|J̃_0| vs inference
    iteration k, each run's mean over its logged steps, then mean ± std over the group's
    seeds."""
    bands = {f"{label(group)}, K={k}": v for (group, k), v in improvement_by_group(runs).items()}
    return plot_iteration_bands(bands, title, path)


def plot_iteration_bands(
    bands: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path
) -> Path:
    """Fig. 2's two panels: for each label, the absolute and relative improvement
    ``[rows, K+1]`` (rows: seeds, or episodes of one agent) as mean ± std over rows
    against the inference iteration k."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for text, per_row in bands.items():
        for ax, values in zip(axes, per_row):
            _band(ax, np.arange(values.shape[1]), values, text)
    j_k, j_0 = r"\tilde{J}_k", r"\tilde{J}_0"
    axes[0].set(xlabel="iteration k", ylabel=f"${j_k} - {j_0}$", title=f"{title}: absolute")
    axes[1].set(xlabel="iteration k", ylabel=f"$({j_k} - {j_0}) / |{j_0}|$", title="relative")
    for ax in axes:
        ax.set_xticks(range(int(ax.get_xlim()[1]) + 1))
    return _save(fig, axes, path)


def model_error_figure(curves: dict[int, Sequence[float]]) -> plt.Figure:
    """A world model's open-loop error against the horizon, one line per refit
    (``curves``: env step -> error at horizons 1, 2, ...; at most six refits drawn,
    spread over the run)."""
    steps = sorted(curves)
    if len(steps) > 6:
        steps = [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for step in steps:
        errors = curves[step]
        ax.plot(range(1, len(errors) + 1), errors, marker=".", label=f"refit at {step}")
    ax.set_xlabel("horizon (model steps, open loop)")
    ax.set_ylabel("MSE / state variance")
    ax.set_yscale("log")
    ax.set_title("world model error over the horizon")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
