"""``mbvi fit``: the LightningCLI over ``VariationalAgent``, its trainer defaults and the
callback that stores the resolved config in the MLflow run.

Kept apart from ``mbvi.cli``, the console script's dispatcher, so that ``mbvi compare``
and ``mbvi sweep`` start without importing Lightning and the agent.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


@contextmanager
def stopped_by_sigterm_exits_143():
    """A LightningCLI run stopped by SIGTERM exits with 143 (128 + SIGTERM), as a killed
    process does, once its checkpoint is written: Lightning's SystemExit would exit 0,
    and a scheduler or a sweep would count the stopped run as done."""
    try:
        yield
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)


def fit(args: list[str] | None) -> None:
    """``mbvi fit ...`` (and LightningCLI's other subcommands) on ``args``."""
    with stopped_by_sigterm_exits_143():
        MbviCLI(
            VariationalAgent,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=MLflowSaveConfig,
            seed_everything_default=False,  # the agent seeds itself from --model.seed
            auto_configure_optimizers=False,
            # A mistyped option is an error, never the one it happens to abbreviate.
            parser_kwargs={"allow_abbrev": False},
            args=args,
        )
