"""Compute slots: worker threads that run kernels off the event loop.

Every task crosses from the event loop to a worker thread and back, so that hop is part of
the runtime's cost per task. ``loop.run_in_executor`` with a ``ThreadPoolExecutor`` pays for
a ``concurrent.futures.Future`` (with its condition variable), a work item, an idle-thread
semaphore and a chained asyncio future on every call; measured on this project's 2-core VM
it cost 92 us per hop against 72 us for this pool, and 41 us against 28 us with three busy
nodes in one process (``bench/runtime.py``). Here a job is a tuple on a ``SimpleQueue``
(implemented in C, blocks without the GIL) and the result goes straight to the asyncio
future through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_STOP = None  # queue sentinel: one per worker at shutdown


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():  # the awaiting task may have been cancelled meanwhile
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class ComputePool:
    """``workers`` threads running submitted callables in FIFO order.

    Parameters
    ----------
    workers : int
        Number of threads (a node's compute slots), at least 1.
    name : str
        Thread name prefix, for debuggers and ``py-spy``.
    """

    def __init__(self, workers: int, name: str = "compute") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        self._started = False
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread and return (or raise) what it did.

        Cancelling the caller does not stop a call that already started (threads cannot be
        interrupted); its result is dropped.

        Raises
        ------
        RuntimeError
            If the pool was shut down.
        """
        if self._closed:
            raise RuntimeError("compute pool is shut down")
        if not self._started:
            self._started = True
            for t in self._threads:
                t.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return await fut

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            loop, fut, fn, args = job
            if fut.cancelled():  # read without the loop's lock: at worst the call runs in vain
                continue
            try:
                value = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                try:
                    loop.call_soon_threadsafe(_set_exception, fut, exc)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
                continue
            try:
                loop.call_soon_threadsafe(_set_result, fut, value)
            except RuntimeError:
                pass

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new calls, cancel the queued ones, and stop the threads (joined when
        ``wait``) once each finished the call it is in. Call from the event loop thread."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job[1].cancel()
        if not self._started:
            return
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            for t in self._threads:
                t.join()
