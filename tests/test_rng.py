import random

import numpy as np
import torch

from mbvi.training.rng import capture_rng_state, restore_rng_state


def _draw(gen):
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), gen.random())


def test_round_trip_replays_every_stream_and_loads_weights_only(tmp_path):
    gen = np.random.default_rng(5)
    state = capture_rng_state(gen)
    first = _draw(gen)
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    assert _draw(gen) == first
