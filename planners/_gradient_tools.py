"""Helpers shared by the engines that differentiate the objective (Iterative, Gradient):
where inference starts, and the Monte-Carlo gradient ∇λ J̃ of Eq. 16."""

from __future__ import annotations

import torch

from mbvi.errors import ConfigError
from mbvi.variational.distributions import LOG_SCALE_MAX, LOG_SCALE_MIN, TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import Prior


def check_count(engine: str, name: str, value: int) -> None:
    """Raise ConfigError unless the integer option ``name`` is >= 1."""
    if value < 1:
        raise ConfigError(f"{engine}: {name} must be >= 1, got {value}")


def check_init_options(engine: str, init_loc: float | None, init_log_scale: float | None) -> None:
    """Raise ConfigError when ``init_log_scale`` lies outside the tanh-Gaussian's range."""
    if init_log_scale is not None and not LOG_SCALE_MIN <= init_log_scale <= LOG_SCALE_MAX:
        raise ConfigError(
            f"{engine}: init_log_scale must lie in [{LOG_SCALE_MIN}, {LOG_SCALE_MAX}], "
            f"got {init_log_scale}"
        )


def _missing_init_error(engine: str, prior_name: str, missing: list[str]) -> ConfigError:
    options = " and ".join(missing)
    flags = " ".join(f"--model.engine.init_args.{m} 0.0" for m in missing)
    return ConfigError(
        f"{engine}: the prior {prior_name} is not a tanh-Gaussian, so inference cannot "
        f"start from it; set {options} (the pre-tanh parameters inference starts "
        f"from), e.g. {flags}"
    )


def check_prior(
    engine: str, prior: Prior, init_loc: float | None, init_log_scale: float | None
) -> None:
    """Raise ConfigError now, not after warm-up, when inference would have no start."""
    missing = [
        n for n, v in (("init_loc", init_loc), ("init_log_scale", init_log_scale)) if v is None
    ]
    tensors = [*prior.parameters(), *prior.buffers()]
    probe = torch.zeros(1, prior.obs_dim, device=tensors[0].device if tensors else None)
    if missing and prior.distribution(probe) is None:
        raise _missing_init_error(engine, type(prior).__name__, missing)


def initial_params(
    engine: str,
    s: torch.Tensor,
    objective: TrajectoryObjective,
    act_dim: int,
    init_loc: float | None,
    init_log_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ_0 = (loc, log_scale), each ``[B, A]`` and detached: the configured values where
    given, else the prior's tanh-Gaussian parameters (the start of Eq. 15's iterations).

    Raises ConfigError when an option is unset and the prior is not a tanh-Gaussian.
    """
    prior = objective.prior_dist
    missing = [
        n for n, v in (("init_loc", init_loc), ("init_log_scale", init_log_scale)) if v is None
    ]
    if missing and prior is None:
        raise _missing_init_error(engine, type(objective.prior).__name__, missing)
    shape, kw = (s.shape[0], act_dim), {"dtype": s.dtype, "device": s.device}

    def pick(value: float | None, prior_param: torch.Tensor | None) -> torch.Tensor:
        if value is not None:
            return torch.full(shape, float(value), **kw)
        return prior_param.detach().to(**kw).expand(shape).clone()

    return (
        pick(init_loc, None if prior is None else prior.loc),
        pick(init_log_scale, None if prior is None else prior.log_scale),
    )


def objective_gradient(
    objective: TrajectoryObjective,
    loc: torch.Tensor,
    log_scale: torch.Tensor,
    n_samples: int,
    antithetic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reparameterised estimate of ∇λ J̃ (Eq. 16) at λ = (loc, log_scale) ``[B, A]``.

    Returns ``(J̃ [B], ∇_loc J̃ [B,A], ∇_log_scale J̃ [B,A])``, all detached: the
    gradient is an *input* to inference (Eq. 15), never a path for training.  Only
    λ is differentiated (``torch.autograd.grad``), so no ``.grad`` of the value
    estimate is ever touched; works under a caller's ``torch.no_grad``.
    ``antithetic`` draws the samples in ± pairs (``TanhGaussian.standard_normal``).
    One pass over all B·N actions, on every device; a value estimate that wants to
    keep its activations in cache chunks the states itself (``FrozenReducedQ`` does).
    """
    with torch.enable_grad():
        _check_value_differentiable(objective, loc)
        m = loc.detach().requires_grad_(True)
        log_s = log_scale.detach().requires_grad_(True)
        j, _ = objective(TanhGaussian(m, log_s), n_samples, antithetic)
        g_loc, g_log_scale = torch.autograd.grad(j.sum(), [m, log_s])
    return j.detach(), g_loc, g_log_scale


def _check_value_differentiable(objective: TrajectoryObjective, loc: torch.Tensor) -> None:
    """Fail loudly, rather than follow ∇KL alone, when Q̂ blocks gradients to actions
    (e.g. a target critic run under ``torch.no_grad``).  Costs one action per state,
    once per objective (an engine's K iterations share the check)."""
    if objective._value_differentiable:
        return
    probe = torch.zeros_like(loc).unsqueeze(-2).requires_grad_(True)
    if not objective.value(objective.states, probe).requires_grad:
        raise ValueError(
            "the objective's value estimate returns no gradient w.r.t. the actions, so "
            "∇λ J̃ (Eq. 16) would miss E[Q̂]: pass a value that is differentiable in the "
            "actions with frozen parameters, e.g. partial(value, frozen=True), not a "
            "function run under torch.no_grad"
        )
    objective._value_differentiable = True
