"""``mbvi fit-model``: train a dynamics ensemble on saved transitions, on its own.

    mbvi fit-model --config configs/models/pendulum.yaml --data.path data.npz
    mbvi fit-model --config ... --ckpt_path checkpoints/models/<run>/last.ckpt  # resume
    mbvi fit-model --config ... --init_from checkpoints/models/<run>/best.ckpt  # warm start

A LightningCLI over ``DynamicsModule`` (the model) and ``TransitionsDataModule`` (the
data: an ``.npz`` or an agent checkpoint's replay buffer), with Lightning's
``EarlyStopping`` and ``ModelCheckpoint`` on ``model/holdout_nll`` and the MLflow
tracker (experiment ``models``).  ``data.batch_size``, ``data.holdout_fraction`` and
``data.seed`` are linked into the module, ``model.max_epochs`` into the trainer and
``model.patience`` into early stopping, so each is set once.  Checkpoints land in
``checkpoints/models/<run_id>/`` (``best.ckpt``, ``last.ckpt``) and in the MLflow run's
``checkpoints/`` artifacts; ``load_dynamics`` reads one back as a ``DynamicsEnsemble``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mbvi.errors import CheckpointError, ConfigError
from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.dynamics_module import DynamicsModule
from mbvi.tracking.logger import MLflowTracker
from mbvi.training.safe_load import load_checkpoint, missing_file, require_weights_only
from mbvi.training.transitions import TransitionsDataModule

SPEC_KEY = "mbvi_model"
"""Checkpoint entry of a fit-model checkpoint: the env and sizes its ensemble was built for."""
_SPEC_FORMAT = 1
_SIZES = ("members", "elites", "hidden", "learned_termination", "termination_hidden")

MODEL_TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "mbvi.tracking.logger.MLflowTracker",
        "init_args": {"experiment_name": "models"},
    },
    "accelerator": "auto",
    "devices": 1,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}


def dynamics_spec(model: DynamicsEnsemble, env_id: str) -> dict:
    """What a fit-model checkpoint records about its (built) ensemble, under ``SPEC_KEY``."""
    return {
        "format": _SPEC_FORMAT,
        "env_id": env_id,
        "obs_dim": model.obs_dim,
        "act_dim": model.act_dim,
        "members": model.members,
        "elites": model.elites,
        "hidden": list(model.hidden),
        "learned_termination": model.learned_termination,
        "termination_hidden": list(model.termination_hidden),
        "logvar_bound_weight": model.logvar_bound_weight,
    }


def _sizes(spec: dict, keys) -> str:
    return ", ".join(
        f"{k}={tuple(spec[k]) if isinstance(spec[k], list) else spec[k]}" for k in keys
    )


def _describe(spec: dict) -> str:
    return f"env {spec['env_id']!r} ({_sizes(spec, ('obs_dim', 'act_dim', *_SIZES))})"


def read_model_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, the ensemble's state_dict) of a fit-model checkpoint, loaded with
    ``weights_only=True``; ``CheckpointError`` when it is missing or not one."""
    path = Path(path)
    where = f"model checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(
            f"{where} {missing_file(Path(path))}; pass a checkpoint written by `mbvi fit-model` "
            "(checkpoints/models/<run_id>/best.ckpt)"
        )
    ckpt = load_checkpoint(path, where)
    if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt:
        hint = (
            " (it is an agent checkpoint: pass it as --data.path to train on its replay buffer)"
            if isinstance(ckpt, dict) and "mbvi" in ckpt
            else ""
        )
        raise CheckpointError(f"{where} was not written by `mbvi fit-model`{hint}")
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return ckpt[SPEC_KEY], state


def check_model_spec(spec: dict, path: str | Path, env_id: str, model=None) -> None:
    """Raise ``CheckpointError``, naming both sides, unless the checkpoint ``spec`` is for
    ``env_id`` and, when ``model`` (a ``DynamicsEnsemble``) is given, for its sizes (and
    its env sizes, once built)."""
    where = f"model checkpoint {str(path)!r}"
    if spec["env_id"] != env_id:
        raise CheckpointError(
            f"{where} is for {_describe(spec)}, not for env {env_id!r}; pass a checkpoint "
            f"of {env_id!r} or set the env to {spec['env_id']!r}"
        )
    if model is None:
        return
    mine = {**spec, **{k: getattr(model, k) for k in _SIZES}}
    mine["hidden"], mine["termination_hidden"] = list(model.hidden), list(model.termination_hidden)
    if hasattr(model, "obs_dim"):
        mine["obs_dim"], mine["act_dim"] = model.obs_dim, model.act_dim
    differ = [k for k in ("obs_dim", "act_dim", *_SIZES) if mine[k] != spec[k]]
    if differ:
        raise CheckpointError(
            f"{where} holds an ensemble with {_sizes(spec, differ)} for env {env_id!r}, but the "
            f"configured one has {_sizes(mine, differ)}; configure the sizes of the run that "
            "wrote it (its config.yaml artifact) or pass another checkpoint"
        )


def load_dynamics(
    path: str | Path, env_id: str, like: DynamicsEnsemble | None = None
) -> DynamicsEnsemble:
    """The ``DynamicsEnsemble`` saved by ``mbvi fit-model`` at ``path``, built for
    ``env_id`` (with its termination rule) and holding the saved weights, normalisers
    and elites, in eval mode.

    ``like``: a configured ensemble the saved one must match in sizes (members, elites,
    hidden, termination head; obs and act dims once built), e.g. an agent's before it
    takes the saved weights: ``like.load_state_dict(load_dynamics(p, env, like).state_dict())``.

    Raises:
        CheckpointError: the file is not a fit-model checkpoint, or its env or sizes
            differ from ``env_id``, the env's own sizes or ``like``'s (naming both).
    """
    from mbvi.models.termination import termination_for_env
    from mbvi.training.env import make_env

    spec, state = read_model_checkpoint(path)
    check_model_spec(spec, path, env_id, like)
    env = make_env(env_id)
    try:
        termination, _ = termination_for_env(env)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    finally:
        env.close()
    if (obs_dim, act_dim) != (spec["obs_dim"], spec["act_dim"]):
        raise CheckpointError(
            f"model checkpoint {str(path)!r} is for {_describe(spec)}, but env {env_id!r} now "
            f"has obs_dim={obs_dim}, act_dim={act_dim}; retrain the model for this env"
        )
    model = DynamicsEnsemble(
        members=spec["members"],
        elites=spec["elites"],
        hidden=spec["hidden"],
        learned_termination=spec["learned_termination"],
        termination_hidden=spec["termination_hidden"],
        logvar_bound_weight=spec["logvar_bound_weight"],
    )
    model.build(obs_dim, act_dim, termination)
    model.load_state_dict(state)
    return model.eval()


class _RecordModel(Callback):
    """Writes the ensemble's spec into every checkpoint and copies the checkpoints to
    the MLflow run at the end.  (ModelCheckpoint saves after the module's
    ``on_train_epoch_end``, so a checkpoint holds the elites of its own weights.)"""

    def __init__(self, env_id: str):
        self.env_id = env_id

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SPEC_KEY] = dynamics_spec(pl_module.model, self.env_id)

    def _upload(self, trainer) -> list[str]:
        saver, logger = trainer.checkpoint_callback, trainer.logger
        paths = [] if saver is None else sorted(
            p for p in {saver.best_model_path, saver.last_model_path} - {""} if Path(p).is_file()
        )  # fmt: skip
        if isinstance(logger, MLflowTracker):
            for path in paths:
                logger.experiment.log_artifact(logger.run_id, path, "checkpoints")
        return paths

    def on_fit_end(self, trainer, pl_module) -> None:
        self._upload(trainer)
        saver = trainer.checkpoint_callback
        if saver is not None and saver.best_model_path:
            print(f"best model (model/holdout_nll {float(saver.best_model_score):.4f}): "
                  f"{saver.best_model_path}")  # fmt: skip

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Ctrl-C or SIGTERM stop a healthy fit: the checkpoints of its finished epochs
        # are kept and uploaded, and the run ends KILLED (resumable), as `mbvi fit`'s.
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        paths = self._upload(trainer)
        if hasattr(trainer.logger, "mark_killed"):
            trainer.logger.mark_killed()
        kept = f"checkpoints kept: {', '.join(paths)}" if paths else "no checkpoint yet"
        print(f"\ninterrupted in epoch {trainer.current_epoch}; {kept}", file=sys.stderr)


class ModelCLI(LightningCLI):
    """``mbvi fit-model``: LightningCLI's ``fit`` over ``DynamicsModule`` and
    ``TransitionsDataModule``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="A fit-model checkpoint whose weights, normalisers and elites start the "
            "fit (epochs, optimiser and early stopping start afresh; --ckpt_path resumes "
            "them too).",
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # min_delta as DynamicsModule's plain loop: a smaller fall is no improvement
        parser.set_defaults({
            "early_stopping.monitor": "model/holdout_nll", "early_stopping.mode": "min",
            "early_stopping.min_delta": 1e-4,
        })  # fmt: skip
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "model/holdout_nll", "checkpoint.mode": "min",
            "checkpoint.filename": "best", "checkpoint.save_last": True,
        })  # fmt: skip
        parser.link_arguments("model.patience", "early_stopping.patience")
        parser.link_arguments("model.max_epochs", "trainer.max_epochs")
        for key in ("batch_size", "holdout_fraction", "seed"):
            parser.link_arguments(f"data.{key}", f"model.{key}")

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        self._subcommand_parsers["fit"].prog = "mbvi fit-model"  # as the user types it

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given: ``before_fit`` checks the checkpoint against it."""

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        require_weights_only(self.config_init[self.subcommand])  # as read_model_checkpoint
        ckpt_path, init_from = config.get("ckpt_path"), config.get("init_from")
        if ckpt_path and init_from:
            raise ConfigError(
                "pass --ckpt_path (resume a fit) or --init_from (start from a model), not both"
            )
        data: TransitionsDataModule = self.datamodule
        model: DynamicsEnsemble = self.model.model
        if not isinstance(model, DynamicsEnsemble):
            raise ConfigError(
                f"mbvi fit-model trains a DynamicsEnsemble, got {type(model).__name__}"
            )
        kind = data.build_model(model)
        for path in (ckpt_path, init_from):
            if path:
                spec, state = read_model_checkpoint(path)
                check_model_spec(spec, path, data.env_id, model)
                data.refit_normalisers = False  # the weights were fitted to those
                if path == init_from:
                    model.load_state_dict(state)
        data.load()  # a bad data file fails here, before an MLflow run exists
        self.trainer.callbacks.append(_RecordModel(data.env_id))
        logger = self.trainer.logger
        if isinstance(logger, MLflowTracker):
            logger.default_run_name(f"{data.env_id}-dynamics-E{model.members}")
            logger.check_reachable()
            logger.log_hyperparams({
                "env_id": data.env_id, "data": str(data.path), "termination": kind,
                "transitions": data.n_transitions,
                **{k: v for k, v in dynamics_spec(model, data.env_id).items()
                   if k in _SIZES},
            })  # fmt: skip
        saver = self.trainer.checkpoint_callback
        if saver is not None and saver.dirpath is None:
            run = getattr(logger, "run_id", None) or "local"
            saver.dirpath = str(Path("checkpoints") / "models" / run)


def main(argv: list[str]) -> None:
    """``mbvi fit-model ARGS``: LightningCLI's ``fit`` with ``ARGS``."""
    from mbvi.training.fit_cli import MLflowSaveConfig, stopped_by_sigterm_exits_143

    # `mbvi fit-model ARGS` runs as `fit ARGS`, which LightningCLI warns differs from argv
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    with stopped_by_sigterm_exits_143():
        ModelCLI(
            DynamicsModule,
            TransitionsDataModule,
            trainer_defaults=MODEL_TRAINER_DEFAULTS,
            save_config_callback=MLflowSaveConfig,
            seed_everything_default=False,  # the data module's seed draws the weights
            parser_kwargs={"allow_abbrev": False},  # as `mbvi fit`
            args=["fit", *argv],
        )


if __name__ == "__main__":
    main(sys.argv[1:])
