import pytest
import torch

from mbvi.training.replay import ReplayBuffer


def _fill(buf, n, start=0):
    for i in range(start, start + n):
        buf.add([i, i], [0.0], float(i), [i + 1, i + 1], i % 7 == 0)


def test_ring_buffer_overwrites_the_oldest():
    buf = ReplayBuffer(5, 2, 1)
    _fill(buf, 8)
    assert len(buf) == 5
    assert sorted(buf.rew.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_state_round_trip_keeps_order_across_capacities():
    buf = ReplayBuffer(5, 2, 1, seed=3)
    _fill(buf, 8)  # wrapped: holds 3..7
    state = buf.state_dict()
    assert state["rew"].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    bigger = ReplayBuffer(10, 2, 1)
    bigger.load_state_dict(state)
    _fill(bigger, 2, start=8)
    assert len(bigger) == 7
    assert bigger.state_dict()["rew"].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    smaller = ReplayBuffer(3, 2, 1)
    smaller.load_state_dict(state)
    assert smaller.state_dict()["rew"].tolist() == [5.0, 6.0, 7.0]
    # sampling continues the same random stream
    same = ReplayBuffer(5, 2, 1)
    same.load_state_dict(state)
    assert torch.equal(same.generator.get_state(), buf.generator.get_state())


def test_sample_shapes_and_termination_flags():
    buf = ReplayBuffer(20, 2, 1)
    _fill(buf, 20)
    obs, act, rew, next_obs, term = buf.sample(6)
    assert obs.shape == next_obs.shape == (6, 2) and act.shape == (6, 1)
    assert rew.shape == term.shape == (6,)
    torch.testing.assert_close(next_obs, obs + 1)
    torch.testing.assert_close(term, (rew % 7 == 0).float())


def test_a_generator_state_from_a_cuda_buffer_reseeds_with_a_warning():
    """Checkpoints written on a GPU before replay sampling moved to a CPU generator hold
    a CUDA generator's 16-byte state: the buffer loads, and sampling goes on reseeded."""
    buf = ReplayBuffer(5, 2, 1, seed=3)
    _fill(buf, 4)
    state = {**buf.state_dict(), "generator": torch.zeros(16, dtype=torch.uint8)}
    loaded = ReplayBuffer(5, 2, 1, seed=3)
    with pytest.warns(UserWarning, match="continues from a fresh seed"):
        loaded.load_state_dict(state)
    assert len(loaded) == 4 and loaded.sample(8)[0].shape == (8, 2)


def test_add_batch_stores_like_repeated_add():
    one, many = ReplayBuffer(5, 2, 1), ReplayBuffer(5, 2, 1)
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(7, 2, generator=g), torch.rand(7, 1, generator=g)
    rew, nxt, term = torch.randn(7, generator=g), torch.randn(7, 2, generator=g), torch.zeros(7)
    term[3] = 1
    for i in range(7):
        one.add(obs[i], act[i], float(rew[i]), nxt[i], bool(term[i]))
    many.add_batch(obs[:3], act[:3], rew[:3], nxt[:3], term[:3])
    many.add_batch(obs[3:], act[3:], rew[3:], nxt[3:], term[3:])
    assert (one.pos, one.size) == (many.pos, many.size)
    for a, b in zip(one.transitions(), many.transitions()):
        torch.testing.assert_close(a, b)
