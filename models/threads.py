"""Independent CPU work split across threads, each with one intra-op thread.

Intra-op parallelism splits every op across the cores and joins them again, which
costs little for one large matmul but adds up over the dozens of small ops of a
chunked gradient estimate.  Handing each core whole chunks instead keeps every op
single-threaded and each core's activations in its own cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

_pools: dict[int, tuple[int, ThreadPoolExecutor]] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    pid = os.getpid()
    entry = _pools.get(workers)
    if entry is None or entry[0] != pid:  # a forked child has none of the parent's threads
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mbvi-cpu")
        entry = _pools[workers] = (pid, pool)
    return entry[1]


def run_split(fn: Callable[[T], None], parts: Sequence[T]) -> None:
    """``fn(part)`` for every part, each on its own worker thread with one intra-op
    thread, under the caller's grad and inference modes; returns when all are done
    and re-raises the first failure.  One part runs in the calling thread.

    ``fn`` must only write to disjoint outputs (or thread-local buffers).
    """
    if len(parts) == 1:
        fn(parts[0])
        return
    threads = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(part: T) -> None:
        torch.set_num_threads(1)  # this thread's ops; see the reset below
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(part)

    try:
        futures = [_pool(len(parts)).submit(task, part) for part in parts]
        wait(futures)
        for future in futures:
            future.result()
    finally:
        # torch.set_num_threads also sets the default that new threads start from:
        # give it back the caller's value.
        torch.set_num_threads(threads)


# Per-thread intra-op thread counts need torch's OpenMP backend; with its native
# thread pool, torch.set_num_threads is process-wide, so nothing is split.
_PER_THREAD_COUNTS = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def split_count(chunks: int) -> int:
    """How many threads to split ``chunks`` independent CPU chunks over: the intra-op
    thread count, at most one thread per chunk (1 where torch's parallel backend is not
    OpenMP)."""
    if not _PER_THREAD_COUNTS:
        return 1
    return max(1, min(torch.get_num_threads(), chunks))
