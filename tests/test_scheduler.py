"""Pure runtime state machines: work queue with leases, victim choice, frame assembly, ordering."""

from __future__ import annotations

import numpy as np
import pytest

from stealer.assembly import FrameAssembly, RecentKeys, ResultOrder, StripCache
from stealer.scheduler import TAIL, PeerLoad, TaskRef, WorkQueue, choose_victim


def refs(frame, n, source="src"):
    return [TaskRef(source, frame, t) for t in range(n)]


def test_queue_is_fifo_and_leases_every_task():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 3) + [TaskRef("src", 0, TAIL)])
    assert q.take("me", 0.0) == TaskRef("src", 0, 0)
    assert q.take("thief", 0.0) == TaskRef("src", 0, 1)
    assert q.holder(TaskRef("src", 0, 1)) == "thief" and len(q) == 2
    assert q.take("pi", 0.0, accept_tail=False) == TaskRef("src", 0, 2)
    assert q.take("pi", 0.0, accept_tail=False) is None  # only a tail is left
    assert q.queued_tails == 1
    assert q.take("big", 0.0) == TaskRef("src", 0, TAIL)
    assert q.queued_tails == 0
    q.peer_lost("big")
    assert q.queued_tails == 1 and q.done(TaskRef("src", 0, TAIL)) and q.queued_tails == 0


def test_preferred_ready_task_within_the_window_goes_first():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 12))
    not_ready = {0, 1}
    ready = lambda r: r.task not in not_ready  # noqa: E731
    liked = {5, 11}
    prefer = lambda r: r.task in liked  # noqa: E731
    # task 2 is the first ready one; 5 is liked and ready and within 8 after it: it goes first
    assert q.take("t", 0.0, ready=ready, prefer=prefer) == TaskRef("src", 0, 5)
    # then 11 is liked but more than 3 tasks past the first ready one: the order holds
    assert q.take("t", 0.0, ready=ready, prefer=prefer, window=3) == TaskRef("src", 0, 2)
    # a liked task that is not ready never goes first
    liked.add(0)
    assert q.take("t", 0.0, ready=ready, prefer=prefer) == TaskRef("src", 0, 11)
    # nothing ready: the first task, whatever prefer says
    not_ready.update(range(12))
    assert q.take("t", 0.0, ready=ready, prefer=prefer) == TaskRef("src", 0, 0)


def test_end_tiles_ends_leases_and_queued_copies_of_one_frame_only():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 4) + refs(1, 2))
    assert q.take("thief", 0.0) == TaskRef("src", 0, 0)
    assert q.take("me", 0.0) == TaskRef("src", 0, 1)
    q.peer_lost("thief")  # tile 0 queued again (its first result may still arrive)
    q.add([TaskRef("src", 0, TAIL)], front=True)  # this node is the gateway too
    assert q.queued_tiles == 5 and q.queued_tails == 1
    assert q.end_tiles("src", 0) == 4  # tiles 0, 2, 3 queued, tile 1 leased
    assert list(q.queue) == [TaskRef("src", 0, TAIL)] + refs(1, 2)
    assert not q.leases and q.queued_tiles == 2 and q.queued_tails == 1
    assert q.end_tiles("src", 0) == 0
    assert q.end_tiles("other", 1) == 0 and len(q) == 3
    # nothing of the frame comes back: no lease is left to expire
    assert q.expire(100.0) == []


def test_ready_tasks_go_first_and_the_first_task_when_none_is_ready():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 3) + refs(1, 3) + [TaskRef("src", 1, TAIL)])
    done: set[TaskRef] = set()
    producers = {1: 0, 2: 0}  # tasks 1 and 2 of a frame wait for task 0 of the same frame

    def ready(r: TaskRef) -> bool:
        return r.task not in producers or TaskRef(r.source, r.frame, producers[r.task]) in done

    assert q.take("a", 0.0, ready=ready) == TaskRef("src", 0, 0)
    # frame 0's task 0 is running: the next frame's producer goes before its waiting dependants
    assert q.take("b", 0.0, ready=ready) == TaskRef("src", 1, 0)
    assert q.take("c", 0.0, ready=ready, accept_tail=False) == TaskRef("src", 0, 1)  # none ready: first
    assert q.take("d", 0.0, ready=ready) == TaskRef("src", 1, TAIL)  # a tail is always ready
    assert q.queued_tails == 0
    done.add(TaskRef("src", 1, 0))
    assert q.take("e", 0.0, ready=ready) == TaskRef("src", 1, 1)  # ready now, ahead of frame 0's
    assert list(q.queue) == [TaskRef("src", 0, 2), TaskRef("src", 1, 2)]
    assert q.take("f", 0.0, ready=lambda r: False, accept_tail=False) == TaskRef("src", 0, 2)


def test_lost_holder_requeues_in_order_at_front_and_done_drops_duplicates():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 4))
    a, b, c = (q.take("thief", 0.0) for _ in range(3))
    assert q.done(b)
    assert q.peer_lost("thief") == [a, c]
    assert list(q.queue) == [a, c, TaskRef("src", 0, 3)] and q.requeued == 2
    assert not q.done(b)  # a late duplicate of an acknowledged task is unknown
    assert q.done(a) and list(q.queue) == [c, TaskRef("src", 0, 3)]  # the first run's result counted


def test_expired_leases_requeue_and_next_deadline():
    q = WorkQueue("me", lease_seconds=2)
    q.add(refs(0, 2))
    a = q.take("slow", 0.0)
    b = q.take("fast", 1.0)
    assert q.next_deadline() == 2.0
    assert q.expire(1.5) == [] and q.expire(2.0) == [a]
    assert q.holder(b) == "fast" and list(q.queue) == [a]


def test_drop_frame_forgets_queued_and_leased_tasks():
    q = WorkQueue("me", lease_seconds=2)
    q.add(refs(0, 2) + refs(1, 2))
    q.take("x", 0.0)
    assert q.drop_frame("src", 0) == 2
    assert list(q.queue) == refs(1, 2) and not q.leases


@pytest.mark.parametrize(
    "loads, want_tails, expected",
    [
        pytest.param({}, True, None, id="nobody"),
        pytest.param({"a": PeerLoad(0, 0)}, True, None, id="idle-peers"),
        pytest.param({"a": PeerLoad(3, 0), "b": PeerLoad(5, 0)}, True, "b", id="most-tiles"),
        pytest.param({"a": PeerLoad(3, 0), "b": PeerLoad(0, 1)}, True, "b", id="tail-outweighs-tiles"),
        pytest.param({"a": PeerLoad(40, 0), "b": PeerLoad(0, 1), "c": PeerLoad(50, 0)}, True, "b",
                     id="tails-first"),
        pytest.param({"a": PeerLoad(40, 1), "b": PeerLoad(0, 2)}, True, "a", id="then-most-work"),
        pytest.param({"a": PeerLoad(3, 0), "b": PeerLoad(0, 1)}, False, "a", id="no-tails-for-small-nodes"),
        pytest.param({"a": PeerLoad(2, 0, rtt=0.01), "b": PeerLoad(2, 0, rtt=0.001)}, True, "b", id="tie-by-rtt"),
        pytest.param({"me": PeerLoad(9, 0), "a": PeerLoad(1, 0)}, True, "a", id="never-self"),
    ],
)
def test_choose_victim(loads, want_tails, expected):
    assert choose_victim(loads, want_tails=want_tails, tile_seconds=0.1, tail_seconds=1.0,
                         exclude=["me"]) == expected


def test_frame_assembly_stitches_and_drops_duplicates():
    tiles = [(0, 2, 0, 3), (0, 2, 3, 5), (2, 4, 0, 5)]
    fa = FrameAssembly((2, 4, 5), tiles)
    full = np.arange(40, dtype=np.float32).reshape(2, 4, 5)
    for t, (y0, y1, x0, x1) in reversed(list(enumerate(tiles))):
        assert fa.add(t, full[:, y0:y1, x0:x1].copy())
        assert fa.complete == (t == 0)
    assert np.array_equal(fa.output, full)
    assert not fa.add(1, np.zeros((2, 2, 2), np.float32)) and fa.duplicates == 1
    assert np.array_equal(fa.output, full)  # the first result won
    with pytest.raises(ValueError, match="must be float32"):
        fa.add(0, np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="not a tile"):
        fa.add(3, np.zeros((2, 2, 2), np.float32))


def test_strip_cache_caps_bytes_by_evicting_oldest_frames():
    cache = StripCache(max_bytes=3 * 400)
    strip = np.zeros(100, np.float32)  # 400 bytes
    cache.put("f0", 0, strip)
    cache.put("f0", 1, strip)
    cache.put("f1", 0, strip)
    assert cache.get("f0", [0, 1]) is not None and cache.get("f0", [0, 2]) is None
    cache.put("f2", 0, strip)  # 4 strips > cap: frame f0 goes whole
    assert cache.get("f0", [0]) is None and cache.evicted_frames == 1
    assert cache.nbytes == 800 and cache.get("f2", [0]) is not None
    big = np.zeros(1000, np.float32)
    cache.put("f3", 0, big)  # alone over the cap: older frames go, the current one stays
    assert cache.get("f3", [0]) is not None and len(cache) == 1
    cache.drop("f3")
    assert cache.nbytes == 0


def test_results_released_in_frame_order_per_source():
    order = ResultOrder()
    for f in (5, 6, 7):
        order.expect("a", f)
    order.expect("b", 0)
    assert order.finish("a", 6, "r6") == []
    assert order.finish("b", 0, "b0") == [(0, "b0")]
    assert order.finish("a", 5, "r5") == [(5, "r5"), (6, "r6")]
    assert order.pending("a") == [7]
    with pytest.raises(ValueError, match="never announced"):
        order.finish("a", 99, "x")
    order.expect("a", 3)  # late announcement of an older frame (a restarted frame after a takeover)
    order.expect("a", 8)
    assert order.pending("a") == [3, 7, 8]
    assert order.finish("a", 7, "r7") == [] and order.finish("a", 3, "r3") == [(3, "r3"), (7, "r7")]


def test_take_ref_leases_a_named_task():
    q = WorkQueue("me", lease_seconds=5)
    q.add(refs(0, 3))
    assert q.take_ref(TaskRef("src", 0, 1), "w", 0.0)
    assert not q.take_ref(TaskRef("src", 0, 1), "w", 0.0)
    assert list(q.queue) == [TaskRef("src", 0, 0), TaskRef("src", 0, 2)] and q.holder(TaskRef("src", 0, 1)) == "w"


def test_speculation_picks_the_oldest_straggler_once():
    q = WorkQueue("me", lease_seconds=60)
    q.add(refs(0, 4))
    a = q.take("fast", 0.0)
    q.done(a, now=1.0)  # typical tile time: 1 s
    b = q.take("slow", 1.0)
    c = q.take("slow", 2.0)
    assert q.speculate("idle", 2.5, min_age=0.5) is None  # nothing older than 2x typical yet
    assert q.speculate("idle", 4.0, min_age=0.5) == b
    assert q.speculate("idle", 4.5, min_age=0.5) == c  # b is already speculated
    assert q.speculate("slow", 9.0, min_age=0.5) is None  # never your own task
    assert q.holder(b) == "slow"  # the original lease stays
    assert q.done(b, now=5.0) and not q.done(b)  # first result wins, the copy is a duplicate


def test_recent_keys_are_bounded():
    keys = RecentKeys(cap=3)
    for k in range(5):
        keys.add(k)
    assert len(keys) == 3 and 4 in keys and 1 not in keys


def test_fill_missing_zeroes_and_reports():
    fa = FrameAssembly((1, 2, 4), [(0, 2, 0, 2), (0, 2, 2, 4)])
    fa.add(0, np.ones((1, 2, 2), np.float32))
    assert fa.fill_missing() == [1] and fa.complete
    assert fa.output[:, :, 2:].sum() == 0 and fa.missing_fraction([1]) == 0.5
    assert not fa.add(1, np.ones((1, 2, 2), np.float32))  # a late tile is a duplicate now
