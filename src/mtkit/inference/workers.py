"""Decoding batches in parallel CPU processes, forked from the one that loaded the model.

Each worker has one thread and the model it inherited at the fork (nothing is pickled but the
batch and its n-best lists): CTranslate2's inter_threads. In fp32 the output is unchanged.
"""

from __future__ import annotations

import atexit
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from mtkit.data.batching import token_batches
from mtkit.errors import UserError

_TASK: Callable[[Any], Any] | None = None
"""In a worker process: the function it runs, inherited when forked."""


def _start_worker(task: Callable[[Any], Any]) -> None:
    """A worker's start: one thread (GNU OpenMP's thread pool does not survive a fork; a single
    thread never enters it), and the task it inherited."""
    global _TASK
    torch.set_num_threads(1)
    _TASK = task


def _run(job: Any) -> Any:
    return _TASK(job)


def check_workers(workers: int, device: torch.device) -> None:
    """A UserError unless `workers` worker processes can decode here."""
    if workers < 1:
        raise UserError(f"workers {workers}: expected 1 or more")
    if workers == 1:
        return
    if device.type != "cpu":
        raise UserError(f"workers {workers}: worker processes are for CPU decoding")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise UserError(f"workers {workers}: worker processes need fork(), which this platform lacks")
    if multiprocessing.current_process().daemon:
        raise UserError(f"workers {workers}: a daemonic process cannot start worker processes")


def rebalance(lengths: list[int], budget: int, workers: int) -> list[list[int]]:
    """Token-budget batches of `lengths`; with workers, a smaller budget where that fills the
    last round, so no worker idles in it."""
    batches = token_batches(lengths, lengths, budget)
    if workers > 1 and len(batches) % workers:
        rounds = -(-len(batches) // workers)
        fuller = token_batches(lengths, lengths, max(1, budget * len(batches) // (rounds * workers)))
        if len(fuller) == rounds * workers:
            return fuller
    return batches


class WorkerPool:
    """`workers` forked processes running `task`, started on first use and stopped by `close`."""

    def __init__(self, workers: int, task: Callable[[Any], Any]):
        self.workers, self.task, self._pool = workers, task, None

    @property
    def started(self) -> bool:
        """Whether the processes are running (between the first `map` and `close`)."""
        return self._pool is not None

    def map(self, jobs: list) -> Iterator:
        """task(job) for each job, in order, spread over the workers."""
        if self._pool is None:  # forked on first use: the workers inherit everything loaded so far
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                             initializer=_start_worker, initargs=(self.task,))
            atexit.register(self.close)  # before interpreter teardown, which the pool's threads outlive
        try:
            yield from self._pool.map(_run, jobs)
        except BrokenProcessPool:  # a worker died (killed, out of memory): the next call starts afresh
            self.close()
            raise UserError(f"a decoding worker process died (killed, or out of memory) with {self.workers} "
                            "--workers; nothing after the lines already written was translated") from None

    def close(self) -> None:
        """Stop the processes, if started, whatever state they are in: those that do not end on
        the pool's request within seconds (one killed while holding the task queue's lock leaves
        the others waiting on it for ever) are terminated."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        atexit.unregister(self.close)
        processes = list((getattr(pool, "_processes", None) or {}).values())  # the pool's own handles
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 3.0
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive():
                process.kill()  # cannot be ignored: join returns once the kernel has reaped it
                process.join(10.0)
