"""The learned world model: an ensemble of Gaussian MLPs over (Δs, r) (PETS/MBPO style),
all members evaluated as one batched matmul.

Shapes: E members, M rows, S state dims, A action dims, D = S + A inputs, S + 1 targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbvi.errors import ConfigError
from mbvi.variational.world_model import Prediction, Propagation, Step, WorldModel


class _EnsembleSiLU(nn.Module):
    """E SiLU MLPs as batched matmuls: x [E,M,in] -> [E,M,out]."""

    def __init__(self, members: int, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)
            self.weights.append(
                nn.Parameter(torch.empty(members, d_in, d_out).uniform_(-bound, bound))
            )
            self.biases.append(nn.Parameter(torch.zeros(members, 1, d_out)))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``members`` (indices [E']) runs only those members; x is then [E',M,in]."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if members is not None:
                w, b = w[members], b[members]
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = F.silu(x)
        return x


class DynamicsEnsemble(WorldModel):
    """E members, each a diagonal Gaussian over (Δs, r) given (s, a).

    Inputs and targets are normalised by statistics fitted on the data
    (``fit_normalisers``) and kept as buffers, so a saved model predicts in env units.
    Log-variances are soft-bounded by learned maxima and minima (PETS).  ``step``
    draws only from the elites, the members with the lowest hold-out error.

    Args:
        members: E, ensemble members.
        elites: members used for prediction (chosen by hold-out error), <= members.
        hidden: widths of each member's hidden layers (SiLU).
        learned_termination: learn a termination head (for envs with no known rule).
    """

    def __init__(
        self,
        members: int = 7,
        elites: int = 5,
        hidden: Sequence[int] = (200, 200, 200, 200),
        learned_termination: bool = False,
    ):
        super().__init__()
        if members < 1:
            raise ConfigError(f"DynamicsEnsemble: members must be >= 1, got {members}")
        if not 1 <= elites <= members:
            raise ConfigError(
                f"DynamicsEnsemble: elites must be between 1 and members={members}, got "
                f"{elites}; lower elites or raise members"
            )
        self.members, self.elites, self.hidden = members, elites, tuple(hidden)
        self.learned_termination = learned_termination

    def build(self, obs_dim: int, act_dim: int, termination: nn.Module | None = None) -> None:
        super().build(obs_dim, act_dim)
        e, d, out = self.members, obs_dim + act_dim, obs_dim + 1
        self.net = _EnsembleSiLU(e, d, self.hidden, 2 * out)
        self.max_logvar = nn.Parameter(torch.full((1, 1, out), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, out), -10.0))
        self.register_buffer("in_mean", torch.zeros(d))
        self.register_buffer("in_std", torch.ones(d))
        self.register_buffer("out_mean", torch.zeros(out))
        self.register_buffer("out_std", torch.ones(out))
        self.register_buffer("elite_idx", torch.arange(self.elites))
        self.termination = termination
        self.term_head = None
        if self.learned_termination:
            self.term_head = nn.Sequential(
                nn.Linear(2 * obs_dim + act_dim, 64), nn.SiLU(), nn.Linear(64, 1)
            )

    # ---- normalisation and elites ------------------------------------------------------
    @torch.no_grad()
    def fit_normalisers(self, s, a, r, s2) -> None:
        """Input and target statistics from transitions ``s`` [M,S], ``a``, ``r`` [M], ``s2``."""
        x, y = torch.cat([s, a], -1), torch.cat([s2 - s, r.unsqueeze(-1)], -1)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).nan_to_num(1.0).clamp_min(1e-6))
        self.out_mean.copy_(y.mean(0))
        self.out_std.copy_(y.std(0).nan_to_num(1.0).clamp_min(1e-6))

    def set_elites(self, idx: torch.Tensor) -> None:
        self.elite_idx.copy_(torch.as_tensor(idx, dtype=torch.long).sort().values)

    # ---- the networks ------------------------------------------------------------------
    def _raw(self, s, a, members=None):
        """Normalised mean and bounded log-variance [E',M,S+1] for inputs [E',M,·] or [M,·]."""
        x = (torch.cat([s, a], -1) - self.in_mean) / self.in_std
        e = self.members if members is None else members.numel()
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(e, *x.shape)
        mean, logvar = self.net(x, members).chunk(2, -1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def predict(self, s: torch.Tensor, a: torch.Tensor) -> Prediction:
        mean, logvar = self._raw(s, a)
        mu = mean * self.out_std + self.out_mean
        std = (0.5 * logvar).exp() * self.out_std
        return Prediction(s + mu[..., :-1], std[..., :-1], mu[..., -1], std[..., -1])

    def step(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        propagation: Propagation = "ts1",
        generator: torch.Generator | None = None,
    ) -> Step:
        m, k = s.shape[0], self.elites
        if propagation == "expectation":
            mean, _ = self._raw(s, a, self.elite_idx)
            y = mean.mean(0) * self.out_std + self.out_mean
        else:
            # Each row through one random elite: rows permuted and split into k groups,
            # each group through its member in one batched matmul (cost of one member).
            perm = torch.randperm(m, device=s.device, generator=generator)
            per = -(-m // k)
            pad = per * k - m
            idx = torch.cat([perm, perm[:pad]]) if pad else perm
            xs, xa = s[idx].reshape(k, per, -1), a[idx].reshape(k, per, -1)
            mean, logvar = self._raw(xs, xa, self.elite_idx)
            if propagation == "ts1":
                noise = torch.randn(mean.shape, device=s.device, generator=generator)
                mean = mean + (0.5 * logvar).exp() * noise
            y_perm = (mean * self.out_std + self.out_mean).reshape(per * k, -1)[:m]
            y = torch.empty_like(y_perm).index_copy(0, perm, y_perm)
        nxt = s + y[:, :-1]
        return Step(nxt, y[:, -1], self._terminated(s, a, nxt))

    def _terminated(self, s, a, nxt) -> torch.Tensor:
        if self.term_head is not None:
            return torch.sigmoid(self.term_head(torch.cat([s, a, nxt], -1)).squeeze(-1))
        if self.termination is not None:
            return self.termination(s, a, nxt)
        return s.new_zeros(s.shape[0])

    # ---- training ----------------------------------------------------------------------
    def loss(self, s, a, r, s2, term):
        """Gaussian NLL in normalised target space (mean over rows and dims, summed over
        members) plus the log-variance bound regulariser (and the termination head's
        BCE).  Rows [M,·] are shared by every member, [E,M,·] are each member's own."""
        mean, logvar = self._raw(s, a)
        y = (torch.cat([s2 - s, r.unsqueeze(-1)], -1) - self.out_mean) / self.out_std
        err2 = (mean - y).pow(2)
        nll = 0.5 * (err2 * (-logvar).exp() + logvar).mean((-1, -2)).sum()
        bound = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())
        loss = nll + bound
        metrics = {"nll": nll.detach() / self.members, "mse": err2.detach().mean()}
        if self.term_head is not None:
            logit = self.term_head(torch.cat([s, a, s2], -1)).squeeze(-1)
            bce = F.binary_cross_entropy_with_logits(logit, term.expand_as(logit))
            loss = loss + bce
            metrics["termination_bce"] = bce.detach()
        return loss, metrics

    @torch.no_grad()
    def holdout_errors(self, s, a, r, s2) -> torch.Tensor:
        """Per-member MSE of the mean in normalised target space, ``[E]``."""
        mean, _ = self._raw(s, a)
        y = (torch.cat([s2 - s, r.unsqueeze(-1)], -1) - self.out_mean) / self.out_std
        return (mean - y).pow(2).mean((-1, -2))
