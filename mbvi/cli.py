"""``mbvi`` command line: ``mbvi fit --config configs/pendulum/sac.yaml``.

Also ``mbvi compare`` (``mbvi.tracking.compare``), ``mbvi table`` (``mbvi.tracking.table``),
``mbvi sweep`` (``mbvi.tracking.sweep``), ``mbvi render`` (``mbvi.training.video``),
``mbvi fit-model`` and ``mbvi export-transitions`` (``mbvi.training.model_cli``,
``mbvi.training.transitions``), and ``mbvi convert-checkpoint --trust OLD NEW``
(``mbvi.training.safe_load``).

Built on LightningCLI, so every constructor argument of the agent, its prior, engine
and value estimate is a documented option (``mbvi fit --help``,
``mbvi fit --print_config``), and components are chosen by ``class_path``.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from mbvi.errors import MbviError
from mbvi.tracking.logger import MLflowTracker
from mbvi.training.agent import VariationalAgent
from mbvi.training.checkpoints import validate_checkpoint
from mbvi.training.safe_load import require_weights_only

TRAINER_DEFAULTS = {
    "logger": {"class_path": "mbvi.tracking.logger.MLflowTracker"},
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": -1,
    "enable_checkpointing": False,  # the agent checkpoints by env steps
    "enable_progress_bar": False,  # the agent's env-step bar replaces Lightning's
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1_000_000,  # the agent logs itself, stepped by env steps
}


class MLflowSaveConfig(SaveConfigCallback):
    """Stores the resolved config as the run's ``config.yaml`` MLflow artifact
    (LightningCLI's default writes to ``trainer.log_dir``, which is None for MLflow)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer, pl_module, stage) -> None:
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            text = self.parser.dump(self.config, skip_none=False)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")


class MbviCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given.

        LightningCLI would overwrite the config with the checkpoint's hyperparameters,
        which silently undoes ``--model.total_env_steps`` when extending a run and hides
        a checkpoint from another env; ``before_fit`` checks the checkpoint instead.
        """

    def before_fit(self) -> None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        require_weights_only(self.config_init[self.subcommand])  # Lightning's own load too
        saved = validate_checkpoint(ckpt_path, self.model) if ckpt_path else {}
        logger = self.trainer.logger
        if isinstance(logger, MLflowTracker):
            logger.default_run_name(self.model.run_name())
            logger.check_reachable()
            if saved.get("run_id"):  # a resumed run names the run it continues
                logger.continue_run(saved["run_id"], saved["env_steps"])


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mbvi`` console script."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":  # table and plots from MLflow, not a LightningCLI command
        from mbvi.tracking.compare import main as compare_main

        sys.exit(compare_main(argv[1:]))
    if argv and argv[0] == "sweep":  # config × grid × seed `mbvi fit` trials as Ray tasks
        from mbvi.tracking.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))
    if argv and argv[0] == "table":  # trains Table 1's cells as `mbvi fit` subprocesses
        from mbvi.tracking.table import main as table_main

        sys.exit(table_main(argv[1:]))
    if os.getcwd() not in sys.path:
        # As with `python -m`: a user's own modules in the working directory can be
        # named by class_path (a prior, an engine) and as env "module:EnvId".
        sys.path.insert(0, os.getcwd())
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    try:
        if argv and argv[0] == "render":  # one episode of a checkpoint's agent as an MP4
            from mbvi.training.video import render_main

            sys.exit(render_main(argv[1:]))
        if argv and argv[0] in ("fit-model", "export-transitions", "convert-checkpoint"):
            _model_command(argv[0], argv[1:])
            return
        MbviCLI(
            VariationalAgent,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=MLflowSaveConfig,
            seed_everything_default=False,  # the agent seeds itself from --model.seed
            auto_configure_optimizers=False,
            args=args,
        )
    except (MbviError, ValueError, TypeError) as err:
        # jsonargparse wraps a component's ConfigError (e.g. Iterative(iterations=0))
        # in a ValueError listing every subtype it tried: report the error itself.
        cause = _mbvi_error(err)
        if cause is None:
            raise
        print(f"mbvi: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _model_command(name: str, argv: list[str]) -> None:
    """``mbvi fit-model`` (a LightningCLI of its own), ``mbvi export-transitions`` and
    ``mbvi convert-checkpoint``."""
    if name == "fit-model":
        from mbvi.training.model_cli import main as fit_model

        fit_model(argv)
    elif name == "convert-checkpoint":
        from mbvi.training.safe_load import convert_main

        convert_main(argv)
    else:
        from mbvi.training.transitions import export_main

        export_main(argv)


def _mbvi_error(err: BaseException | None) -> MbviError | None:
    """The first ``MbviError`` in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MbviError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
