"""Sample sites of the optimality model (paper Fig. 1a): per-step site names, the
mbvi priors as Pyro distributions, and the checks that a user's prior program samples
an action in [-1, 1]^A with the right shape.

Shapes: B states (plate ``states``, dim -2), N particles (plate ``particles``,
dim -1), A action dims (the event dim).  A site's value is ``[B, N, A]``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints
from torch.distributions.transforms import TanhTransform

from mbvi.errors import ConfigError
from mbvi.variational.priors import Prior, UniformPrior

ACTION = "a"
"""Name of the action site in a prior program; step t records it as ``a_t``."""

PriorProgram = Callable[[torch.Tensor], torch.Tensor]
"""A Pyro program ``prior(s [B, 1 or N, S]) -> a`` with a ``pyro.sample("a", ...)`` site."""


class StepSites(Messenger):
    """Renames every sample site ``x`` run inside step ``t`` to ``x_t`` and keeps the
    message of the action site ``a`` for the checks of ``check_action_site``.

    Renaming lets a user's prior or dynamics program name its sites once ("a",
    "gait", "s_next") and still appear once per time step in the trace.
    """

    def __init__(self, t: int):
        super().__init__()
        self.t = t
        self.seen: list[str] = []
        self.action_msg = None

    def _pyro_sample(self, msg) -> None:
        self.seen.append(msg["name"])
        if msg["name"] == ACTION:
            self.action_msg = msg
        msg["name"] = f"{msg['name']}_{self.t}"


class ClosedUniform(dist.Uniform):
    """Uniform on the closed box [low, high]: a tanh-squashed guide sample can round to
    exactly ±1 in float32, where ``Uniform.log_prob`` (half-open) would return -inf."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        inside = (value >= self.low) & (value <= self.high)
        density = -torch.log(self.high - self.low)
        return torch.where(inside, density, torch.full_like(density, -float("inf")))


def tanh_normal(loc: torch.Tensor, log_scale: torch.Tensor) -> dist.TransformedDistribution:
    """a = tanh(u), u ~ N(loc, exp(log_scale)^2) as a Pyro distribution (Eq. 13-14): the
    second argument is the log of the scale, as an engine's posterior carries it;
    ``cache_size=1`` lets log_prob reuse u for the site's own sample instead of atanh(a)."""
    base = dist.Normal(loc, log_scale.exp()).to_event(1)
    return dist.TransformedDistribution(base, [TanhTransform(cache_size=1)])


def prior_distribution(prior: Prior, s: torch.Tensor, batch: int, act_dim: int):
    """p_θ(a|s) of an mbvi ``Prior`` as a Pyro distribution for states ``s`` [B,S] or
    [B,N,S]; its batch shape [B, 1 or N] broadcasts over the particle plate."""
    if isinstance(prior, UniformPrior):
        ones = s.new_ones(act_dim)
        return ClosedUniform(-ones, ones).to_event(1)
    d = prior.distribution(s.reshape(-1, s.shape[-1]))
    if d is None:
        raise ConfigError(
            f"prior {type(prior).__name__} is neither uniform nor a tanh-Gaussian, so the "
            "optimality model cannot sample it; write it as a Pyro program with a "
            "pyro.sample('a', ...) site instead"
        )
    return tanh_normal(d.loc.reshape(batch, -1, act_dim), d.log_scale.reshape(batch, -1, act_dim))


BOX_DRAWS = 4096
"""Actions drawn to check a site whose reported support is not inside [-1, 1]^A."""


def _within_unit_box(support) -> bool:
    support = _base_support(support)
    lo = getattr(support, "lower_bound", None)
    hi = getattr(support, "upper_bound", None)
    if lo is None or hi is None:
        return False
    return bool(torch.as_tensor(lo).min() >= -1.0) and bool(torch.as_tensor(hi).max() <= 1.0)


def _base_support(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def check_in_box(values: torch.Tensor, program: str, site: str, support) -> None:
    """Raise ``ConfigError`` naming ``site`` and an offending value unless every action
    in ``values`` [..., A] lies in [-1, 1]^A; ``support`` is what the site's
    distribution reports, quoted in the error."""
    a_dim = values.shape[-1]
    rows = values.detach().reshape(-1, a_dim)
    outside = (rows.abs() > 1.0).any(-1)
    if bool(outside.any()):
        row = rows[int(outside.nonzero()[0, 0])]
        dim = int((row.abs() > 1.0).nonzero()[0, 0])
        raise ConfigError(
            f"prior program {program}: action site {site} sampled {float(row[dim]):.4g} in "
            f"action dim {dim} ({int(outside.sum())} of {rows.shape[0]} sampled actions lie "
            f"outside the box; its distribution reports support {_base_support(support)}), "
            f"but actions must lie in [-1, 1]^{a_dim}; squash it with "
            "TanhTransform(cache_size=1), use "
            "Uniform(-1, 1), or map a distribution on [0, 1] with AffineTransform(-1, 2)"
        )


def check_action_site(step: StepSites, program: str, expected: tuple[int, int, int]) -> None:
    """Raise ``ConfigError`` unless step ``step.t`` sampled an action site ``a`` of shape
    ``expected`` = (B, N, A) with event shape (A,) whose samples lie in [-1, 1]^A.

    The samples decide, not the support the distribution reports: torch reports a
    transform's codomain (``Real`` for ``AffineTransform``), so ``Beta(2, 2)`` mapped to
    [-1, 1] reports ``Real``.  When the reported support is not inside the box, at
    least ``BOX_DRAWS`` more actions are drawn from the site's distribution; a site that
    puts mass q outside the box passes with probability about (1 − q)^4096 (q = 1e-3:
    about 2%)."""
    site = f"'{ACTION}' (recorded as '{ACTION}_{step.t}')"
    msg = step.action_msg
    if msg is None:
        raise ConfigError(
            f"prior program {program} has no action site: it sampled {step.seen or 'no sites'}"
            f" but mbvi reads the action from pyro.sample('{ACTION}', ...) with shape "
            f"{expected} = [states, particles, act_dim]"
        )
    fn, value = msg["fn"], msg["value"]
    shape = tuple(fn.batch_shape + fn.event_shape)
    if tuple(fn.event_shape) != expected[2:] or shape != expected or value.shape != expected:
        raise ConfigError(
            f"prior program {program}: action site {site} has shape {tuple(value.shape)} "
            f"(batch {tuple(fn.batch_shape)}, event {tuple(fn.event_shape)}), expected "
            f"{expected} = [states, particles, act_dim] with event shape {expected[2:]}; "
            "declare the action dimension as an event dimension with .to_event(1)"
        )
    check_in_box(value, program, site, fn.support)
    if not _within_unit_box(fn.support):
        draws = -(-BOX_DRAWS // (expected[0] * expected[1]))
        with torch.no_grad():
            check_in_box(fn.sample((draws,)), program, site, fn.support)


def run_prior_program(
    program: PriorProgram,
    s: torch.Tensor,
    step: StepSites,
    name: str,
    expected: tuple[int, int, int],
) -> torch.Tensor:
    """Run a user's prior program on states ``s`` [B, 1 or N, S] inside the caller's
    ``states`` and ``particles`` plates and ``step``, and return its action [B, N, A]
    after ``check_action_site``; ``name`` names the program in the errors."""
    b, n, a_dim = expected
    try:
        program(s)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"prior program {name} failed inside the plates [states={b}, particles={n}]: "
            f"{e}; its site '{ACTION}' must have batch shape broadcastable to ({b}, {n}) "
            f"and event shape ({a_dim},), e.g. via .to_event(1)"
        ) from e
    check_action_site(step, name, expected)
    return step.action_msg["value"]


def program_name(prior: PriorProgram) -> str:
    return repr(getattr(prior, "__name__", type(prior).__name__))
