"""How a ``DynamicsEnsemble`` (or any trainable ``WorldModel``) learns: the one
definition of its training and hold-out steps, run either by a Lightning ``Trainer``
(``mbvi fit-model``) or by the plain loop ``fit_transitions`` that the agent calls
every K env steps (MBPO's model training: bootstrap minibatches per member, a fixed
hold-out split, early stopping on the hold-out NLL with the best epoch restored,
elites = lowest hold-out MSE).

    fitter = DynamicsModule(model, max_epochs=20, patience=5)
    metrics = fitter.fit_transitions(s, a, r, s2, term)   # in a run
    trainer.fit(fitter, datamodule)                         # on its own

Shapes: E members, M rows, S state dims, A action dims.

Besides ``loss`` the fit calls only the hooks the ``WorldModel`` base class declares
(``fit_normalisers``, ``holdout_scores``, ``set_elites``), so a user's Pyro program
(``mbvi.pyro.ProgramDynamics``) is fitted by the same loop.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from mbvi.errors import ConfigError
from mbvi.variational.world_model import WorldModel

_MIN_DELTA = 1e-4  # a hold-out NLL must fall by more than this to count as better
_HASH_MOD = 1 << 31


def transition_keys(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An integer key per transition [M] from the bits of its ``s`` [M,S] and ``a``
    [M,A] (as float32): the same transition gets the same key wherever it sits in a
    buffer, on any device."""
    x = torch.cat([s, a], -1).to(torch.float32).contiguous()
    bits = torch.remainder(x.view(torch.int32).to(torch.int64), _HASH_MOD)
    g = torch.Generator().manual_seed(20170526)
    weights = torch.randint(1, _HASH_MOD, (x.shape[-1],), generator=g).to(x.device) | 1
    return torch.remainder(bits * weights, _HASH_MOD).sum(-1) % _HASH_MOD


def holdout_mask(keys: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """True for the keys [M] (int64, >= 0) in the hold-out set: a seeded integer hash of
    each key, mapped to [0, 1), below ``fraction``.  Depends on the key alone."""
    h = torch.remainder(keys + 0x9E3779B1 * (seed + 1), _HASH_MOD)
    for mult in (0x2C1B3C6D, 0x297A2D39):  # two rounds of multiply and xor-shift
        h = torch.remainder(h * mult, _HASH_MOD)
        h = h ^ (h >> 15)
    return h.to(torch.float64) / _HASH_MOD < fraction


def _as_fields(batch) -> tuple[torch.Tensor, ...]:
    """(s, a, r, s2, term) from a tuple/list or a dict (keys s/a/r/s2/term or the
    replay buffer's obs/act/rew/next_obs/term)."""
    if isinstance(batch, dict):
        names = ("s", "a", "r", "s2", "term") if "s" in batch else (
            "obs", "act", "rew", "next_obs", "term")  # fmt: skip
        return tuple(batch[k] for k in names)
    return tuple(batch)


class DynamicsModule(L.LightningModule):
    """Trains a ``DynamicsEnsemble`` by its Gaussian NLL (``DynamicsEnsemble.loss``), or
    another trainable ``WorldModel`` by its own ``loss``.

    With a ``Trainer``, batches are (s, a, r, s2, term) tuples or dicts of rows [M,·]
    (shared by the members) or [E,M,·] (each member's own); the validation loader
    holds the hold-out transitions.  The normalisers are fitted in ``on_fit_start``
    from the datamodule's ``train_transitions`` attribute, (s, a, r, s2, term) of its
    training split, when it has one (else they are left as they are), and the elites
    are chosen after each validated epoch.  Add Lightning's ``EarlyStopping`` on
    ``model/holdout_nll`` for early stopping there.

    Args:
        model: the ensemble to train (built).
        lr: Adam learning rate.
        weight_decay: Adam's L2 weight decay on all parameters.
        batch_size: transitions per member per step (plain loop).
        holdout_fraction: fraction of transitions held out (a fixed split, see
            ``split``).
        max_epochs: at most this many epochs per ``fit_transitions`` call.
        patience: epochs without a better hold-out NLL before a fit stops.
        seed: seeds the hold-out hash and the bootstrap draws.
    """

    def __init__(
        self,
        model: WorldModel,
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
        if weight_decay < 0:
            raise ConfigError(f"DynamicsModule: weight_decay must be >= 0, got {weight_decay}")
        for name, v in (("batch_size", batch_size), ("max_epochs", max_epochs),
                        ("patience", patience)):  # fmt: skip
            if v < 1:
                raise ConfigError(f"DynamicsModule: {name} must be >= 1, got {v}")
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(
                f"DynamicsModule: holdout_fraction must be in (0, 1), got {holdout_fraction}; "
                "0.1 holds out one transition in ten"
            )
        self.model = model
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.holdout_fraction = holdout_fraction
        self.max_epochs, self.patience = max_epochs, patience
        self.seed = seed
        self.history: list[float] = []  # hold-out NLL per epoch of the last fit
        self._optimizer: torch.optim.Optimizer | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._plain_loop = False
        self._val_sums: list | None = None
        self._val_mse: torch.Tensor | None = None

    # ---- the steps ---------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        """The model's loss on one batch; logs ``model/train_nll`` under a Trainer."""
        loss, metrics = self.model.loss(*_as_fields(batch))
        if self._trainer is not None and not self._plain_loop:
            self.log("model/train_nll", metrics["nll"], prog_bar=True)
        self._last_train_nll = metrics["nll"]
        return loss

    def holdout_metrics(self, s, a, r, s2, term=None) -> dict[str, torch.Tensor]:
        """Hold-out scores of rows [M,·] in normalised target space:
        ``model/holdout_nll`` (the mean over all members: what early stopping watches),
        ``model/holdout_mse`` (of the current elites' means) and
        ``model/holdout_mse_per_member`` [E] (what elites are chosen by)."""
        nll, mse = self.model.holdout_scores(s, a, r, s2)
        return {
            "model/holdout_nll": nll.mean(),
            "model/holdout_mse": mse[_elite_idx(self.model)].mean(),
            "model/holdout_mse_per_member": mse,
        }

    def validation_step(self, batch, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        s, a, r, s2, term = _as_fields(batch)
        out = self.holdout_metrics(s, a, r, s2, term)
        if self._trainer is not None and not self._plain_loop:
            n = s.shape[0]
            self.log("model/holdout_nll", out["model/holdout_nll"], batch_size=n, prog_bar=True)
            self.log("model/holdout_mse", out["model/holdout_mse"], batch_size=n)
            if self._val_sums is not None:
                self._val_sums[0] += out["model/holdout_mse_per_member"] * n
                self._val_sums[1] += n
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        try:  # one fused kernel per step where torch has it for this device
            return torch.optim.Adam(params, fused=True, **kwargs)
        except RuntimeError:
            return torch.optim.Adam(params, **kwargs)

    # ---- Trainer hooks -----------------------------------------------------------------
    def on_fit_start(self) -> None:
        data = getattr(self.trainer.datamodule, "train_transitions", None)
        if data is not None:
            s, a, r, s2 = (x.to(_device(self.model)) for x in data[:4])
            self.model.fit_normalisers(s, a, r, s2)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [0.0, 0]

    def on_validation_epoch_end(self) -> None:
        sums, self._val_sums = self._val_sums, None
        if sums is not None and sums[1] > 0 and not self.trainer.sanity_checking:
            self._val_mse = sums[0] / sums[1]

    def on_train_epoch_end(self) -> None:
        """Elites from the epoch's validation (which Lightning runs before this hook)."""
        if self._val_mse is not None:
            self.choose_elites(self._val_mse)
            self._val_mse = None

    # ---- the plain loop ----------------------------------------------------------------
    def split(self, n: int, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(train indices, hold-out indices) of ``n`` rows.  Row i is held out when a
        seeded hash of its key is below ``holdout_fraction``: ``keys[i]`` (e.g.
        ``transition_keys(s, a)``) or, without keys, i itself (its index in the
        stream).  A row's membership never depends on the other rows, so refits on a
        growing buffer never train on an earlier hold-out transition."""
        keys = torch.arange(n) if keys is None else keys
        held = holdout_mask(keys, self.holdout_fraction, self.seed)
        idx = torch.arange(n, device=held.device)
        return idx[~held], idx[held]

    def choose_elites(self, per_member_mse: torch.Tensor) -> None:
        """Elites = the ``model.elites`` members with the lowest hold-out MSE."""
        self.model.set_elites(per_member_mse.argsort()[: self.model.elites].cpu())

    def fit_transitions(self, s, a, r, s2, term, max_epochs: int | None = None) -> dict[str, float]:
        """Fit the model to transitions ``s`` [N,S], ``a`` [N,A], ``r`` [N], ``s2``,
        ``term`` [N], without a Trainer.

        Rows are split by ``split`` with ``transition_keys`` (a transition stays on its
        side of the split wherever it sits in the buffer); the normalisers are fitted
        on the training rows; each epoch every member draws its own bootstrap sample of
        them, in minibatches of ``batch_size`` through ``training_step``.  After the
        epoch (and once before the first) the hold-out NLL is scored; the fit stops
        after ``patience`` epochs without improvement and restores the best weights,
        whose per-member hold-out MSE chooses the elites.  With fewer rows than a
        split needs, the training rows double as the hold-out set.

        Returns ``model/train_nll`` (mean over the last epoch), ``model/holdout_nll``,
        ``model/holdout_mse`` (of the kept weights) and ``model/epochs`` (epochs run).
        """
        model = self.model
        self._require_built()
        dev = _device(model)
        s, a, r, s2, term = (x.to(dev) for x in (s, a, r, s2, term))
        n = s.shape[0]
        if n == 0:
            raise ValueError("fit_transitions needs at least one transition")
        train, hold = (i.to(dev) for i in self.split(n, transition_keys(s, a)))
        if train.numel() == 0 or hold.numel() == 0:
            train = hold = torch.arange(n, device=dev)
        data = (s, a, r, s2, term)
        tr = tuple(x[train] for x in data)
        ho = tuple(x[hold] for x in data)
        model.fit_normalisers(*tr[:4])
        opt = self._plain_optimizer()

        best = self.holdout_metrics(*ho)
        best_state = _snapshot(model)
        since, epochs, train_nll = 0, 0, float("nan")
        self.history = [float(best["model/holdout_nll"])]
        self._plain_loop = True
        try:
            for _ in range(self.max_epochs if max_epochs is None else max_epochs):
                train_nll = self._epoch(tr, opt)
                epochs += 1
                if not math.isfinite(train_nll):
                    break  # the caller reports it; the best weights are restored below
                now = self.holdout_metrics(*ho)
                self.history.append(float(now["model/holdout_nll"]))
                if self.history[-1] < float(best["model/holdout_nll"]) - _MIN_DELTA:
                    best, best_state, since = now, _snapshot(model), 0
                else:
                    since += 1
                    if since >= self.patience:
                        break
        finally:
            self._plain_loop = False
        model.load_state_dict(best_state)
        per_member = best["model/holdout_mse_per_member"]
        self.choose_elites(per_member)
        return {
            "model/train_nll": train_nll,
            "model/holdout_nll": float(best["model/holdout_nll"]),
            "model/holdout_mse": float(per_member[_elite_idx(model)].mean()),
            "model/epochs": float(epochs),
        }

    def _epoch(self, data: tuple[torch.Tensor, ...], opt: torch.optim.Optimizer) -> float:
        """One epoch of bootstrap minibatches [E,batch,·]; the mean training NLL."""
        n, e = data[0].shape[0], self.model.members
        boot = torch.randint(0, n, (e, n), generator=self._generator).to(data[0].device)
        total, steps = 0.0, 0
        for i in range(0, n, self.batch_size):
            rows = boot[:, i : i + self.batch_size]
            loss = self.training_step(tuple(x[rows] for x in data), steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = total + self._last_train_nll
            steps += 1
        return float(total / steps)

    def _require_built(self) -> None:
        if not self.model.built:
            raise ConfigError(
                "DynamicsModule: the model is not built yet (it has no parameters); call "
                "model.build(obs_dim, act_dim) before fitting it"
            )

    def _plain_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._require_built()
            self._optimizer = self.configure_optimizers()
        return self._optimizer

    def optimizer_state(self) -> dict | None:
        """The plain loop's Adam ``state_dict``, with the bootstrap generator's state
        under ``"bootstrap_generator"`` (for a checkpoint; None before the first fit)."""
        if self._optimizer is None:
            return None
        return {**self._optimizer.state_dict(), "bootstrap_generator": self._generator.get_state()}

    def load_optimizer_state(self, state: dict | None) -> None:
        """Restore what ``optimizer_state`` returned (the model must be built)."""
        if state is None:
            return
        state = dict(state)
        generator = state.pop("bootstrap_generator", None)
        self._plain_optimizer().load_state_dict(state)
        if generator is not None:
            self._generator.set_state(generator)


def _device(model: WorldModel) -> torch.device:
    """Where the model's tensors live (its first parameter or buffer)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _elite_idx(model: WorldModel) -> torch.Tensor:
    """The members ``step`` uses: the ensemble's chosen elites, else every member."""
    idx = getattr(model, "elite_idx", None)
    return idx if idx is not None else torch.arange(model.members, device=_device(model))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
