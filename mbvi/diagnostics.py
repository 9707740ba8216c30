"""Inference diagnostics of the paper's §4: the amortisation gap."""

from __future__ import annotations

import torch

from mbvi.distributions import TanhGaussian
from mbvi.objectives import Objective
from mbvi.planners.base import InferenceEngine
from mbvi.planners.gradient import GradientRefinement


def objective_value(
    objective: Objective, posterior: TanhGaussian, n_samples: int, seed: int = 0
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
    objective: Objective,
    n_eval: int = 256,
) -> dict[str, float]:
    """J̃ after per-state gradient refinement minus J̃ of the engine's estimate, on the
    same states ``s`` [B,S] (Cremer et al.'s amortisation gap; ≥ 0 up to noise).

    Returns ``inference/j_engine``, ``inference/j_refined`` and
    ``inference/amortisation_gap`` (means over states).
    """
    with torch.set_grad_enabled(engine.needs_objective_gradients):
        estimate = engine.infer(s, objective).detach()
    refined = refiner.refine(s, objective, init=estimate)
    j_engine = objective_value(objective, estimate, n_eval).mean()
    j_refined = objective_value(objective, refined, n_eval).mean()
    return {
        "inference/j_engine": j_engine.item(),
        "inference/j_refined": j_refined.item(),
        "inference/amortisation_gap": (j_refined - j_engine).item(),
    }
