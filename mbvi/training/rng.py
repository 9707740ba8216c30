"""Capturing and restoring every random stream a run draws from, for exact resumes.

The state is made of tensors, ints, strings and tuples only, so a checkpoint holding it
still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def capture_rng_state(generator: np.random.Generator) -> dict:
    """torch (CPU and CUDA), numpy's global and ``generator``'s, and Python's state."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
        "generator": generator.bit_generator.state,
    }


def restore_rng_state(state: dict, generator: np.random.Generator) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    generator.bit_generator.state = state["generator"]


@contextmanager
def side_stream(seed: int, device: torch.device):
    """Random numbers for measurements (evaluation, amortisation gap) that leave the
    training run's own alone: torch's stream is forked and seeded with ``seed`` for the
    block, and a fresh CPU generator seeded alike is yielded for replay sampling."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)
