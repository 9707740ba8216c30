"""Splitting independent CPU work across worker threads (``mbvi.models.threads``)."""

import threading

import pytest
import torch

import mbvi.models.threads as threads_module
from mbvi.models.threads import run_split, split_count


@pytest.fixture
def two_threads(intra_op_threads):
    intra_op_threads(2)


def test_every_part_runs_once_on_a_worker_with_one_intra_op_thread(two_threads):
    seen = {}

    def fn(part):
        seen[part] = (threading.get_ident(), torch.get_num_threads())

    run_split(fn, [0, 1])
    assert sorted(seen) == [0, 1]
    assert all(ident != threading.get_ident() for ident, _ in seen.values())
    assert all(n == 1 for _, n in seen.values())
    assert torch.get_num_threads() == 2  # the caller keeps its own


def test_a_single_part_runs_in_the_calling_thread(two_threads):
    seen = []
    run_split(lambda part: seen.append((part, threading.get_ident())), ["only"])
    assert seen == [("only", threading.get_ident())]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_workers_run_under_the_callers_autograd_mode(two_threads, mode):
    seen = []

    def fn(part):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    if mode == "no_grad":
        with torch.no_grad():
            run_split(fn, [0, 1])
        assert seen == [(False, False)] * 2
    elif mode == "inference_mode":
        with torch.inference_mode():
            run_split(fn, [0, 1])
        assert seen == [(False, True)] * 2
    else:
        run_split(fn, [0, 1])
        assert seen == [(True, False)] * 2


def test_a_failure_is_raised_after_every_part_has_finished(two_threads):
    finished = []

    def fn(part):
        if part == 0:
            raise ValueError("part 0 failed")
        threading.Event().wait(0.05)
        finished.append(part)

    with pytest.raises(ValueError, match="part 0 failed"):
        run_split(fn, [0, 1])
    assert finished == [1]  # not left running after the caller moved on
    assert torch.get_num_threads() == 2


def test_split_count_is_bounded_by_threads_and_chunks(two_threads):
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP: chunks are never split")
    assert split_count(1) == 1
    assert split_count(13) == 2
    torch.set_num_threads(1)
    assert split_count(13) == 1


def test_nothing_is_split_without_per_thread_counts(two_threads, monkeypatch):
    """torch's native thread pool has one process-wide thread count: no split there."""
    monkeypatch.setattr(threads_module, "_PER_THREAD_COUNTS", False)
    assert split_count(13) == 1
