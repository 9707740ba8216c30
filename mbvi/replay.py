"""Replay buffer of preallocated tensors."""

from __future__ import annotations

import torch


class ReplayBuffer:
    """Ring buffer of transitions (s, a, r, s', terminated) as preallocated tensors.

    Args:
        capacity: number of transitions kept; older ones are overwritten.
        obs_dim, act_dim: sizes of one observation and one action (in [-1, 1]^A).
        device: where the tensors live (sampling returns tensors on this device).
        generator: the random generator used by ``sample``; seeded by the agent so
            sampling is reproducible and its state is checkpointed.
    """

    FIELDS = ("obs", "act", "rew", "next_obs", "term")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device="cpu", seed: int = 0):
        self.capacity, self.device = capacity, torch.device(device)
        self.obs = torch.empty(capacity, obs_dim, device=device)
        self.act = torch.empty(capacity, act_dim, device=device)
        self.rew = torch.empty(capacity, device=device)
        self.next_obs = torch.empty(capacity, obs_dim, device=device)
        self.term = torch.empty(capacity, device=device)
        self.size, self.pos = 0, 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

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

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """A uniform batch (obs, act, rew, next_obs, term) of ``batch_size`` transitions."""
        idx = torch.randint(
            0, self.size, (batch_size,), device=self.device, generator=self.generator
        )
        return tuple(getattr(self, f)[idx] for f in self.FIELDS)

    def state_dict(self) -> dict:
        """Only the filled part is saved, so a checkpoint early in training stays small."""
        n = self.size
        return {
            **{f: getattr(self, f)[:n].cpu().clone() for f in self.FIELDS},
            "size": n,
            "pos": self.pos,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        n = state["size"]
        if n > self.capacity:
            raise ValueError(f"checkpoint holds {n} transitions but the buffer capacity is {self.capacity}")
        for f in self.FIELDS:
            getattr(self, f)[:n] = state[f].to(self.device)
        self.size, self.pos = n, state["pos"]
        self.generator.set_state(state["generator"])
