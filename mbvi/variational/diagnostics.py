"""Inference diagnostics of the paper's §4: improvement over inference iterations
(Fig. 2) and the amortisation gap."""

from __future__ import annotations

import torch

from mbvi.planners.base import InferenceEngine
from mbvi.planners.gradient import GradientRefinement
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective


def objective_value(
    objective: TrajectoryObjective, posterior: TanhGaussian, n_samples: int, seed: int = 0
) -> torch.Tensor:
    """J̃ (Eq. 16) per state ``[B]`` with fixed noise, so that two posteriors are
    compared on the same draws (common random numbers)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        j, _ = objective(posterior.detach(), n_samples)
    return j


def amortisation_gap(
    engine: InferenceEngine,
    refiner: GradientRefinement,
    s: torch.Tensor,
    objective: TrajectoryObjective,
    n_eval: int = 256,
) -> dict[str, float]:
    """J̃ after per-state gradient refinement minus J̃ of the engine's estimate, on the
    same states ``s`` [B,S] (Cremer et al.'s amortisation gap; ≥ 0 up to noise).

    Returns ``inference/j_engine``, ``inference/j_refined`` and
    ``inference/amortisation_gap`` (means over states).
    """
    with torch.no_grad():
        estimate = engine.infer(s, objective)
    refined = refiner.refine(s, objective, init=estimate)
    j_engine = objective_value(objective, estimate, n_eval).mean()
    j_refined = objective_value(objective, refined, n_eval).mean()
    return {
        "inference/j_engine": j_engine.item(),
        "inference/j_refined": j_refined.item(),
        "inference/amortisation_gap": (j_refined - j_engine).item(),
    }


def check_iterative(engine: InferenceEngine) -> None:
    """Raise ValueError unless ``engine`` infers in iterations (has ``unroll``)."""
    if not callable(getattr(engine, "unroll", None)):
        raise ValueError(
            f"{type(engine).__name__} does not infer in iterations, so it has no "
            "improvement per iteration: use an agent trained with an iterative engine "
            "(mbvi.planners.Iterative)"
        )


def iteration_values(
    engine: InferenceEngine,
    s: torch.Tensor,
    objective: TrajectoryObjective,
    n_eval: int = 64,
    seed: int = 0,
    batch: int = 256,
) -> torch.Tensor:
    """J̃ (Eq. 16) of each inference iterate λ_0 … λ_K per state: ``[K+1, B]``.

    Every iterate of a state is scored on the same ``n_eval`` draws (common random
    numbers), so J̃_k − J̃_0 measures what the iterations gained, not sampling noise.
    States run ``batch`` at a time.  Raises ValueError for an engine without
    iterations (one with no ``unroll``, e.g. ``Direct``).
    """
    check_iterative(engine)
    parts = []
    for start in range(0, s.shape[0], batch):
        rows = slice(start, start + batch)
        part = objective.subset(rows)
        with torch.no_grad():  # ∇λJ̃ is still taken inside the engine; φ gets no graph
            posteriors, _ = engine.unroll(s[rows], part)
        parts.append(torch.stack([objective_value(part, p, n_eval, seed) for p in posteriors]))
    return torch.cat(parts, dim=1)


def iteration_improvement(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 2's curves from ``iteration_values`` [K+1, B] of one episode's states:
    absolute mean J̃_k − mean J̃_0 and relative (J̃_k − J̃_0) / |J̃_0|, each [K+1]."""
    mean = values.mean(dim=1)
    absolute = mean - mean[0]
    return absolute, absolute / mean[0].abs()
