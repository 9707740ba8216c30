"""The learned world model: an ensemble of Gaussian MLPs over (Δs, r), as in PETS
(Chua et al. 2018) and MBPO (Janner et al. 2019), all members run as batched matmuls.

    model = DynamicsEnsemble(members=7, elites=5)
    model.build(obs_dim, act_dim, termination)      # termination(s, a, s') -> [M] or None
    model.fit_normalisers(s, a, r, s2)              # statistics of the training data
    loss, metrics = model.loss(s, a, r, s2, term)   # what DynamicsModule minimises
    step = model.step(s, a, "ts1")                  # one sampled transition per row

Shapes: E members, k elites, M rows, S state dims, A action dims, D = S + A inputs,
T = S + 1 targets (Δs and r).  How the ensemble is trained (bootstrap minibatches,
hold-out early stopping, elite choice) lives in ``mbvi.models.dynamics_module``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbvi.errors import ConfigError
from mbvi.variational.world_model import (
    Prediction,
    Propagation,
    Step,
    WorldModel,
    check_propagation,
)

_LOG_2PI = math.log(2 * math.pi)
_MIN_STD = 1e-6  # a normaliser std below this (a constant dim) is replaced by 1
_EVAL_ROWS = 8192  # rows per chunk when scoring a hold-out set


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a layer's fresh output, in place when no gradient needs its input."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class _MemberMLPs(nn.Module):
    """E SiLU MLPs ``dims[0] -> ... -> dims[-1]`` as batched matmuls.

    ``forward(x [E',R,in], members)`` -> [E',R,out]: with ``members`` (indices [E'])
    only those members run, the i-th on ``x[i]``; without, x holds all E members' rows.
    Weights are [E,in,out] and biases [E,1,out], initialised as in PETS: a normal
    truncated at two standard deviations, std 1/(2√in), and zero biases.
    """

    def __init__(self, members: int, dims: Sequence[int]):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(members, d_in, d_out)
            std = 1.0 / (2.0 * math.sqrt(d_in))
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, d_out)))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if members is not None:
                w, b = w.index_select(0, members), b.index_select(0, members)
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = _silu(x)
        return x


class DynamicsEnsemble(WorldModel):
    """E members, each a diagonal Gaussian p_e(Δs, r | s, a) with s' = s + Δs.

    Inputs [s, a] and targets [Δs, r] are normalised by statistics fitted on the data
    (``fit_normalisers``) and kept as buffers, so a saved model predicts in env units.
    Log-variances are soft-bounded by learned maxima and minima (PETS, Appendix A.1),
    which a small penalty on (max − min) keeps tight.  ``step`` draws only from the
    elites (``elite_idx``): the members with the lowest hold-out error.

    Args:
        members: E, ensemble members.
        elites: members used by ``step`` (chosen by hold-out error), 1 <= elites <= E.
        hidden: widths of each member's hidden layers (SiLU).
        learned_termination: learn a termination head p(d | s, a, s') (trained by BCE
            in ``loss``) for envs with no known rule; it replaces a rule passed to
            ``build``.
        termination_hidden: widths of the termination head's hidden layers.
        logvar_bound_weight: weight of the penalty on (max − min) log-variance bounds.
    """

    def __init__(
        self,
        members: int = 7,
        elites: int = 5,
        hidden: Sequence[int] = (200, 200, 200, 200),
        learned_termination: bool = False,
        termination_hidden: Sequence[int] = (64, 64),
        logvar_bound_weight: float = 0.01,
    ):
        super().__init__()
        if members < 1:
            raise ConfigError(
                f"DynamicsEnsemble: members must be >= 1, got {members}; use 1 for a "
                "single model (PETS and MBPO use 5-7)"
            )
        if elites < 1 or elites > members:
            raise ConfigError(
                f"DynamicsEnsemble: elites must be between 1 and members={members}, got "
                f"{elites}; lower elites or raise members"
            )
        if any(w < 1 for w in hidden):
            raise ConfigError(f"DynamicsEnsemble: hidden widths must be >= 1, got {tuple(hidden)}")
        self.members = members
        self.elites = elites
        self.hidden = tuple(hidden)
        self.learned_termination = learned_termination
        self.termination_hidden = tuple(termination_hidden)
        self.logvar_bound_weight = logvar_bound_weight

    def build(self, obs_dim: int, act_dim: int, termination: nn.Module | None = None) -> None:
        """Create the members for ``obs_dim`` states and ``act_dim`` actions.
        ``termination(s, a, s') -> [M]`` (float 0/1) is the env's rule, None for
        never; kept as a submodule so that it is saved with the model."""
        super().build(obs_dim, act_dim)
        d, t = obs_dim + act_dim, obs_dim + 1
        self.net = _MemberMLPs(self.members, [d, *self.hidden, 2 * t])
        self.max_logvar = nn.Parameter(torch.full((t,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((t,), -10.0))
        self.register_buffer("in_mean", torch.zeros(d))
        self.register_buffer("in_std", torch.ones(d))
        self.register_buffer("out_mean", torch.zeros(t))
        self.register_buffer("out_std", torch.ones(t))
        self.register_buffer("elite_idx", torch.arange(self.elites))
        self.termination = termination
        self.term_head = None
        if self.learned_termination:
            layers: list[nn.Module] = []
            width = 2 * obs_dim + act_dim
            for h in self.termination_hidden:
                layers += [nn.Linear(width, h), nn.SiLU()]
                width = h
            self.term_head = nn.Sequential(*layers, nn.Linear(width, 1))

    # ---- data statistics and elites ----------------------------------------------------
    @torch.no_grad()
    def fit_normalisers(self, s, a, r, s2) -> None:
        """Input and target means and stds from transitions ``s`` [M,S] (or [...,M,S]),
        ``a``, ``r`` [M], ``s2``; a dim with std below 1e-6 keeps std 1."""
        x = torch.cat([s, a], -1).reshape(-1, self.in_mean.numel())
        y = self._raw_targets(s, r, s2).reshape(-1, self.out_mean.numel())
        for data, mean, std in ((x, self.in_mean, self.in_std), (y, self.out_mean, self.out_std)):
            sd = data.std(0, correction=0)
            mean.copy_(data.mean(0))
            std.copy_(torch.where(sd < _MIN_STD, torch.ones_like(sd), sd))

    def set_elites(self, idx) -> None:
        """Make members ``idx`` (``elites`` distinct indices) the ones ``step`` uses."""
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().sort().values
        if idx.numel() != self.elites or idx.unique().numel() != self.elites:
            raise ValueError(f"set_elites needs {self.elites} distinct members, got {idx.tolist()}")
        if idx[0] < 0 or idx[-1] >= self.members:
            raise ValueError(f"elite indices must be in [0, {self.members}), got {idx.tolist()}")
        self.elite_idx.copy_(idx)

    # ---- the members -------------------------------------------------------------------
    def _inputs(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (torch.cat([s, a], -1) - self.in_mean) / self.in_std

    @staticmethod
    def _raw_targets(s, r, s2) -> torch.Tensor:
        return torch.cat([s2 - s, r.unsqueeze(-1)], -1)

    def _targets(self, s, r, s2) -> torch.Tensor:
        return (self._raw_targets(s, r, s2) - self.out_mean) / self.out_std

    def _gaussian(self, out: torch.Tensor, logvar: bool = True):
        """(mean, bounded log-variance) in normalised target space from the members'
        outputs [...,2T]; the log-variance is None when ``logvar`` is False."""
        mean, lv = out.split(out.shape[-1] // 2, -1)
        if not logvar:
            return mean, None
        lv = self.max_logvar - F.softplus(self.max_logvar - lv)
        return mean, self.min_logvar + F.softplus(lv - self.min_logvar)

    def _all_members(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Every member's raw output [E,M,2T] for rows [M,·] (shared) or [E,M,·] (own)."""
        x = self._inputs(s, a)
        if x.dim() == 2:
            x = x.expand(self.members, *x.shape)
        return self.net(x)

    def predict(self, s: torch.Tensor, a: torch.Tensor) -> Prediction:
        mean, logvar = self._gaussian(self._all_members(s, a))
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
        """One transition per row (see ``Propagation``); ``generator`` (on the inputs'
        device) drives the member choice and the Gaussian draws."""
        check_propagation(propagation)
        assert s.dim() == 2 and a.dim() == 2 and s.shape[0] == a.shape[0], (
            f"step expects s [M,{self.obs_dim}] and a [M,{self.act_dim}], "
            f"got {tuple(s.shape)} and {tuple(a.shape)}"
        )
        x = self._inputs(s, a)
        if propagation == "expectation":
            x = x.expand(self.elites, *x.shape)
            mean, _ = self._gaussian(self.net(x, self.elite_idx), False)
            y = mean.mean(0)
        else:
            y = self._one_elite_per_row(x, propagation == "ts1", generator)
        y = y * self.out_std + self.out_mean
        nxt = s + y[:, :-1]
        return Step(nxt, y[:, -1], self._terminated(s, a, nxt))

    def _one_elite_per_row(self, x: torch.Tensor, sample: bool, generator) -> torch.Tensor:
        """Each row of ``x`` [M,D] through one random elite, at the cost of one member:
        rows are shuffled into k equal groups (the last padded with repeated rows), the
        groups are rotated by a random shift onto the elites (elite g runs group
        (g + shift) mod k), every group runs through its member in one batched matmul,
        and the rows are put back in order.  A row's member is uniform over the
        elites, and the elites' weights are used in place (no per-step gather of a
        shuffled order).  Returns normalised targets [M,T], sampled if ``sample``."""
        m, k = x.shape[0], self.elites
        # A generator only when given: a compiled graph (SMC's ``compile``) takes none.
        rng = {} if generator is None else {"generator": generator}
        perm = torch.randperm(m, device=x.device, **rng)
        per = -(-m // k)
        # Padding cycles through perm (also when there are fewer rows than elites).
        rows = perm[torch.arange(per * k, device=x.device) % m] if per * k > m else perm
        shift = torch.randint(k, (1,), device=x.device, **rng)
        groups = (torch.arange(k, device=x.device) + shift) % k
        out = self.net(x[rows.view(k, per)[groups]], self.elite_idx)
        mean, logvar = self._gaussian(out, sample)
        if sample:
            noise = torch.randn(mean.shape, device=x.device, dtype=x.dtype, **rng)
            if torch.is_grad_enabled() and out.requires_grad:
                mean = mean + (0.5 * logvar).exp() * noise
            else:  # fresh tensors nothing else holds: reuse their memory
                mean = mean.addcmul_(logvar.mul_(0.5).exp_(), noise)
        y = torch.empty_like(mean).index_copy(0, groups, mean).reshape(per * k, -1)[:m]
        return y.new_empty(y.shape).index_copy(0, perm, y)

    def _terminated(self, s, a, nxt) -> torch.Tensor:
        if self.term_head is not None:
            return torch.sigmoid(self._term_logit(s, a, nxt))
        if self.termination is not None:
            return self.termination(s, a, nxt)
        return s.new_zeros(s.shape[0])

    def _term_logit(self, s, a, nxt) -> torch.Tensor:
        x = self._inputs(s, a)
        s_dims = slice(0, self.obs_dim)
        x2 = (nxt - self.in_mean[s_dims]) / self.in_std[s_dims]
        return self.term_head(torch.cat([x, x2], -1)).squeeze(-1)

    # ---- training ----------------------------------------------------------------------
    def loss(self, s, a, r, s2, term):
        """Gaussian NLL in normalised target space (mean over rows and dims, summed
        over members) + the log-variance bound penalty (+ the termination head's BCE).
        Rows [M,·] are shared by every member; rows [E,M,·] are each member's own (its
        bootstrap sample).  Metrics (detached): ``nll`` (per member and dim), ``mse``
        of the means (normalised), ``logvar_bound`` and, with a head,
        ``termination_bce``."""
        mean, logvar = self._gaussian(self._all_members(s, a))
        err2 = (mean - self._targets(s, r, s2)).square()
        nll = 0.5 * (err2 * (-logvar).exp() + logvar).mean((-1, -2)) + 0.5 * _LOG_2PI
        bound = (self.max_logvar - self.min_logvar).sum()
        loss = nll.sum() + self.logvar_bound_weight * bound
        metrics = {"nll": nll.detach().mean(), "mse": err2.detach().mean(),
                   "logvar_bound": bound.detach() / self.max_logvar.numel()}  # fmt: skip
        if self.term_head is not None:
            logit = self._term_logit(s, a, s2)
            bce = F.binary_cross_entropy_with_logits(logit, term.to(logit.dtype))
            loss = loss + bce
            metrics["termination_bce"] = bce.detach()
        return loss, metrics

    @torch.no_grad()
    def holdout_scores(self, s, a, r, s2) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member Gaussian NLL and MSE of the mean, both ``[E]``, in normalised
        target space, over rows ``s`` [M,S], ``a``, ``r`` [M], ``s2`` (scored in chunks,
        so a large hold-out set fits in memory)."""
        nll = s.new_zeros(self.members)
        mse = s.new_zeros(self.members)
        for i in range(0, s.shape[0], _EVAL_ROWS):
            rows = slice(i, i + _EVAL_ROWS)
            mean, logvar = self._gaussian(self._all_members(s[rows], a[rows]))
            err2 = (mean - self._targets(s[rows], r[rows], s2[rows])).square()
            nll += (0.5 * (err2 * (-logvar).exp() + logvar)).mean(-1).sum(-1)
            mse += err2.mean(-1).sum(-1)
        n = max(s.shape[0], 1)
        return nll / n + 0.5 * _LOG_2PI, mse / n

    def holdout_errors(self, s, a, r, s2) -> torch.Tensor:
        """Per-member MSE of the mean in normalised target space, ``[E]`` (what elites
        are chosen by)."""
        return self.holdout_scores(s, a, r, s2)[1]
