"""The compute pool: results and errors come back to the awaiting coroutine, calls run off the
event loop's thread and in order, cancelled and shut-down calls never run."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stealer.compute import ComputePool


def test_result_exception_and_thread():
    async def main():
        pool = ComputePool(1, name="t")
        try:
            where = await pool.run(lambda: threading.current_thread().name)
            assert where == "t-0"
            assert await pool.run(divmod, 17, 5) == (3, 2)
            with pytest.raises(ZeroDivisionError):
                await pool.run(divmod, 1, 0)
            assert await pool.run(sum, [1, 2, 3]) == 6  # the worker survived the error
        finally:
            pool.shutdown()

    asyncio.run(main())


def test_fifo_order_with_one_worker():
    async def main():
        pool = ComputePool(1)
        seen: list[int] = []
        try:
            await asyncio.gather(*(pool.run(seen.append, i) for i in range(50)))
        finally:
            pool.shutdown()
        assert seen == list(range(50))

    asyncio.run(main())


def test_several_workers_run_at_once():
    async def main():
        pool = ComputePool(2)
        barrier = threading.Barrier(2, timeout=10)
        try:
            # each call waits for the other: only two threads at once can finish
            await asyncio.gather(pool.run(barrier.wait), pool.run(barrier.wait))
        finally:
            pool.shutdown()

    asyncio.run(main())


def test_cancelled_call_does_not_run_and_loop_stays_free():
    async def main():
        pool = ComputePool(1)
        gate = threading.Event()
        ran: list[str] = []
        try:
            blocker = asyncio.ensure_future(pool.run(gate.wait, 10))
            queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
            await asyncio.sleep(0.05)  # the loop runs while the worker is blocked
            queued.cancel()
            gate.set()
            assert await blocker is True
            assert await pool.run(ran.append, "after") is None
            with pytest.raises(asyncio.CancelledError):
                await queued
        finally:
            pool.shutdown()
        assert ran == ["after"]

    asyncio.run(main())


def test_shutdown_cancels_queued_and_refuses_new():
    async def main():
        pool = ComputePool(1)
        gate = threading.Event()
        ran: list[int] = []
        blocker = asyncio.ensure_future(pool.run(gate.wait, 10))
        queued = [asyncio.ensure_future(pool.run(ran.append, i)) for i in range(3)]
        await asyncio.sleep(0.05)
        pool.shutdown(wait=False)  # while the worker is still in the first call
        gate.set()
        assert await blocker is True  # a call in progress finishes and is delivered
        for t in pool._threads:
            t.join(10)
            assert not t.is_alive()
        for fut in queued:
            with pytest.raises(asyncio.CancelledError):
                await fut
        assert ran == []
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(ran.append, 9)

    asyncio.run(main())
