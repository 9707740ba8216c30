"""Configuration checks of the agent: each bad setting fails before training with a
``ConfigError`` that says what to change."""

from __future__ import annotations

import torch

from mbvi.errors import ConfigError, NonFiniteError
from mbvi.variational.priors import Prior


def check_schedule(args: dict) -> None:
    """ConfigError for counts and rates that would crash a run or make it train nothing;
    ``args`` holds the agent's constructor arguments by name."""
    for name in ("total_env_steps", "batch_size", "updates_per_step", "buffer_size",
                 "eval_every", "eval_episodes", "log_every", "checkpoint_every",
                 "model_every"):  # fmt: skip
        if args[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {args[name]}")
    for name in ("value_lr", "engine_lr", "alpha_lr", "prior_lr"):
        if not args[name] >= 0:  # 0 holds a part fixed; a negative rate would ascend
            raise ConfigError(f"{name} must be >= 0 (0 holds that part fixed), got {args[name]}")
    for name in ("gap_every", "progress_refresh_s"):
        if args[name] < 0:
            raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {args[name]}")
    if not 0 <= args["seed"] < 2**32:  # what numpy and torch can be seeded with
        raise ConfigError(f"seed must be in [0, 2**32), got {args['seed']}")
    if args["gap_states"] < 1:
        raise ConfigError(f"gap_states must be >= 1, got {args['gap_states']}")
    if args["init_alpha"] <= 0:
        raise ConfigError(f"init_alpha must be > 0, got {args['init_alpha']}")
    if not 0.0 < args["gamma"] <= 1.0:
        raise ConfigError(f"gamma must be in (0, 1], got {args['gamma']}")
    total, warmup = args["total_env_steps"], args["warmup_steps"]
    if not 0 <= warmup < total:
        raise ConfigError(
            f"warmup_steps must be in [0, total_env_steps = {total}), got {warmup}: no update "
            "would ever run. Lower --model.warmup_steps or raise --model.total_env_steps."
        )
    capacity = min(args["buffer_size"], total)
    if args["batch_size"] > capacity:
        raise ConfigError(
            f"batch_size {args['batch_size']} exceeds the transitions the replay buffer can "
            f"ever hold (min(buffer_size, total_env_steps) = {capacity}): no update would "
            "ever run. Lower --model.batch_size or raise the buffer and budget."
        )


def kl_target_per_dim(prior: Prior, target: float | None) -> float:
    """The KL(π‖p) target per action dimension α is tuned towards: ``target``, or the
    prior's default when None; ConfigError if no tanh-Gaussian posterior can meet it."""
    kl = target if target is not None else prior.default_kl_target()
    if not kl > 0:
        raise ConfigError(
            f"the KL target per action dimension must be > 0 (a KL is never negative and "
            f"reaches 0 only when the posterior equals the prior), got {kl}; set "
            "--model.target_kl_per_dim to a positive value or leave it unset."
        )
    floor = prior.min_kl_target()  # an estimate for some priors: computed once
    if kl <= floor:
        raise ConfigError(
            f"the KL target per action dimension {kl} cannot be met under "
            f"{type(prior).__name__}: {prior.min_kl_basis()} than {floor:.4g} nats per "
            "dimension, so α would grow without bound; set --model.target_kl_per_dim "
            "above that or leave it unset."
        )
    return kl


def check_components(prior, engine, value) -> None:
    """Raise ``ConfigError`` when the built prior, engine and value cannot work together:
    an engine that cannot start from the prior, an amortised engine trained through a
    world model that is not differentiable, a planner without a model to plan through."""
    engine.check_prior(prior)
    model = value.world_model
    if model is not None and not model.differentiable and engine.amortised:
        raise ConfigError(
            f"the world model {type(model).__name__} is not differentiable, but "
            f"{type(engine).__name__} trains an inference network by gradients of "
            "Q̂ through it; plan with SMC, MPPI or CEM without an amortised proposal, "
            "or use a learned mbvi.models.DynamicsEnsemble"
        )
    check_value = getattr(engine, "check_value", None)
    if check_value is not None:  # planners need a world model to plan through
        check_value(value)


def check_finite_state(state: dict, env_steps: int) -> None:
    """Raise ``NonFiniteError`` naming the first floating-point tensor of ``state`` (an
    agent's state_dict) that holds a NaN or Inf."""
    for name, tensor in state.items():  # checkpoints are rare: the host syncs are fine
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            raise NonFiniteError(
                f"parameter {name} is NaN or Inf at env step {env_steps}; training "
                "stopped. Try a lower learning rate."
            )
