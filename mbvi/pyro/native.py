"""The optimality model's objective in plain torch: the hot-path twin of
``OptimalityModel.elbo`` (no Pyro, no ``torch.distributions``).

For each of B states it draws N trajectories a_t = tanh(u_t), u_t = μ_t + σ_t ε_t from
the posterior (a_0) and the policy (a_t, t >= 1), steps a deterministic model, and
returns the Monte-Carlo estimate of Eq. 7 truncated at H with a leaf value (Eq. 16 when
H = 0):

    J(s) = 1/N Σ_n [ Σ_{t<H} γ^t (r_t − α log π_t/p_t) + γ^H (Q̂(s_H,a_H) − α log π_H/p_H) ]

The trajectories come from ``mbvi.variational.rollouts.rollout`` and are scored by
``mbvi.variational.objectives.trajectory_return``, the definitions the agent's
model-based value uses; only the KL estimate differs: here every KL term is the sample
estimate log π_t/p_t, so that with the same samples this equals α·ELBO of the Pyro
model (a test checks it).  It is faster than the ELBO because it never inverts tanh,
evaluates log π(u)/p(u) from ε directly and drops the tanh Jacobians that cancel in the
ratio when the prior is a tanh-Gaussian.  Never inverting tanh also keeps it finite for
saturated actions (|u| > 9 rounds tanh(u) to ±1 in float32), where the Pyro model's
atanh(a) is infinite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mbvi.errors import ConfigError
from mbvi.pyro.model import OptimalityModel, Policy
from mbvi.pyro.sites import program_name
from mbvi.variational.distributions import TanhGaussian, tanh_log_det
from mbvi.variational.objectives import trajectory_return
from mbvi.variational.priors import Prior
from mbvi.variational.rollouts import per_particle, rollout
from mbvi.variational.world_model import Step

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_ratio(
    prior: Prior,
    s: torch.Tensor,
    a: torch.Tensor,
    u: torch.Tensor,
    eps: torch.Tensor,
    log_scale: torch.Tensor,
) -> torch.Tensor:
    """log π(a|s,O) − log p_θ(a|s) per row: states ``s`` [M,S], actions a = tanh(u)
    [M,A] with u = μ + σ ε, ``log_scale`` = log σ [M,A] -> [M]."""
    prior_dist = prior.distribution(s)
    if prior_dist is not None:
        # Both are tanh-Gaussians of the same u: the tanh Jacobians cancel.
        log_scale_p = prior_dist.log_scale
        z_p = (u - prior_dist.loc) * torch.exp(-log_scale_p)
        return (0.5 * (z_p.square() - eps.square()) + log_scale_p - log_scale).sum(-1)
    log_q = (-0.5 * eps.square() - log_scale - _HALF_LOG_2PI).sum(-1) - tanh_log_det(u)
    return log_q - prior.log_prob(s, a.unsqueeze(1), u.unsqueeze(1)).squeeze(1)


def _sampler(
    prior: Prior,
    posterior: TanhGaussian | None,
    policy: Policy | None,
    actions: torch.Tensor | None,
    b: int,
    n: int,
):
    """``act(s [M,S], t) -> (a_t [M,A], log π_t/p_t [M])`` for ``rollout``: a_t from the
    posterior (t = 0) or the policy, drawn as the guide draws them (or read from
    ``actions``), with the sample estimate of the log ratio."""

    def act(s: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = posterior if t == 0 and posterior is not None else policy(s)
        a_dim = d.loc.shape[-1]
        loc = d.loc.reshape(b, -1, a_dim).expand(b, n, a_dim).reshape(b * n, a_dim)
        log_scale = d.log_scale.reshape(b, -1, a_dim).expand(b, n, a_dim).reshape(b * n, a_dim)
        if actions is None:
            eps = torch.randn(b, n, a_dim, dtype=loc.dtype, device=loc.device).reshape(b * n, a_dim)
            u = torch.addcmul(loc, log_scale.exp(), eps)
            a = torch.tanh(u)
        else:
            a = actions[t].reshape(b * n, a_dim)
            u = torch.atanh(a)
            eps = (u - loc) * torch.exp(-log_scale)
        rows = s if s.shape[0] == b * n else s.repeat_interleave(n, 0)
        return a, _log_ratio(prior, rows, a, u, eps, log_scale)

    return act


class _Transition:
    """A deterministic ``OptimalityModel``'s dynamics and reward as a world model's
    ``step`` for ``rollout``: rows [B·N, ·] in, particles [B,N,·] for the callables."""

    def __init__(self, model: OptimalityModel, b: int, n: int):
        self.model, self.b, self.n = model, b, n

    def __call__(self, s: torch.Tensor, a: torch.Tensor, propagation=None) -> Step:
        shape = (self.b, self.n)
        s_p, a_p = s.reshape(*shape, -1), a.reshape(*shape, -1)
        reward = self.model.reward_fn(s_p, a_p).reshape(-1)
        nxt = self.model.dynamics(s_p, a_p).reshape(s.shape)
        return Step(nxt, reward, torch.zeros_like(reward))


def native_objective(
    model: OptimalityModel,
    states: torch.Tensor,
    posterior: TanhGaussian | None = None,
    policy: Policy | None = None,
    actions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J(s) of the module docstring for states [B,S] -> ([B], metrics): the model's
    trajectories through ``mbvi.variational.rollouts.rollout``, scored by
    ``trajectory_return`` (the one definition of the objective), with every KL term
    the sample estimate log π_t/p_t that the ELBO uses.

    Args:
        model: the parts (prior: an mbvi ``Prior``; deterministic dynamics).
        posterior: π(a_0|s_0,O) as a TanhGaussian [B,A]; default ``policy(states)``.
        policy: π(a_t|s_t,O) for t >= 1 (and t = 0 without ``posterior``).
        actions: optional fixed samples [H+1,B,N,A] (e.g. a Pyro guide trace's); by
            default fresh reparameterised samples, drawn in the guide's order.

    Metrics (detached, [B]): ``kl``, the path estimate Σ_t γ^t log π_t/p_t, and
    ``return``, Σ_{t<H} γ^t r_t + γ^H Q̂.
    """
    if not isinstance(model.prior, Prior):
        raise ConfigError(
            f"native_objective needs an mbvi Prior, got the program {program_name(model.prior)};"
            " evaluate a prior program with OptimalityModel.elbo"
        )
    b, n, horizon, gamma = states.shape[0], model.n_particles, model.horizon, model.gamma
    act = _sampler(model.prior, posterior, policy, actions, b, n)
    a0, kl0 = act(states, 0)
    roll = rollout(
        _Transition(model, b, n), states, a0.reshape(b, n, -1), horizon, model.prior, act=act
    )
    kl = torch.cat([kl0.reshape(1, b, n), roll.kl[1:]])
    leaf = per_particle(model.leaf_value, roll.states[-1] if horizon else states, roll.actions[-1])
    zero = torch.zeros_like(kl)
    j = trajectory_return(roll.rewards, kl, roll.alive, leaf, model.alpha, gamma).mean(-1)
    total_return = trajectory_return(roll.rewards, zero, roll.alive, leaf, 0.0, gamma)
    # Σ_t γ^t KL_t: the same sum with the rewards and the leaf zeroed and α = −1.
    total_kl = trajectory_return(roll.rewards * 0, kl, roll.alive, leaf * 0, -1.0, gamma)
    metrics = {"kl": total_kl.detach().mean(-1), "return": total_return.detach().mean(-1)}
    return j, metrics


def compiled_objective() -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``native_objective`` through ``torch.compile`` (inductor, static shapes), for
    act-sized batches: a planner's per-step call on one state × N particles.

    There eager torch spends its time dispatching a few hundred tiny ops, not
    computing; the compiled graph fuses the elementwise work and its backward.  At
    update-sized batches it is *slower* than eager (the matmuls dominate), so keep
    ``native_objective`` there.  ``benchmarks/pyro_overhead.py`` measures both;
    figures in docs/performance.md.

    Each new input shape, model or policy compiles once (tens of seconds on a CPU;
    inductor caches on disk), so it pays only in a loop that calls it many times.
    Fresh samples come from inductor's own generator (seeded from torch's), so they
    differ from the eager function's under the same seed; with fixed ``actions`` the
    two agree to float tolerance.  Same arguments and results as ``native_objective``.
    """
    return torch.compile(native_objective, dynamic=False)
