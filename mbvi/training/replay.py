"""Replay buffer of preallocated tensors."""

from __future__ import annotations

import warnings

import torch


class ReplayBuffer:
    """Ring buffer of transitions (s, a, r, s', terminated) as preallocated tensors.

    Args:
        capacity: number of transitions kept; older ones are overwritten.
        obs_dim, act_dim: sizes of one observation and one action (in [-1, 1]^A).
        device: where the tensors live (sampling returns tensors on this device).
        seed: seeds the buffer's own random generator, which ``sample`` draws indices
            from; its state is checkpointed.  It is a CPU generator whatever the
            device, so a seed draws the same batches on CPU and GPU and a checkpoint
            resumes on either.
    """

    FIELDS = ("obs", "act", "rew", "next_obs", "term")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device="cpu", seed: int = 0):
        self.capacity, self.device = capacity, torch.device(device)
        # One row per transition, the fields as column views of it: a batch is one
        # gather of rows (``sample``), not one per field.
        self._widths = (obs_dim, act_dim, 1, obs_dim, 1)  # in the order of FIELDS
        self.rows = torch.empty(capacity, sum(self._widths), device=device)
        self.obs, self.act, self.rew, self.next_obs, self.term = self._fields(self.rows)
        self.size, self.pos = 0, 0
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, act, rew: float, next_obs, terminated: bool) -> None:
        """Store one transition; ``obs``/``next_obs``/``act`` are array-likes."""
        i = self.pos
        self.obs[i] = torch.as_tensor(obs)
        self.act[i] = torch.as_tensor(act)
        self.rew[i] = rew
        self.next_obs[i] = torch.as_tensor(next_obs)
        self.term[i] = float(terminated)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def add_batch(self, obs, act, rew, next_obs, term) -> None:
        """Store M transitions at once (tensors [M,·]; rewards and flags [M]), oldest
        overwritten first, as M calls of ``add`` would."""
        rows = torch.cat(
            [obs, act, rew.unsqueeze(-1), next_obs, term.float().unsqueeze(-1)], -1
        ).to(self.rows.device, self.rows.dtype)[-self.capacity :]
        idx = (torch.arange(rows.shape[0], device=self.rows.device) + self.pos) % self.capacity
        self.rows[idx] = rows
        self.pos = int((self.pos + rows.shape[0]) % self.capacity)
        self.size = min(self.size + rows.shape[0], self.capacity)

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """A uniform batch (obs, act, rew, next_obs, term) of ``batch_size`` transitions,
        drawn with ``generator``, a CPU generator (default: the buffer's own, which
        training uses).  The indices move to the device in one small copy."""
        generator = self.generator if generator is None else generator
        idx = torch.randint(0, self.size, (batch_size,), generator=generator).to(self.device)
        return self._fields(self.rows[idx])

    def _fields(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of ``rows`` [N, width] as (obs [N,S], act [N,A], rew [N], next_obs, term [N])."""
        obs, act, rew, next_obs, term = rows.split(self._widths, dim=1)
        return obs, act, rew.squeeze(1), next_obs, term.squeeze(1)

    def _chronological(self) -> torch.Tensor:
        """Indices of the stored transitions, oldest first."""
        start = self.pos if self.size == self.capacity else 0
        return (torch.arange(self.size, device=self.device) + start) % self.capacity

    def transitions(self) -> tuple[torch.Tensor, ...]:
        """Every stored transition, oldest first: (obs, act, rew, next_obs, term), the
        same shapes as ``sample``'s.  Consecutive rows follow each other in the env
        unless an episode ended between them."""
        return self._fields(self.rows[self._chronological()])

    def state_dict(self) -> dict:
        """The stored transitions, oldest first (only the filled part, so a checkpoint
        early in training stays small and a resumed run may change the capacity)."""
        order = self._chronological()
        return {
            **{f: getattr(self, f)[order].cpu() for f in self.FIELDS},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        n = len(state["rew"])
        keep = min(n, self.capacity)  # a smaller buffer keeps the newest transitions
        for f in self.FIELDS:
            getattr(self, f)[:keep] = state[f][n - keep :].to(self.device)
        self.size, self.pos = keep, keep % self.capacity
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError:  # a CUDA generator's state, saved before sampling moved to CPU
            warnings.warn(
                "the checkpoint's replay generator state is not a CPU generator's (written "
                "by an older mbvi on a GPU): replay sampling continues from a fresh seed",
                stacklevel=2,
            )
            self.generator.manual_seed(self.seed + n)
