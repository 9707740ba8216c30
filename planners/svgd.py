"""Stein variational gradient descent on the Boltzmann posterior (Eq. 11; Liu & Wang,
2016, "Stein Variational Gradient Descent", Algorithm 1)."""

from __future__ import annotations

import torch

from mbvi.errors import ConfigError
from mbvi.planners._gradient_tools import check_count
from mbvi.planners._sampling import ProposalEngine, check_mode, propose, rbf_kernel
from mbvi.planners.base import InferenceEngine
from mbvi.variational.distributions import tanh_log_det
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles


class SVGD(ProposalEngine):
    """K particles moved towards π(a|s,O) ∝ p_θ(a|s) exp(Q̂(s,a)/α) (Eq. 11).

    The particles live in pre-tanh space, a = tanh(u), where the target density is

        log π(u) = Q̂(s, tanh u)/α + log p_θ(tanh u|s) + log|d tanh(u)/du| + const

    (the tanh Jacobian makes it a density in u; with a tanh-Gaussian prior the last
    two terms are the prior's Gaussian in u), so no particle ever leaves [-1, 1]^A and
    none needs clamping.  Liu & Wang's Algorithm 1, per state::

        u_k ~ q(·|s)                            q = p_θ, or the proposal's posterior
        for t = 1..steps:
            φ(u_i) = 1/K Σ_j [ k(u_j,u_i) ∇_{u_j} log π(u_j) + ∇_{u_j} k(u_j,u_i) ]
            u ← u + Adam(φ)                      (step size decaying linearly to 0)

    with the RBF kernel k and its median bandwidth (``_sampling.rbf_kernel``).  Adam
    acts per coordinate, so every state moves independently and a Q̂ of any scale
    gets steps of about ``step_size``; the decay lets the particles settle on the
    fixed point φ = 0 instead of circling it.  Q̂ must be differentiable in the
    actions.  Returns equally weighted particles (no proposal density: ``kl`` has no
    estimate; the agent's loss metrics use the moment-matched tanh-Gaussian).

    Args:
        n_particles: K particles per state.
        steps: SVGD updates per call.
        step_size: Adam's initial step size on u (pre-tanh units), decayed to 0.
        proposal: an engine whose posterior draws the initial particles (trained
            through this engine's ``loss``); None draws them from the prior.
        mode: ``mean`` or ``best`` for ``mean_action`` (all weights are equal, so
            ``best`` is the first particle).
    """

    def __init__(
        self,
        n_particles: int = 32,
        steps: int = 50,
        step_size: float = 0.05,
        proposal: InferenceEngine | None = None,
        mode: str = "mean",
    ):
        super().__init__()
        check_count("SVGD", "n_particles", n_particles)
        check_count("SVGD", "steps", steps)
        if not step_size > 0:
            raise ConfigError(f"SVGD: step_size must be > 0, got {step_size}")
        check_mode("SVGD", mode)
        self.n_particles, self.steps, self.step_size = n_particles, steps, step_size
        self.mode = mode
        self._set_proposal(proposal)

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective) -> WeightedParticles:
        self.check_states(s, self.obs_dim)
        with torch.no_grad():
            posterior = self.proposal_posterior(s, objective)
            start = propose(objective.prior, s, self.n_particles, posterior).u
        u = start.detach().clone()
        opt = torch.optim.Adam([u], lr=self.step_size, maximize=True)
        for t in range(self.steps):
            opt.param_groups[0]["lr"] = self.step_size * (1.0 - t / self.steps)
            u.grad = self.direction(u, objective)
            opt.step()
        with torch.no_grad():
            # A state whose particles diverged (a non-finite Q̂) falls back to its start.
            broken = ~torch.isfinite(u).flatten(1).all(-1)
            u = torch.where(broken[:, None, None], start, u.detach())
            log_w = u.new_zeros(u.shape[:2])
            return WeightedParticles(torch.tanh(u), log_w, None, u, self.mode, broken)

    def direction(self, u: torch.Tensor, objective: TrajectoryObjective) -> torch.Tensor:
        """The SVGD direction φ ``[B,K,A]`` at particles ``u`` (Algorithm 1, line 3)."""
        s, k = objective.states, u.shape[1]
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            a = torch.tanh(x)
            q = objective.value(s, a)
            if not q.requires_grad:
                raise ValueError(
                    "SVGD: the objective's value estimate returns no gradient w.r.t. the "
                    "actions; SVGD follows ∇_a Q̂, so pass a value that is differentiable "
                    "in the actions (e.g. partial(value, frozen=True)) and a "
                    "differentiable world model"
                )
            log_target = q / objective.alpha + objective.prior.log_prob(s, a, x) + tanh_log_det(x)
            (score,) = torch.autograd.grad(log_target.sum(), x)
        score = torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            kern, h = rbf_kernel(u)
            drive = kern @ score  # Σ_j k_ij ∇log π(u_j)
            # Σ_j ∇_{u_j} k(u_j, u_i) = (2/h) Σ_j (u_i − u_j) k_ij: pushes particles apart.
            repulse = (2.0 / h) * (u * kern.sum(-1, keepdim=True) - kern @ u)
            return (drive + repulse) / k
