"""How a dynamics ensemble learns: one LightningModule whose ``training_step`` and
``validation_step`` are the only definition of the model's loss and metrics.

A Lightning ``Trainer`` drives it in ``mbvi fit-model``; inside an agent run,
``fit_transitions`` drives the same two steps in a plain loop (no nested Trainer),
with early stopping on the hold-out loss and elites chosen by hold-out error.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch

from mbvi.errors import ConfigError
from mbvi.models.dynamics import DynamicsEnsemble


def holdout_mask(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Which of the transitions 0..n-1 (by position in the stream, oldest first) are
    held out: a fixed pseudo-random function of the position, so a transition never
    changes side as the data grows and a refit never trains on earlier hold-out rows."""
    i = torch.arange(n, dtype=torch.int64)
    h = (i * 2654435761 + seed * 97531) % 4294967296  # Knuth's multiplicative hash
    return (h.double() / 4294967296.0) < fraction


class DynamicsModule(L.LightningModule):
    """Trains a ``DynamicsEnsemble`` by Gaussian NLL (plus its log-variance bounds).

    Args:
        model: the ensemble (built).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_size: rows per member per training step.
        holdout_fraction: fraction of transitions held out (a fixed split).
        max_epochs: most epochs of one ``fit_transitions`` call.
        patience: epochs without hold-out improvement before stopping.
        seed: seeds the hold-out split and the minibatch order.
    """

    def __init__(
        self,
        model: DynamicsEnsemble,
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        batch_size: int = 256,
        holdout_fraction: float = 0.1,
        max_epochs: int = 20,
        patience: int = 5,
        seed: int = 0,
    ):
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"DynamicsModule: lr must be > 0, got {lr}")
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(
                f"DynamicsModule: holdout_fraction must be in (0, 1), got {holdout_fraction}"
            )
        for name, v in (
            ("batch_size", batch_size),
            ("max_epochs", max_epochs),
            ("patience", patience),
        ):
            if v < 1:
                raise ConfigError(f"DynamicsModule: {name} must be >= 1, got {v}")
        self.model = model
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.holdout_fraction, self.max_epochs, self.patience = (
            holdout_fraction,
            max_epochs,
            patience,
        )
        self.seed = seed
        self._opt: torch.optim.Optimizer | None = None
        self._generator = torch.Generator().manual_seed(seed)

    # ---- the two steps -------------------------------------------------------------------
    def training_step(self, batch, batch_idx=0):
        s, a, r, s2, term = batch
        loss, metrics = self.model.loss(s, a, r, s2, term)
        if self._trainer is not None:
            self.log("model/train_nll", metrics["nll"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx=0) -> dict[str, torch.Tensor]:
        s, a, r, s2, term = batch
        with torch.no_grad():
            _, metrics = self.model.loss(s, a, r, s2, term)
            per_member = self.model.holdout_errors(s, a, r, s2)
        out = {
            "model/holdout_nll": metrics["nll"],
            "model/holdout_mse": per_member[self.model.elite_idx].mean(),
            "per_member_mse": per_member,
        }
        if self._trainer is not None:
            self.log("model/holdout_nll", out["model/holdout_nll"], prog_bar=True)
            self.log("model/holdout_mse", out["model/holdout_mse"])
        return out

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_validation_epoch_end(self) -> None:
        """Under a Trainer: elites by the last hold-out pass (``choose_elites``)."""

    def choose_elites(self, s, a, r, s2) -> torch.Tensor:
        errors = self.model.holdout_errors(s, a, r, s2)
        self.model.set_elites(errors.argsort()[: self.model.elites])
        return errors

    # ---- the in-run loop -----------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        if self._opt is None:
            self._opt = self.configure_optimizers()
        return self._opt

    def optimizer_state(self) -> dict | None:
        return None if self._opt is None else self._opt.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer().load_state_dict(state)

    def fit_transitions(self, s, a, r, s2, term, max_epochs: int | None = None) -> dict[str, float]:
        """Fit on transitions (oldest first) with the fixed hold-out split; stop when the
        hold-out NLL has not improved for ``patience`` epochs and keep the best epoch's
        weights; then choose the elites.  Each member draws its own minibatches."""
        n = s.shape[0]
        held = holdout_mask(n, self.holdout_fraction, self.seed).to(s.device)
        if held.all() or not held.any():  # too few rows for a split: validate on all
            held = torch.zeros(n, dtype=torch.bool, device=s.device)
            train_rows, hold_rows = (
                torch.arange(n, device=s.device),
                torch.arange(n, device=s.device),
            )
        else:
            train_rows, hold_rows = (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)
        data = (s, a, r, s2, term)
        train = tuple(x[train_rows] for x in data)
        hold = tuple(x[hold_rows] for x in data)
        self.model.fit_normalisers(*train[:4])
        opt, e, m = self.optimizer(), self.model.members, train[0].shape[0]
        steps = max(1, math.ceil(m / self.batch_size))
        best, best_state, stale, epochs, train_nll = math.inf, None, 0, 0, math.nan
        for _ in range(max_epochs or self.max_epochs):
            epochs += 1
            order = torch.argsort(torch.rand(e, m, generator=self._generator), dim=1).to(s.device)
            total = 0.0
            for k in range(steps):
                idx = order[:, k * self.batch_size : (k + 1) * self.batch_size]
                loss = self.training_step(tuple(x[idx] for x in train), k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            train_nll = total / steps / e
            holdout_nll = float(self.validation_step(hold)["model/holdout_nll"])
            if holdout_nll < best - 1e-4 * abs(best) if math.isfinite(best) else holdout_nll < best:
                best, stale = holdout_nll, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                stale += 1
                if stale >= self.patience:
                    break
            if not math.isfinite(train_nll):
                break
        if best_state is not None and math.isfinite(train_nll):
            self.model.load_state_dict(best_state)
        self.choose_elites(*hold[:4])
        out = self.validation_step(hold)
        return {
            "model/train_nll": train_nll,
            "model/holdout_nll": float(out["model/holdout_nll"]),
            "model/holdout_mse": float(out["model/holdout_mse"]),
            "model/epochs": float(epochs),
        }
