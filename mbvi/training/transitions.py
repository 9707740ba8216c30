"""Transitions on disk, for training a world model on its own (``mbvi fit-model``).

A transitions file is a NumPy ``.npz`` (``numpy.savez``) with one row per env step:

| field | shape | meaning |
|---|---|---|
| ``obs`` | [N,S] float | the observation s_t |
| ``act`` | [N,A] float | the action a_t in [-1,1]^A, the agent's scale (see below) |
| ``rew`` | [N] float | the reward r_t |
| ``next_obs`` | [N,S] float | the observation s_{t+1} that ``env.step`` returned |
| ``term`` | [N] 0/1 | 1 where the episode terminated at s_{t+1} (a time-limit truncation is 0) |
| ``env_id`` | [] str, optional | the Gymnasium id of the env the rows come from |

Actions are stored as the agent sees them, on [-1, 1]^A: an env action ``a`` maps
there by ``mbvi.training.env.ActionScaler(env.action_space).from_env(a)``.

An agent checkpoint (``.ckpt``) holds the same fields in its replay buffer, oldest
first; ``mbvi export-transitions --ckpt run.ckpt --out data.npz`` writes them as such a
file, and ``TransitionsDataModule`` reads either.

    data = load_transitions("data.npz", "Pendulum-v1", obs_dim=3, act_dim=1)
    s, a, r, s2, term = data.fields()                     # float32 tensors
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mbvi.errors import MbviError
from mbvi.training.safe_load import load_checkpoint, missing_file

FIELDS = ("obs", "act", "rew", "next_obs", "term")
_ACTION_TOLERANCE = 1e-5  # float32 rounding of a mapped bound action
_HOLDOUT_CHUNK = 8192  # hold-out rows per validation batch


class TransitionsError(MbviError, ValueError):
    """A transitions file or checkpoint buffer that cannot be trained on."""


@dataclass(frozen=True)
class Transitions:
    """N transitions as float32 tensors (shapes as in the module docstring) and the id
    of the env they come from, when known."""

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    term: torch.Tensor
    env_id: str | None = None

    def __len__(self) -> int:
        return self.obs.shape[0]

    def fields(self) -> tuple[torch.Tensor, ...]:
        """(obs, act, rew, next_obs, term): the order ``DynamicsEnsemble.loss`` takes."""
        return self.obs, self.act, self.rew, self.next_obs, self.term


def load_transitions(
    path: str | Path,
    env_id: str | None = None,
    obs_dim: int | None = None,
    act_dim: int | None = None,
) -> Transitions:
    """Read and check a transitions ``.npz``.

    ``env_id``, ``obs_dim`` and ``act_dim`` are what the rows must fit (None: not
    checked); a file's own ``env_id`` must equal ``env_id``.

    Raises:
        TransitionsError: the file is missing or not an ``.npz``, a field is missing, a
            value is NaN or Inf, a shape does not fit the env, the fields' lengths
            differ, a flag is not 0/1 or an action lies outside [-1, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise TransitionsError(
            f"transitions file {str(path)!r} does not exist; pass an .npz written by `mbvi "
            "export-transitions` (or numpy.savez with fields obs, act, rew, next_obs, term)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise TransitionsError(
            f"transitions file {str(path)!r} cannot be read as an .npz ({type(err).__name__}: "
            f"{err})"
        ) from None
    missing = [f for f in FIELDS if f not in arrays]
    if missing:
        raise TransitionsError(
            f"transitions file {str(path)!r} has no field {missing[0]!r} (fields present: "
            f"{', '.join(sorted(arrays)) or 'none'}); it needs {', '.join(FIELDS)}"
        )
    file_env = str(arrays["env_id"]) if "env_id" in arrays else None
    if file_env is not None and env_id is not None and file_env != env_id:
        raise TransitionsError(
            f"transitions file {str(path)!r} holds transitions of env {file_env!r}, not of "
            f"{env_id!r}; pass --data.env_id {file_env} or a file of {env_id!r}"
        )
    fields = {f: arrays[f] for f in FIELDS}
    return check_transitions(fields, f"transitions file {str(path)!r}", obs_dim, act_dim,
                             env_id or file_env)  # fmt: skip


def check_transitions(
    fields: dict,
    where: str,
    obs_dim: int | None = None,
    act_dim: int | None = None,
    env_id: str | None = None,
) -> Transitions:
    """``fields`` (arrays or tensors named as ``FIELDS``) as checked ``Transitions``;
    ``where`` names their source in errors."""
    x = {}
    for f in FIELDS:
        v = fields[f]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.dtype.kind not in "fiub":
            raise TransitionsError(f"{where}: field {f!r} holds {v.dtype} values, not numbers")
        x[f] = v
    env = f"env {env_id!r}" if env_id else "the env"
    for f, dim in (("obs", obs_dim), ("act", act_dim), ("next_obs", obs_dim)):
        shape = x[f].shape
        if len(shape) == 2 and (dim is None or shape[1] == dim):
            continue
        if dim is None:
            raise TransitionsError(f"{where}: field {f!r} has shape {shape}; expected (N, dim)")
        what = "actions" if f == "act" else "observations"
        raise TransitionsError(
            f"{where}: field {f!r} has shape {shape} but {env} has {dim}-dim {what}: "
            f"expected (N, {dim})"
        )
    for f in ("rew", "term"):
        if x[f].ndim != 1:
            raise TransitionsError(f"{where}: field {f!r} has shape {x[f].shape}; expected (N,)")
    lengths = {f: x[f].shape[0] for f in FIELDS}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{f} {n}" for f, n in lengths.items())
        raise TransitionsError(f"{where}: the fields have different lengths ({listed})")
    if lengths["obs"] == 0:
        raise TransitionsError(f"{where} holds no transitions")
    for f in FIELDS:
        bad = ~np.isfinite(x[f].astype(np.float64))
        if bad.any():
            first = tuple(np.argwhere(bad)[0])
            row, value = int(first[0]), x[f][first].item()
            raise TransitionsError(
                f"{where}: field {f!r} has a non-finite value ({value}) in row {row} "
                "(the first bad row); drop or fix those rows"
            )
    flags = x["term"]
    if not np.isin(flags, (0, 1)).all():
        row = int(np.argwhere(~np.isin(flags, (0, 1)))[0][0])
        raise TransitionsError(
            f"{where}: field 'term' must be 0 or 1, but row {row} holds {flags[row].item()}"
        )
    act = np.abs(x["act"])
    if (act > 1 + _ACTION_TOLERANCE).any():
        row = int(np.argwhere((act > 1 + _ACTION_TOLERANCE).any(-1))[0][0])
        raise TransitionsError(
            f"{where}: field 'act' has values outside [-1, 1] (row {row}: {x['act'][row]}); "
            "store actions in the agent's scale, ActionScaler(env.action_space).from_env(a)"
        )
    t = {f: torch.as_tensor(x[f], dtype=torch.float32) for f in FIELDS}
    return Transitions(**t, env_id=env_id)


def transitions_from_checkpoint(
    path: str | Path,
    env_id: str | None = None,
    obs_dim: int | None = None,
    act_dim: int | None = None,
) -> Transitions:
    """The replay buffer of an mbvi agent checkpoint, oldest transition first, with the
    env id of the run that wrote it (loaded with ``weights_only=True``); ``env_id``,
    ``obs_dim`` and ``act_dim`` as in ``load_transitions``.

    Raises:
        TransitionsError: the file is missing or unreadable, is not an agent checkpoint,
            is from another env than ``env_id`` or its buffer does not pass
            ``check_transitions``.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise TransitionsError(
            f"{where} {missing_file(path)}; pass an agent checkpoint "
            "(checkpoints/<run_id>/last.ckpt)"
        )
    ckpt = load_checkpoint(path, where, TransitionsError, "it is not a checkpoint or is truncated")
    state = ckpt.get("mbvi") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "buffer" not in state:
        raise TransitionsError(
            f"{where} was not written by an mbvi agent (no replay buffer under 'mbvi'); "
            "pass a checkpoint of `mbvi fit`"
        )
    saved_env = (ckpt.get("hyper_parameters") or {}).get("env_id", state.get("env_id"))
    if env_id is not None and saved_env is not None and saved_env != env_id:
        raise TransitionsError(
            f"{where} is from env {saved_env!r}, not {env_id!r}; pass --data.env_id "
            f"{saved_env} or a checkpoint of {env_id!r}"
        )
    return check_transitions(state["buffer"], where, obs_dim, act_dim, saved_env or env_id)


def read_transitions(
    path: str | Path, env_id: str, obs_dim: int | None = None, act_dim: int | None = None
) -> Transitions:
    """Transitions of ``env_id`` from an ``.npz`` or, for a ``.ckpt``, an agent
    checkpoint's replay buffer (which must be from ``env_id``)."""
    if Path(path).suffix == ".ckpt":
        return transitions_from_checkpoint(path, env_id, obs_dim, act_dim)
    return load_transitions(path, env_id, obs_dim, act_dim)


def save_transitions(path: str | Path, data: Transitions) -> Path:
    """Write ``data`` as a transitions ``.npz`` (``path`` must end in ``.npz``)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise TransitionsError(f"transitions file {str(path)!r} must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f: getattr(data, f).cpu().numpy() for f in FIELDS}
    if data.env_id is not None:
        arrays["env_id"] = np.array(data.env_id)
    np.savez(path, **arrays)
    return path


def export_main(argv: list[str]) -> int:
    """``mbvi export-transitions --ckpt PATH --out FILE.npz``."""
    parser = argparse.ArgumentParser(
        prog="mbvi export-transitions",
        description="Write an agent checkpoint's replay buffer as a transitions .npz "
        "(fields obs, act, rew, next_obs, term, env_id), for `mbvi fit-model`.",
    )
    parser.add_argument("--ckpt", required=True, help="agent checkpoint (.ckpt) of `mbvi fit`")
    parser.add_argument("--out", required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    data = transitions_from_checkpoint(args.ckpt)
    out = save_transitions(args.out, data)
    print(f"wrote {len(data)} transitions of {data.env_id} to {out}")
    return 0


class TransitionsDataModule(L.LightningDataModule):
    """Transitions of one env, split into training rows and a fixed hold-out set.

    Training batches are ``[E,B,·]``: each epoch, every ensemble member draws its own
    bootstrap sample of the training rows (E from the module being fitted; 1 without
    one).  The hold-out set is scored in chunks of up to 8192 rows.  A row is held out
    by ``holdout_mask`` of its ``transition_keys``: the split ``DynamicsModule.split``
    makes, so a transition stays on its side whatever file it is read from.

    Args:
        path: a transitions ``.npz`` or an agent checkpoint ``.ckpt`` (its replay buffer).
        env_id: the Gymnasium id the transitions come from; its sizes and termination
            build the ensemble.
        batch_size: transitions per member per step.
        holdout_fraction: fraction of transitions held out.
        seed: seeds the hold-out hash, the bootstrap draws and the members' weights.
    """

    def __init__(
        self,
        path: str,
        env_id: str,
        batch_size: int = 256,
        holdout_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        self.path, self.env_id = path, env_id
        self.batch_size, self.holdout_fraction, self.seed = batch_size, holdout_fraction, seed
        self.refit_normalisers = True  # False when the weights come from a checkpoint
        self._env: tuple | None = None
        self._split: tuple | None = None
        self.n_transitions = 0  # read by ``load``

    def env_sizes(self) -> tuple[int, int, torch.nn.Module | None, str]:
        """(obs_dim, act_dim, termination, kind) of ``env_id`` (see ``termination_for_env``)."""
        if self._env is None:
            from mbvi.models.termination import termination_for_env
            from mbvi.training.env import make_env

            env = make_env(self.env_id)
            try:
                termination, kind = termination_for_env(env)
                obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
            finally:
                env.close()
            self._env = (obs_dim, act_dim, termination, kind)
        return self._env

    def build_model(self, model) -> str:
        """Build ``model`` (a ``DynamicsEnsemble``) for the env's sizes and termination,
        its weights drawn from ``seed``; an env with no rule gets a learned head.
        Returns the termination kind."""
        obs_dim, act_dim, termination, kind = self.env_sizes()
        if kind == "learned":
            model.learned_termination = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model.build(obs_dim, act_dim, termination)
        return kind

    def load(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(training rows, hold-out rows), each (s, a, r, s2, term); read once."""
        if self._split is None:
            from mbvi.models.dynamics_module import holdout_mask, transition_keys

            obs_dim, act_dim, _, _ = self.env_sizes()
            data = read_transitions(self.path, self.env_id, obs_dim, act_dim).fields()
            self.n_transitions = data[0].shape[0]
            held = holdout_mask(transition_keys(data[0], data[1]), self.holdout_fraction, self.seed)
            if held.all() or not held.any():  # too few rows to split: score on them all
                self._split = (data, data)
            else:
                self._split = (tuple(x[~held] for x in data), tuple(x[held] for x in data))
        return self._split

    @property
    def train_transitions(self) -> tuple[torch.Tensor, ...] | None:
        """The training rows ``DynamicsModule`` fits its normalisers on (None when the
        weights, and so their normalisers, come from a checkpoint)."""
        return self.load()[0] if self.refit_normalisers else None

    def setup(self, stage: str) -> None:
        self.load()

    def train_dataloader(self):
        module = self.trainer.lightning_module if self.trainer is not None else None
        members = module.model.members if module is not None else 1
        return _Bootstrap(self.load()[0], self.batch_size, members, self.seed)

    def val_dataloader(self):
        return _Chunks(self.load()[1], _HOLDOUT_CHUNK)


class _Bootstrap:
    """Minibatches ``[E,B,·]`` of ``data`` (N rows): each pass, member e trains on its
    own N rows drawn with replacement (PETS's bootstrap)."""

    def __init__(self, data: tuple[torch.Tensor, ...], batch_size: int, members: int, seed: int):
        self.data, self.batch_size, self.members = data, batch_size, members
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.data[0].shape[0] / self.batch_size)

    def __iter__(self):
        n = self.data[0].shape[0]
        boot = torch.randint(0, n, (self.members, n), generator=self.generator)
        for i in range(0, n, self.batch_size):
            rows = boot[:, i : i + self.batch_size]
            yield tuple(x[rows] for x in self.data)


class _Chunks:
    """``data`` (N rows) in consecutive batches of up to ``size`` rows (one loader to
    Lightning, where a list of batches would be many)."""

    def __init__(self, data: tuple[torch.Tensor, ...], size: int):
        self.data, self.size = data, size

    def __len__(self) -> int:
        return math.ceil(self.data[0].shape[0] / self.size)

    def __iter__(self):
        for i in range(0, self.data[0].shape[0], self.size):
            yield tuple(x[i : i + self.size] for x in self.data)
