"""Callbacks the agent installs on its trainer: checkpoints and a progress bar, both
counted in environment steps (not ``trainer.global_step``, which counts optimizer steps)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.auto import tqdm

from mbvi.errors import NonFiniteError


class EnvStepCheckpoint(L.Callback):
    """Writes ``<dirpath>/<run>/last.ckpt`` every ``every`` env steps, at the end of
    training and on Ctrl-C, and copies it to the MLflow run's ``checkpoints/`` artifacts.

    Files are written to a temporary name and renamed, so the last good checkpoint stays
    valid if a write is interrupted.  No checkpoint is written after a failure (a NaN
    loss, say), so the one on disk predates it; nor is one written over it when a
    parameter or a loss since the last log is not finite (``agent.check_finite``).
    """

    def __init__(self, every: int = 10_000, dirpath: str = "checkpoints"):
        self.every, self.dirpath = every, dirpath
        self._saved_at = -1
        self.last_path: Path | None = None

    def _run_dir(self, trainer: L.Trainer) -> Path:
        logger = trainer.logger
        name = getattr(logger, "run_id", None) or "offline"
        return Path(trainer.default_root_dir, self.dirpath, name)

    def save(self, trainer: L.Trainer, agent) -> Path:
        agent.check_finite()
        folder = self._run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path, tmp = folder / "last.ckpt", folder / "last.ckpt.tmp"
        # Lightning's weights_only=False: the full state (optimiser, replay, RNG), not the
        # weights alone; all of it plain data that a weights-only load reads.
        trainer.save_checkpoint(tmp, weights_only=False)
        os.replace(tmp, path)
        self._saved_at, self.last_path = agent.env_steps, path
        if isinstance(trainer.logger, MLFlowLogger):
            trainer.logger.experiment.log_artifact(trainer.logger.run_id, str(path), "checkpoints")
        return path

    def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx) -> None:
        if agent.env_steps % self.every == 0 and agent.env_steps != self._saved_at:
            self.save(trainer, agent)

    def on_train_end(self, trainer, agent) -> None:
        if agent.env_steps != self._saved_at:
            self.save(trainer, agent)

    def on_exception(self, trainer, agent, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteError):
            # Say what is left to resume from: the error is raised where the values are,
            # which knows nothing of checkpoints.
            if self.last_path is None:
                exception.add_note("This run wrote no checkpoint before it.")
            else:
                exception.add_note(
                    f"The last good checkpoint (env step {self._saved_at}) is kept: "
                    f"{self.last_path}"
                )
        # Ctrl-C, or SIGTERM (a scheduler ending a job), which Lightning turns into an
        # exception: both stop a healthy run, so it is resumable and marked KILLED.
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            try:
                path = self.save(trainer, agent)
            except NonFiniteError as err:
                print(f"\ninterrupted at env step {agent.env_steps}; no checkpoint written: {err}")
                return  # the run ends FAILED, not KILLED: it cannot be resumed from here
            print(f"\ninterrupted at env step {agent.env_steps}; checkpoint written to {path}")
            if hasattr(trainer.logger, "mark_killed"):
                trainer.logger.mark_killed()


class EnvStepProgress(L.Callback):
    """A tqdm bar over env steps: last episode return, steps/s and ETA.

    It looks at the clock only every 8 batches and redraws at most every
    ``refresh_s`` seconds, so it costs nothing measurable.
    """

    def __init__(self, refresh_s: float = 1.0):
        self.refresh_s = refresh_s
        self.bar: tqdm | None = None
        self._last = 0.0

    def on_train_start(self, trainer, agent) -> None:
        total = agent.hparams.total_env_steps
        self.bar = tqdm(
            total=total,
            initial=agent.env_steps,
            unit="step",
            dynamic_ncols=True,
            desc=agent.hparams.env_id,
            mininterval=self.refresh_s,
        )
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx) -> None:
        if batch_idx % 8 or self.bar is None:  # a batch is several env steps
            return
        now = time.perf_counter()
        if now - self._last >= self.refresh_s:
            self._last = now
            self.bar.set_postfix(ret=f"{agent.last_episode_return:.1f}", refresh=False)
            self.bar.update(agent.env_steps - self.bar.n)

    def on_train_end(self, trainer, agent) -> None:
        if self.bar is not None:
            self.bar.update(agent.env_steps - self.bar.n)
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, agent, exception: BaseException) -> None:
        self.on_train_end(trainer, agent)


class DeferredInterrupt(L.Callback):
    """Ctrl-C stops training at the end of the current batch, not wherever it lands.

    A KeyboardInterrupt raised inside an MLflow or SQLite call can leave a lock held,
    and the shutdown (checkpoint artifact, run status) then waits on it forever.  While
    training runs, the first Ctrl-C only sets a flag; the interrupt is raised at the
    next batch end (at most ``ENV_STEPS_PER_BATCH`` env steps later, plus an evaluation
    or a world-model refit that falls in them), after that batch's checkpoint and
    logging have completed, and Lightning's handling (checkpoint, KILLED) proceeds from
    there.  A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self._requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self._requested:  # asked twice: do not wait
            self._restore()
            raise KeyboardInterrupt
        self._requested = True
        # A batch can hold an evaluation or a world-model refit: say that the stop is
        # coming, so that the wait is not taken for a hang (and a second Ctrl-C).
        sys.stderr.write(
            "\nmbvi: stopping after this batch (a checkpoint, then the run ends KILLED); "
            "Ctrl-C again to stop at once\n"
        )

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_start(self, trainer, agent) -> None:
        if threading.current_thread() is threading.main_thread():
            self._requested = False
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)

    def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx) -> None:
        if self._requested:
            self._restore()
            raise KeyboardInterrupt

    def on_train_end(self, trainer, agent) -> None:
        self._restore()

    def on_exception(self, trainer, agent, exception: BaseException) -> None:
        self._restore()
