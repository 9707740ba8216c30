"""The least KL(π‖p) a tanh-Gaussian posterior reaches under a prior program: the floor
below which an α target cannot be met (``mbvi.training.checks.kl_target_per_dim``).

Under a bimodal prior the floor is far from 0: a unimodal π that fits one of two
well-separated, equally weighted modes still pays about log 2 nats, because it leaves
the other mode's half of the mass out.  No closed form exists for a program, and a
cheap lower bound is useless (KL ≥ −H_max(π) − max log p is negative for any peaked
prior), so the floor is estimated the way an engine would approach it: minimise the
sample KL over (μ, log σ) of a tanh-Gaussian by Adam from several starts (one wide,
the others at the prior's own samples, so each mode gets a start) with fixed
standard-normal draws, then evaluate each result on fresh draws and keep the least.

What the figure is: the least KL that gradient descent from those starts finds, at the
state s = 0.  It is an estimate of an upper bound on the true floor (a better π may
exist that these starts miss); for a state-dependent program it holds at s = 0 only;
under importance-weighted latents it inherits their O(1/K) upward bias.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mbvi.variational.distributions import TanhGaussian

STARTS, STEPS, SAMPLES, EVAL_SAMPLES, LR = 8, 150, 64, 512, 0.05
"""Starts, Adam steps, fixed draws per step, fresh draws for the final figure, step size."""


def kl_floor_per_dim(
    log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: Callable[[torch.Tensor, int], torch.Tensor],
    obs_dim: int,
    act_dim: int,
    seed: int = 0,
) -> float:
    """min over the starts of KL(π_k‖p)/A at s = 0 (see the module doc), in nats.

    Args:
        log_prob: log p(a|s) for states [B,S] and actions [B,N,A] -> [B,N].
        sample: n actions per state from p: states [B,S] -> [B,n,A].
        obs_dim, act_dim: S and A.
        seed: seeds the draws; the caller's random streams are left as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s = torch.zeros(STARTS, obs_dim)
        with torch.no_grad():
            edge = 1.0 - 1e-4
            starts = sample(s[:1], STARTS - 1)[0].clamp(-edge, edge)  # [STARTS-1, A]
        loc = torch.cat([torch.zeros(1, act_dim), torch.atanh(starts)]).requires_grad_()
        log_scale = torch.cat(
            [torch.zeros(1, act_dim), torch.full((STARTS - 1, act_dim), -1.0)]
        ).requires_grad_()
        eps = torch.randn(STARTS, SAMPLES, act_dim)
        opt = torch.optim.Adam([loc, log_scale], lr=LR)
        for _ in range(STEPS):
            kl = _sample_kl(TanhGaussian(loc, log_scale), eps, s, log_prob)
            opt.zero_grad()
            kl.sum().backward()
            opt.step()
        with torch.no_grad():
            fresh = torch.randn(STARTS, EVAL_SAMPLES, act_dim)
            kl = _sample_kl(TanhGaussian(loc, log_scale), fresh, s, log_prob)
    return max(float(kl.min()), 0.0) / act_dim


def _sample_kl(pi: TanhGaussian, eps: torch.Tensor, s: torch.Tensor, log_prob) -> torch.Tensor:
    """Mean of log π(a) − log p(a|s) over a = tanh(μ + σ ε), per start [K]."""
    a, u = pi.transform(eps)
    return (pi.log_prob_u(u) - log_prob(s, a)).mean(-1)
