"""Self-normalised importance sampling in the Pyro optimality model: the Pyro-side
reference of ``mbvi.planners.ImportanceSampling`` (the agent's engine; a test checks
that the two agree), and the way to plan under a prior or dynamics written as a Pyro
program.  It returns the engine's posterior type, ``WeightedParticles``.

With the prior as proposal, particle n's log weight is the sum of the model's factor
sites, log p(O=1|τ_n) = [Σ_{t<H} γ^t r_t + γ^H Q̂(s_H, a_H)]/α, so the normalised
particles approximate the Boltzmann posterior of Eq. 11 (for H = 0 exactly prior
samples weighted by exp(Q̂/α)).  With a guide as proposal the weight is the usual
log p(τ, O) − log q(τ).  Everything is one vectorised trace over [B states, N particles].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from mbvi.pyro.model import OptimalityModel
from mbvi.pyro.sites import ACTION
from mbvi.variational.particles import WeightedParticles


def _site_log_probs(trace, keep: Callable[[str, dict], bool], zeros) -> torch.Tensor:
    """Σ over kept sample sites of their (discount-scaled) log-probs, [B,N]."""

    def kept(name, site):
        return site["type"] == "sample" and not site_is_subsample(site) and keep(name, site)

    trace.compute_log_prob(site_filter=kept)
    total = zeros
    for name, site in trace.nodes.items():
        if kept(name, site):
            total = total + site["log_prob"]
    return total


def importance_plan(
    model: OptimalityModel, states: torch.Tensor, guide: Callable | None = None
) -> WeightedParticles:
    """Self-normalised importance sampling of π(a_0|s,O) for states [B,S] (Eq. 11).

    Args:
        model: the optimality model; its prior may be any Pyro program.
        states: ``[B, S]``.
        guide: proposal; default the model's own prior (then only factor sites weigh).
    """
    zeros = states.new_zeros(states.shape[0], model.n_particles)
    with torch.no_grad():
        if guide is None:
            guide_trace = None
            trace = poutine.trace(model).get_trace(states)
            log_w = _site_log_probs(trace, lambda name, site: site["is_observed"], zeros)
        else:
            guide_trace = poutine.trace(guide).get_trace(states)
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(states)
            in_guide = guide_trace.nodes.keys()
            log_w = _site_log_probs(
                trace, lambda name, site: site["is_observed"] or name in in_guide, zeros
            ) - _site_log_probs(guide_trace, lambda name, site: True, zeros)
        log_w = log_w - log_w.logsumexp(-1, keepdim=True)
    return WeightedParticles(trace.nodes[f"{ACTION}_0"]["value"], log_w)
