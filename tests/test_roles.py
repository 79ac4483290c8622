"""The role machines with no network and no event loop: events in, actions out.

Each test here names the defect it guards against; every one failed on the code before the
roles were pure (the node decided these things in the middle of awaits).
"""

from __future__ import annotations

import numpy as np
import pytest

from stealer.config import DEFAULT_LIMITS
from stealer.errors import ProtocolError
from stealer.ftp.plan import make_plan
from stealer.network import Network, builtin_cfg
from stealer.roles import gateway as g
from stealer.roles.gateway import GatewayState
from stealer.roles.membership import Follow, MembershipState, Promote, SendClaim, StepDown
from stealer.roles.source import SourceState, ToGateway
from stealer.scheduler import TAIL, TaskRef, WorkQueue
from stealer.sources import Frame
from stealer.wire.messages import (FrameDone, FrameDrop, FrameFailed, FrameGo, FrameStart, FrameUnknown, FrameWait,
                                   TailDone, TileAck, TileDone, TilesIn, TilesRedo)

PK = "2x2:4:quad"


@pytest.fixture(scope="module")
def plan():
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return make_plan(Network.from_cfg_text(text, seed=11), (2, 2), 4, scheme="quad")


def tile_msg(plan, source: str, frame: int, task: int, strips: bool = True) -> TileDone:
    t = plan.task(task)
    y0, y1, x0, x1 = t.output
    out = np.full((plan.output_shape[0], y1 - y0, x1 - x0), float(task), np.float32)
    return TileDone(source, frame, task, PK, "full", out, sorted(t.produces) if strips else [])


def gateway(plan, **limits) -> GatewayState:
    return GatewayState("gw", lambda key: plan, limits=DEFAULT_LIMITS.replace(**limits) if limits else DEFAULT_LIMITS)


def released(actions) -> list[dict]:
    return [a.result for a in actions if isinstance(a, g.Released)]


def run_frame(gw: GatewayState, plan, source: str, frame: int, now: float = 0.0) -> list:
    out = []
    for t in plan.tasks:
        out += gw.tile_done("thief", tile_msg(plan, source, frame, t.id), now)
    out += gw.tail_done("thief", TailDone(source, frame, "ab" * 32), now)
    gw.validate()
    return out


# ---------------------------------------------------------------------------- gateway
def test_tiles_before_their_frame_start_wait_and_the_frame_is_released(plan):
    """Defect: a frame whose tiles all reached the gateway before its FrameStart was parked
    forever (its result was never released)."""
    gw = gateway(plan)
    acts = []
    for t in plan.tasks:
        acts += gw.tile_done("thief", tile_msg(plan, "src/0", 0, t.id), 0.0)
    # no map allocated; the source is asked, once, to announce the frame again
    assert acts == [g.Notify("src", FrameUnknown("src/0", 0))]
    assert gw.stats.early_tiles == len(plan.tasks) and not gw.frames and gw.stats.frames_unknown == 1
    acts = gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 1.0)
    assert [a for a in acts if isinstance(a, g.QueueTail)] == [g.QueueTail(TaskRef("src/0", 0, TAIL))]
    acts = gw.tail_done("thief", TailDone("src/0", 0, "ab" * 32), 2.0)
    assert [r["frame"] for r in released(acts)] == [0]
    assert g.Notify("src", FrameDone("src/0", 0)) in acts
    gw.validate()
    assert gw.early_bytes == 0 and not gw.frames


def test_early_tiles_are_bounded_and_no_map_is_allocated_for_unannounced_frames(plan):
    """Defect: any peer could make the gateway allocate a full fused map per frame key of its
    choosing."""
    one = tile_msg(plan, "src/0", 0, 0).output.nbytes
    gw = gateway(plan, early_tile_bytes=3 * one)
    for frame in range(100):
        gw.tile_done("evil", tile_msg(plan, "src/0", frame, 0), 0.0)
    assert gw.early_bytes <= 3 * one and gw.stats.early_dropped == 97 and not gw.frames
    assert sorted(gw.early) == [("src/0", f) for f in (97, 98, 99)]  # the newest are kept
    gw.validate()
    gw.expire_early(DEFAULT_LIMITS.early_tile_seconds + 1)  # and none waits forever
    assert not gw.early and gw.early_bytes == 0


def test_a_node_speaks_only_for_its_own_sources(plan):
    """Defect: any connected peer could announce or drop frames in another node's name."""
    gw = gateway(plan)
    assert gw.frame_start("evil", FrameStart("src/0", 0, PK, 8, 8), 0.0) == []
    assert gw.frame_drop("evil", FrameDrop("src/0", 0), 0.0) == []
    assert gw.frame_failed("evil", FrameFailed("src/0", 0, 1, "x"), 0.0) == []
    assert gw.stats.foreign_refused == 3 and not gw.frames
    gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    assert gw.frame_drop("evil", FrameDrop("src/0", 0), 0.0) == [] and ("src/0", 0) in gw.frames


def test_strip_claims_are_checked_against_the_plan(plan):
    """Defect: a tile's claim about the strips it holds was trusted."""
    gw = gateway(plan)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    consumer = next(t for t in plan.tasks if not t.produces)
    bad = tile_msg(plan, "src/0", 0, consumer.id)
    bad = TileDone(bad.source, bad.frame, bad.task, bad.plan, bad.variant, bad.output, [0])
    with pytest.raises(ProtocolError, match="claims strips"):
        gw.tile_done("thief", bad, 0.0)


def test_results_leave_in_order_and_each_exactly_once(plan):
    gw = gateway(plan)
    for f in range(3):
        gw.frame_start("src", FrameStart("src/0", f, PK, 8, 8), 0.0)
    assert released(run_frame(gw, plan, "src/0", 2)) == []
    assert released(run_frame(gw, plan, "src/0", 1)) == []
    assert [r["frame"] for r in released(run_frame(gw, plan, "src/0", 0))] == [0, 1, 2]
    # late duplicates of released frames: acked, never released again
    again = run_frame(gw, plan, "src/0", 1)
    assert released(again) == [] and gw.stats.duplicates_dropped >= len(plan.tasks)
    # announced again (the source missed the FrameDone): told again, not run again
    assert gw.frame_start("src", FrameStart("src/0", 1, PK, 8, 8), 0.0) == [g.Notify("src", FrameDone("src/0", 1))]


@pytest.mark.parametrize("limit, value, error", [
    pytest.param("max_waiting_frames", 1, "max_waiting_frames", id="waiting"),
    pytest.param("result_buffer_bytes", 1, "result_buffer_bytes", id="bytes"),
    pytest.param("max_sources_per_node", 1, "max_sources_per_node", id="sources"),
])
def test_bounds_are_enforced_and_a_refused_frame_is_released_with_an_error(plan, limit, value, error):
    """Defect: max_queued_frames and result_buffer_bytes were documented, never enforced. A
    frame that can never be admitted is released with the reason."""
    extra = {"max_queued_frames": 1} if limit == "max_waiting_frames" else {}
    gw = gateway(plan, **{limit: value}, **extra)
    acts = []
    for f in range(3):
        acts += gw.frame_start("src", FrameStart(f"src/{f if limit == 'max_sources_per_node' else 0}", f, PK, 8, 8),
                               0.0)
    gw.validate()
    assert len(gw.frames) <= 2
    while gw.frames:  # the admitted frames finish (and those that waited); the refused follow in order
        for key in list(gw.frames):
            acts += run_frame(gw, plan, *key)
    out = released(acts)
    assert sorted(r["frame"] for r in out) == [0, 1, 2]  # every frame released exactly once
    refused = [r for r in out if "error" in r]
    assert refused and all(error in r["error"] for r in refused)


def test_a_bad_frame_start_is_refused_at_the_door(plan):
    """Defect: a FrameStart with img_w = 0 made every task fail, re-leased forever."""
    gw = gateway(plan)
    acts = gw.frame_start("src", FrameStart("src/0", 0, PK, 0, 8), 0.0)
    assert "out of range" in released(acts)[0]["error"] and not gw.frames


def test_a_failed_frame_is_released_in_order_with_its_error(plan):
    gw = gateway(plan)
    for f in range(2):
        gw.frame_start("src", FrameStart("src/0", f, PK, 8, 8), 0.0)
    assert released(run_frame(gw, plan, "src/0", 1)) == []
    acts = gw.frame_failed("src", FrameFailed("src/0", 0, 3, "malformed grant"), 1.0)
    res = released(acts)
    assert [r["frame"] for r in res] == [0, 1]
    assert res[0]["failed_task"] == 3 and "malformed grant" in res[0]["error"] and "error" not in res[1]


def test_a_lost_source_node_leaves_nothing_behind(plan):
    gw = gateway(plan)
    for f in range(3):
        gw.frame_start("src", FrameStart("src/0", f, PK, 8, 8), 0.0)
    gw.tile_done("thief", tile_msg(plan, "src/0", 0, 0), 0.0)
    gw.source_lost("src")
    gw.validate()
    assert not gw.frames and not gw.sources and gw.held_bytes == 0 and not gw.order.sources()
    # it comes back and starts its frames again: they finish
    gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    assert [r["frame"] for r in released(run_frame(gw, plan, "src/0", 0))] == [0]


def test_gateway_memory_stays_constant_over_many_frames(plan):
    """Defect: a long-running gateway remembered every frame it finished."""
    gw = gateway(plan, finished_frames_remembered=64)
    for f in range(500):
        gw.frame_start("src", FrameStart("src/0", f, PK, 8, 8), 0.0)
        assert len(released(run_frame(gw, plan, "src/0", f))) == 1
    assert len(gw.finished) == 64 and not gw.frames and not gw.early and not gw.order.sources()


# ---------------------------------------------------------------------------- source
def frame(n: int) -> Frame:
    return Frame(n, 8, 8, np.zeros((3, 8, 8), np.float32))


def test_resend_on_a_new_gateway_queues_every_task_exactly_once(plan):
    """Defect: the resend after a takeover could drop a frame's tasks without queueing them
    again, and raced with the source loop, so tasks could be queued twice."""
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    acts = src.new_frame("src/0", frame(0), 0.0)
    assert acts == [ToGateway(FrameStart("src/0", 0, PK, 8, 8))]
    taken = q.take("thief", 0.0)
    src.announced(("src/0", 0), "gw1")
    acts = src.gateway_changed("gw2")
    assert [a.msg for a in acts] == [FrameStart("src/0", 0, PK, 8, 8)]
    assert sorted(r.task for r in q.queue) == [t.id for t in plan.tasks] and taken not in q.leases
    src.validate()
    # a frame no gateway heard of yet is only announced, its tasks are not queued again
    src.new_frame("src/0", frame(1), 0.0)
    before = list(q.queue)
    src.gateway_changed("gw2")
    assert [r for r in q.queue if r.frame == 1] == [r for r in before if r.frame == 1]


def test_a_task_that_fails_every_attempt_fails_its_frame(plan):
    """Defect: a task that failed every time was re-leased every 30 s forever, and blocked its
    source's ordered results."""
    q = WorkQueue("src", 30.0, max_attempts=3)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    src.announced(("src/0", 0), "gw")
    for attempt in range(3):
        ref = q.take("thief", float(attempt))
        assert ref is not None and ref.task == 0
        q.fail(ref)
    given_up = q.pop_given_up()
    assert given_up == [TaskRef("src/0", 0, 0)]
    acts = src.give_up(given_up[0], "malformed grant")
    assert acts == [ToGateway(FrameFailed("src/0", 0, 0, "malformed grant"))]
    assert not [r for r in q.queue if r.frame == 0] and not q.attempts
    # a new gateway hears of the failure, not of a frame to run
    src.announced(("src/0", 0), "gw")
    assert [a.msg for a in src.gateway_changed("gw2")] == [FrameFailed("src/0", 0, 0, "malformed grant")]
    assert not q.queue
    src.frame_done(FrameDone("src/0", 0))
    assert not src.frames and src.inflight["src/0"] == 0


def test_lease_expiry_and_lost_holders_count_as_attempts():
    q = WorkQueue("src", 1.0, max_attempts=2)
    ref = TaskRef("src/0", 0, 0)
    q.add([ref])
    q.take("a", 0.0)
    assert q.expire(5.0) == [ref] and not q.given_up
    q.take("b", 5.0)
    assert q.peer_lost("b") == [] and q.pop_given_up() == [ref] and not q.queue and not q.attempts


def test_acks_change_readiness_and_holders(plan):
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    consumer = next(t for t in plan.tasks if t.consumes and t.reuse is not None)
    ref = TaskRef("src/0", 0, consumer.id)
    assert not src.ready(ref)
    for p in consumer.producers:
        src.tile_ack(TileAck("src/0", 0, p, "nodeA", list(plan.task(p).produces)), 0.0)
    assert src.ready(ref) and src.holders_of(("src/0", 0), consumer.id) == {"nodeA": sorted(consumer.consumes)}
    assert src.near("nodeA", "src")(ref) and not src.near("nodeB", "src")(ref)
    assert src.tiles_in(TilesIn("src/0", 0))


# ---------------------------------------------------------------------------- membership
def test_equal_epochs_break_ties_by_the_smaller_node_id():
    """Defect: two gateway claims with equal epochs had no tie-break."""
    m = MembershipState("b", "standby")
    m.peer_joined("a", "standby")
    m.peer_joined("c", "standby")
    assert m.claim("c", 1) == [Follow("c", True)]
    assert m.claim("a", 1) == [Follow("a", True)]  # same epoch, smaller id: wins
    assert m.claim("c", 1) == []  # same epoch, larger id: loses everywhere
    assert m.gateway_id == "a"


def test_a_gateway_that_loses_the_tie_steps_down_and_a_weaker_claimant_is_told():
    m = MembershipState("b", "gateway")
    m.peer_joined("c", "standby")
    m.peer_joined("a", "standby")
    assert m.claim("c", 0) == [SendClaim("c", 0)]  # weaker: told ours
    assert m.claim("a", 0) == [StepDown("a"), Follow("a", True)]
    assert not m.is_gateway and m.role == "standby"


def test_a_workers_claim_is_refused():
    """Defect: a worker-role peer's claim was accepted."""
    m = MembershipState("b", "worker")
    m.peer_joined("w", "worker")
    assert m.claim("w", 5) == [] and m.gateway_id is None


def test_a_closing_node_never_takes_over():
    """Defect: at close(), every connection's teardown ran the election, and a standby 'took
    over' while it was exiting."""
    m = MembershipState("a", "standby")
    m.peer_joined("gw", "gateway")
    m.claim("gw", 0)
    m.close()
    assert m.peer_lost("gw") == [] and not m.is_gateway
    live = MembershipState("a", "standby")
    live.peer_joined("gw", "gateway")
    live.claim("gw", 0)
    assert live.peer_lost("gw") == [Promote(1)] and live.is_gateway


def test_the_smallest_connected_standby_takes_over():
    ms = {n: MembershipState(n, "standby") for n in ("s1", "s2")}
    for n, m in ms.items():
        m.peer_joined("gw", "gateway")
        m.peer_joined("s2" if n == "s1" else "s1", "standby")
        m.claim("gw", 0)
    assert ms["s1"].peer_lost("gw") == [Promote(1)]
    assert ms["s2"].peer_lost("gw") == []


def test_every_node_that_keeps_strips_is_told_to_let_them_go(plan):
    """Defect (found by bench/soak.py): only a strip's first holder was told to release it, so
    a second run of a producer (a speculative copy, a re-run) and a late copy arriving after
    the frame's tiles were in kept their strips until their cache's byte cap evicted them."""
    gw = gateway(plan)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    producer = next(t for t in plan.tasks if t.produces)
    acts = gw.tile_done("a", tile_msg(plan, "src/0", 0, producer.id), 0.0)
    acts += gw.tile_done("b", tile_msg(plan, "src/0", 0, producer.id), 0.0)  # a second copy
    for t in plan.tasks:
        if t.id != producer.id:
            acts += gw.tile_done("a", tile_msg(plan, "src/0", 0, t.id), 0.0)
    released_to = {a.node for a in acts if isinstance(a, g.ReleaseStrips)}
    assert {"a", "b"} <= released_to
    late = gw.tile_done("c", tile_msg(plan, "src/0", 0, producer.id), 0.0)  # after every tile is in
    assert g.ReleaseStrips("c", ("src/0", 0)) in late


def test_a_bad_early_tile_costs_its_sender_only(plan):
    """A malformed tile that waited for its FrameStart is dropped when the frame is announced;
    the FrameStart (the source's message) is not refused for it."""
    gw = gateway(plan)
    good = tile_msg(plan, "src/0", 0, 0)
    bad = TileDone("src/0", 0, 0, PK, "full", np.zeros((1, 1, 1), np.float32))
    unknown = TileDone("src/0", 0, 99, PK, "full", good.output)
    for msg in (bad, unknown, good):
        gw.tile_done("thief", msg, 0.0)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    f = gw.frames[("src/0", 0)]
    assert f.assembly is not None and f.assembly.received == {0} and gw.early_bytes == 0
    with pytest.raises(ProtocolError, match="not a task"):
        gw.tile_done("thief", unknown, 0.0)


def test_a_full_gateway_makes_frames_wait_in_order_and_loses_none(plan):
    """Back-pressure: frames announced while max_queued_frames are open wait their turn (their
    source holds their tasks), are admitted as frames are released, and come out in order."""
    gw = gateway(plan, max_queued_frames=2)
    acts = []
    for f in range(5):
        acts += gw.frame_start("src", FrameStart("src/0", f, PK, 8, 8), float(f))
    assert sorted(gw.frames) == [("src/0", 0), ("src/0", 1)] and list(gw.waiting) == [("src/0", f) for f in (2, 3, 4)]
    assert [a.msg for a in acts if isinstance(a, g.Notify)] == [FrameWait("src/0", f) for f in (2, 3, 4)]
    # a tile of a waiting frame waits too, and is placed when the frame is admitted
    gw.tile_done("thief", tile_msg(plan, "src/0", 3, 0), 5.0)
    out = run_frame(gw, plan, "src/0", 0)
    assert g.Notify("src", FrameGo("src/0", 2)) in out and ("src/0", 2) in gw.frames
    gw.validate()
    done = released(out)
    while gw.frames:
        key = min(gw.frames)
        step = run_frame(gw, plan, *key)
        done += released(step)
    assert [r["frame"] for r in done] == [0, 1, 2, 3, 4] and not any("error" in r for r in done)
    assert gw.stats.frames_waited == 3 and not gw.waiting and gw.held_bytes == 0
    assert gw.frames == {} and gw.stats.duplicates_dropped >= 1  # frame 3's early tile was placed first


def test_a_source_holds_a_waiting_frames_tasks(plan):
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    assert src.hold(FrameWait("src/0", 0)) and not q.queue
    src.validate()
    assert src.admitted(FrameGo("src/0", 0)) and len(q.queue) == len(plan.tasks)
    assert not src.admitted(FrameGo("src/0", 0))  # once


def test_a_whole_frame_result_before_its_frame_start_is_kept_and_its_source_asked_again():
    """Defect (8 emulated Pis, 1x1, 20 Mbit/s): a frame's announcement was lost with a
    connection its source never saw replaced, so the gateway dropped the frame's whole-frame
    result as a duplicate, three times over three 30 s leases, and released the frame as
    failed. Now the result waits for the FrameStart, the source is told to announce the frame
    again (once), and the frame is released with that first result."""
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    one = make_plan(Network.from_cfg_text(text, seed=11), (1, 1), 4, scheme="none")
    key = "1x1:4:none"
    gw = GatewayState("gw", lambda k: one)
    acts = gw.tail_done("thief", TailDone("src/0", 0, "ab" * 32, whole=True), 1.0)
    assert acts == [g.Notify("src", FrameUnknown("src/0", 0))] and not gw.frames
    assert gw.tail_done("other", TailDone("src/0", 0, "cd" * 32, whole=True), 1.5) == []  # asked once
    gw.validate()
    acts = gw.frame_start("src", FrameStart("src/0", 0, key, 8, 8), 2.0)
    assert [(r["frame"], r["output_sha256"]) for r in released(acts)] == [(0, "ab" * 32)]  # the first result
    assert g.Notify("src", TilesIn("src/0", 0)) in acts and g.Notify("src", FrameDone("src/0", 0)) in acts
    assert gw.stats.duplicates_dropped == 1 and not gw.early and gw.early_bytes == 0
    gw.validate()
    # a result of a frame already released stays a duplicate (no request to announce it)
    assert gw.tail_done("late", TailDone("src/0", 0, "ab" * 32, whole=True), 3.0) == [
        g.DropTail(TaskRef("src/0", 0, TAIL))]
    # and one whose FrameStart never comes is forgotten after early_tile_seconds
    gw.tail_done("thief", TailDone("src/0", 1, "ab" * 32, whole=True), 4.0)
    gw.expire_early(4.0 + DEFAULT_LIMITS.early_tile_seconds + 1)
    assert not gw.early and gw.early_bytes == 0
    gw.validate()


def test_the_source_announces_a_frame_again_when_the_gateway_does_not_know_it(plan):
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    src.announced(("src/0", 0), "gw")
    queued = list(q.queue)
    assert src.frame_unknown(FrameUnknown("src/0", 0)) == [ToGateway(FrameStart("src/0", 0, PK, 8, 8))]
    assert list(q.queue) == queued  # its tasks and leases stand: only the announcement is sent
    assert src.frame_unknown(FrameUnknown("src/0", 7)) == []  # not a frame it has


def test_a_lost_announcement_costs_no_lease_and_no_attempt(plan):
    """Source and gateway machines wired together: the frame's FrameStart is lost (a replaced
    connection) and nothing else goes wrong. The frame is released without an error, and
    without waiting for a lease: before, its results were kept as early tiles until they
    expired, every lease ran out in turn, and the frame was given up."""
    q = WorkQueue("src", 30.0, max_attempts=3)
    src = SourceState(q, PK, plan)
    gw = gateway(plan)
    src.new_frame("src/0", frame(0), 0.0)  # its FrameStart is lost on the way
    src.announced(("src/0", 0), "gw")
    to_source = []
    while (ref := q.take("thief", 1.0)) is not None:
        to_source += [a.msg for a in gw.tile_done("thief", tile_msg(plan, "src/0", 0, ref.task), 1.0)
                      if isinstance(a, g.Notify)]
    assert to_source == [FrameUnknown("src/0", 0)]
    again = [a.msg for m in to_source for a in src.frame_unknown(m)]
    acts = []
    for m in again:
        acts += gw.frame_start("src", m, 2.0)
    assert [a for a in acts if isinstance(a, g.QueueTail)] == [g.QueueTail(TaskRef("src/0", 0, TAIL))]
    for m in [a.msg for a in acts if isinstance(a, g.Notify)]:
        if isinstance(m, TilesIn):
            src.tiles_in(m, 2.0)
        elif isinstance(m, TileAck):
            src.tile_ack(m, 2.0)
    assert not q.leases and not q.attempts  # every tile's lease ended at once, none failed
    acts = gw.tail_done("gw", TailDone("src/0", 0, "ab" * 32), 3.0)
    assert [(r["frame"], "error" in r) for r in released(acts)] == [(0, False)]
    assert src.frame_done(FrameDone("src/0", 0)) and not src.frames
    gw.validate()
    src.validate()


def test_a_whole_frame_result_ends_a_1x1_frame_without_its_map():
    """Affinity (1x1 grids): the node that ran the frame's only tile runs its tail too and
    sends the result; the gateway ends the tile's lease (TilesIn) and releases the frame, and a
    later copy of either result is a duplicate."""
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    one = make_plan(Network.from_cfg_text(text, seed=11), (1, 1), 4, scheme="none")
    key = "1x1:4:none"
    gw = GatewayState("gw", lambda k: one)
    gw.frame_start("src", FrameStart("src/0", 0, key, 8, 8), 0.0)
    acts = gw.tail_done("thief", TailDone("src/0", 0, "ab" * 32, whole=True), 1.0)
    assert g.Notify("src", TilesIn("src/0", 0)) in acts and [r["frame"] for r in released(acts)] == [0]
    assert not any(isinstance(a, g.QueueTail) for a in acts)
    again = gw.tail_done("other", TailDone("src/0", 0, "ab" * 32, whole=True), 2.0)
    assert released(again) == [] and gw.stats.duplicates_dropped == 1
    # on a grid of several tiles a "whole" result is not taken: the map must be assembled
    many = gateway(make_plan(Network.from_cfg_text(text, seed=11), (2, 2), 4, scheme="quad"))
    many.frame_start("src", FrameStart("src/0", 0, PK, 8, 8), 0.0)
    assert released(many.tail_done("thief", TailDone("src/0", 0, "ab" * 32, whole=True), 1.0)) == []
    gw.validate()
    many.validate()


def test_a_prefetched_task_is_not_a_straggler():
    """Its lease and the straggler clock restart when its holder starts it (TaskStarted)."""
    q = WorkQueue("src", 30.0)
    q.typical[False] = 0.25  # tiles have been taking 0.25 s
    ref = TaskRef("src/0", 0, 0)
    q.add([ref])
    q.take("a", 0.0)
    assert q.restart(ref, "a", 5.0) and not q.restart(ref, "b", 5.0)
    assert q.speculate("b", 5.5, min_age=1.0) is None  # without the restart it would be copied
    assert q.speculate("b", 6.5, min_age=1.0) == ref
    assert q.next_deadline() == 35.0


def test_a_prefetched_task_restarts_its_lease_only_after_a_wait_that_matters():
    """A task that starts right after its grant keeps its lease (no TaskStarted: one message a
    task less for short tasks); one that waited a visible share of straggler_min restarts it."""
    from stealer.roles.worker import LEASE_RESTART_SHARE, restarts_lease

    assert not restarts_lease(0.0, 0.25) and not restarts_lease(0.049, 0.25)
    assert restarts_lease(LEASE_RESTART_SHARE * 0.25, 0.25) and restarts_lease(3.0, 0.25)
    # the clocks the skipped restart leaves are off by less than the wait: still no copy made
    q = WorkQueue("src", 30.0)
    q.typical[False] = 0.25
    ref = TaskRef("src/0", 0, 0)
    q.add([ref])
    q.take("a", 0.0)  # granted at 0, started at 0.04 without a restart, still running at 0.45
    assert q.speculate("b", 0.45, min_age=0.25) is None


def test_prefetch_when_the_transfer_is_on_the_critical_path():
    from stealer.roles.worker import WorkerPolicy
    from stealer.scheduler import PeerLoad

    w = WorkerPolicy()
    loads = {f"p{i}": PeerLoad(1 if i == 0 else 0, 0) for i in range(7)}  # one task queued, 7 peers
    assert not w.should_prefetch(draining=False, queued_here=0, assigned=0, loads=loads)
    assert w.should_prefetch(draining=False, queued_here=0, assigned=0, loads=loads,
                             transfer_seconds=0.8, compute_seconds=3.5)
    assert not w.should_prefetch(draining=False, queued_here=0, assigned=0, loads=loads,
                                 transfer_seconds=0.01, compute_seconds=3.5)
    assert not w.should_prefetch(draining=False, queued_here=1, assigned=0, loads=loads,
                                 transfer_seconds=0.8, compute_seconds=3.5)


def test_a_worker_without_a_gateway_takes_no_work_from_peers():
    """Defect: a worker that had declared the gateway dead (a false alarm at start-up) kept
    stealing whole frames it could not deliver, each waiting out its lease; the same frame
    went to it three times and was given up. Without a gateway it neither steals, prefetches
    nor counts peers' work as takeable (or its compute loop would spin)."""
    from stealer.roles.worker import WorkerPolicy
    from stealer.scheduler import PeerLoad

    w = WorkerPolicy()
    loads = {"p0": PeerLoad(3, 0)}
    assert w.may_steal(False, has_gateway=True) and not w.may_steal(False, has_gateway=False)
    assert not w.take_possible(draining=False, assigned=0, queued=0, queued_tails=0, accepts_tails=True,
                               loads=loads, has_gateway=False)
    assert w.take_possible(draining=False, assigned=0, queued=0, queued_tails=0, accepts_tails=True, loads=loads)
    # its own queue's work is still its own to run (a source keeps computing its frames)
    assert w.take_possible(draining=False, assigned=0, queued=2, queued_tails=0, accepts_tails=True,
                           loads=loads, has_gateway=False)
    assert not w.should_prefetch(draining=False, queued_here=0, assigned=0, loads=loads, transfer_seconds=0.8,
                                 compute_seconds=3.5, has_gateway=False)


def test_a_refused_steal_forgets_the_peers_queue_but_not_its_speed():
    """Defect: a refused steal reset the peer's speed to 0, so its next status looked like a
    speed change and re-ran the grid-auto planner."""
    from stealer.roles.worker import refused_steal
    from stealer.scheduler import PeerLoad

    load = PeerLoad(3, 1, 0.01, False, 4, 2.5e9)
    assert refused_steal(load, speculative=False) == PeerLoad(0, 0, 0.01, True, 4, 2.5e9)
    assert refused_steal(load, speculative=True) == PeerLoad(0, 0, 0.01, True, 0, 2.5e9)


def test_no_task_is_called_a_straggler_before_one_of_its_kind_finished():
    """Defect (measured at 1x1: 27 copies for 60 frames at 6 nodes): tiles that end with their
    frame's TilesIn never fed the typical task time, so every lease older than straggler_min
    (0.25 s) was copied. Now TilesIn feeds it, and with no typical time nothing is copied."""
    q = WorkQueue("src", 30.0)
    refs = [TaskRef("src/0", f, 0) for f in range(3)]
    q.add(refs)
    q.take("a", 0.0)
    assert q.speculate("b", 10.0, min_age=0.25) is None  # nothing finished yet
    q.end_tiles("src/0", 0, now=4.0)  # the frame's only tile took 4 s
    assert q.typical[False] == 4.0
    q.take("a", 4.0)
    assert q.speculate("b", 9.0, min_age=0.25) is None  # 5 s old: not twice the typical 4 s
    assert q.speculate("b", 12.5, min_age=0.25) == refs[1]


def test_two_at_a_time_only_for_short_tasks_from_a_deep_queue():
    """Pairing and batched steals: tasks shorter than ``short_task`` (by this node's own compute
    time, or by its leases when it computes nothing), from a queue that still leaves every other
    node ``steal_batch`` tiles."""
    from stealer.roles.worker import WorkerPolicy

    w = WorkerPolicy(short_task=0.005, steal_batch=2)
    assert not w.short_tasks(0, 0.0, None)  # nothing known: one at a time
    assert w.short_tasks(0, 0.0, 0.02) and not w.short_tasks(0, 0.0, 0.06)  # by leases, 10x slack
    assert w.short_tasks(10, 0.04, 1.0)  # own compute (4 ms) decides over the leases
    assert not w.short_tasks(10, 0.06, 0.001)
    assert w.deep_queue(6, 2) and not w.deep_queue(5, 2)  # 2 per node, 3 nodes
    assert not w.deep_queue(0, 0) and w.deep_queue(2, 0)


def test_a_new_plan_cuts_only_the_frames_after_it(plan):
    """set_plan (grid auto re-planning): frames already started keep their plan in every task,
    announcement, grant and resend; only the next frames use the new one."""
    whole_key = "1x1:4:none"
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    whole = make_plan(Network.from_cfg_text(text, seed=11), (1, 1), 4, scheme="none")
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    assert src.set_plan(whole_key, whole) and not src.set_plan(whole_key, whole)
    acts = src.new_frame("src/0", frame(1), 0.0)
    assert acts == [ToGateway(FrameStart("src/0", 1, whole_key, 8, 8))]
    assert sorted(r.task for r in q.queue if r.frame == 0) == [t.id for t in plan.tasks]
    assert [r.task for r in q.queue if r.frame == 1] == [0]
    src.validate()
    # the old frame's reuse tile still waits for its producers and is granted by its own plan
    consumer = next(t for t in plan.tasks if t.consumes and t.reuse is not None)
    ref = TaskRef("src/0", 0, consumer.id)
    assert not src.ready(ref)
    assert src.grant_input(ref)[0] == consumer.full.input_region
    assert src.grant_input(TaskRef("src/0", 1, 0))[0] == whole.tasks[0].full.input_region
    # a new gateway hears of each frame with its own plan
    for key in (("src/0", 0), ("src/0", 1)):
        src.announced(key, "gw1")
    assert [a.msg.plan for a in src.gateway_changed("gw2")] == [PK, whole_key]
    src.validate()
    # the old plan's dependencies go once its last frame is done
    src.frame_done(FrameDone("src/0", 0))
    src.set_plan(PK, plan)
    src.set_plan(whole_key, whole)
    assert set(src._deps) == {whole_key}


def test_a_measured_speed_is_news_when_first_known_or_a_quarter_off():
    from stealer.roles.worker import speed_worth_telling

    assert not speed_worth_telling(0.0, 0.0)  # nothing measured yet
    assert speed_worth_telling(0.0, 1e9)
    assert not speed_worth_telling(1e9, 1.2e9) and not speed_worth_telling(1e9, 0.8e9)
    assert speed_worth_telling(1e9, 1.3e9) and speed_worth_telling(1e9, 0.7e9)


# ---------------------------------------------------------------- direct data paths
def kept_msg(plan, source: str, frame: int, task: int) -> TileDone:
    return TileDone(source, frame, task, PK, "full", np.empty(0, np.float32), [], kept=True)


def test_kept_outputs_stay_where_they_were_made_and_the_tail_grant_says_where(plan):
    """Direct data paths: a kept tile's map never reaches the gateway; the tail's input names
    each tile's holder (the gateway for those that came to it), every tile exactly once."""
    gw = gateway(plan)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 96, 96), 0.0)
    acts = []
    for t in plan.tasks:
        msg = tile_msg(plan, "src/0", 0, t.id, strips=False) if t.id == 0 else kept_msg(plan, "src/0", 0, t.id)
        acts += gw.tile_done("n1" if t.id % 2 else "n2", msg, 0.0)
        gw.validate()
    assert g.QueueTail(TaskRef("src/0", 0, TAIL)) in acts
    plan_key, data, _, _, holders = gw.tail_input(("src/0", 0))
    assert data is None and plan_key == PK
    want = {"gw": [0]}
    for t in plan.tasks[1:]:
        want.setdefault("n1" if t.id % 2 else "n2", []).append(t.id)
    assert holders == want
    assert gw.tiles_here(("src/0", 0), [0])[0].tolist() == tile_msg(plan, "src/0", 0, 0).output.ravel().tolist()
    assert gw.tiles_here(("src/0", 0), [1]) is None  # kept by n1, not here
    acts = gw.tail_done("n3", TailDone("src/0", 0, "ab" * 32), 1.0)
    assert released(acts) and {a for a in acts if isinstance(a, g.ReleaseOutputs)} == {
        g.ReleaseOutputs("n1", ("src/0", 0)), g.ReleaseOutputs("n2", ("src/0", 0))}
    gw.validate()


def test_a_lost_holder_has_its_tiles_run_again_and_the_frame_still_finishes(plan):
    """Defect guarded: a node that kept tile outputs and died before the tail fetched them
    would strand its frame (the tiles' leases ended with TilesIn)."""
    gw = gateway(plan)
    q = WorkQueue("src", 30.0)
    src = SourceState(q, PK, plan)
    src.new_frame("src/0", frame(0), 0.0)
    src.new_frame("src/0", frame(1), 0.0)  # two in flight: the source advises keeping
    assert src.keep_outputs()
    gw.frame_start("src", FrameStart("src/0", 0, PK, 96, 96), 0.0)
    for t in plan.tasks:
        gw.tile_done("n1" if t.id < 2 else "n2", kept_msg(plan, "src/0", 0, t.id), 0.0)
    src.tiles_in(TilesIn("src/0", 0), 0.0)
    assert not [r for r in q.queue if r.frame == 0]
    acts = gw.holder_lost("n1", 1.0)
    gw.validate()
    redo = [a.msg for a in acts if isinstance(a, g.Notify)]
    assert redo == [TilesRedo("src/0", 0, [0, 1])]
    assert g.DropTail(TaskRef("src/0", 0, TAIL)) in acts and gw.tail_input(("src/0", 0)) is None
    assert src.tiles_redo(redo[0])
    assert sorted(r.task for r in q.queue if r.frame == 0) == [0, 1]
    # the redone tiles come back (this time to the gateway itself): the tail is queued again
    acts = []
    for t in (0, 1):
        acts += gw.tile_done("n3", tile_msg(plan, "src/0", 0, t, strips=False), 2.0)
    assert g.QueueTail(TaskRef("src/0", 0, TAIL)) in acts
    _, data, _, _, holders = gw.tail_input(("src/0", 0))
    assert data is None and holders == {"gw": [0, 1], "n2": [2, 3]}
    assert released(gw.tail_done("n3", TailDone("src/0", 0, "ab" * 32), 3.0))
    gw.validate()


def test_a_tail_result_that_comes_while_its_tiles_run_again_still_counts(plan):
    """The tail's runner fetched everything before the holder died: its result finishes the
    frame even though the tiles were queued again (the late redo results are duplicates)."""
    gw = gateway(plan)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 96, 96), 0.0)
    for t in plan.tasks:
        gw.tile_done("n1", kept_msg(plan, "src/0", 0, t.id), 0.0)
    gw.holder_lost("n1", 1.0)
    assert released(gw.tail_done("n2", TailDone("src/0", 0, "ab" * 32), 2.0))
    late = gw.tile_done("n3", tile_msg(plan, "src/0", 0, 0, strips=False), 3.0)
    assert not [a for a in late if isinstance(a, g.QueueTail)]
    gw.validate()


def test_outputs_that_keep_getting_lost_fail_their_frame_instead_of_looping(plan):
    gw = gateway(plan)
    gw.frame_start("src", FrameStart("src/0", 0, PK, 96, 96), 0.0)
    fails = []
    for attempt in range(DEFAULT_LIMITS.max_task_attempts + 1):
        for t in plan.tasks:
            gw.tile_done("n1", kept_msg(plan, "src/0", 0, t.id), float(attempt))
        acts = gw.outputs_lost(("src/0", 0), "n1", float(attempt))
        fails += released(acts)
        gw.validate()
    assert len(fails) == 1 and "lost" in fails[0]["error"]
    # a report about a node that keeps nothing of the frame, or a frame not yet queued, is a no-op
    gw.frame_start("src", FrameStart("src/0", 1, PK, 96, 96), 0.0)
    gw.tile_done("n1", kept_msg(plan, "src/0", 1, 0), 0.0)
    assert gw.outputs_lost(("src/0", 1), "n1", 0.0) == []


def test_kept_outputs_are_bounded_and_let_go_when_no_release_comes():
    from stealer.roles.strips import KeptOutputs, pack_outputs, unpack_outputs
    kept = KeptOutputs(max_bytes=900, max_age=10.0)
    a = np.arange(100, dtype=np.float32)
    assert kept.put(("s", 0), 0, a, 0.0) and kept.put(("s", 0), 1, a[:50], 0.0)
    assert not kept.put(("s", 1), 0, a, 1.0)  # 400 + 200 + 400 > 900: not kept, nothing evicted
    assert kept.get(("s", 0), [0, 1]) is not None and kept.get(("s", 0), [2]) is None
    meta, data = pack_outputs(kept.get(("s", 0), [0, 1]))
    back = unpack_outputs(meta, data)
    assert back[0].tolist() == a.tolist() and back[1].tolist() == a[:50].tolist()
    with pytest.raises(ProtocolError):
        unpack_outputs([[0, 200]], data[:10])
    assert kept.put(("s", 1), 0, a[:10], 11.0)  # frame 0 expired first
    assert kept.get(("s", 0), [0]) is None and kept.nbytes == 40 and kept.expired_frames == 1
    kept.drop(("s", 1))
    assert kept.nbytes == 0 and len(kept) == 0
