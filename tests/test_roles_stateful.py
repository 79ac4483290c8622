"""Random interleavings through the role machines (hypothesis stateful testing).

One source node, two thieves and a gateway, wired by message lists instead of sockets, so
hypothesis chooses the order of everything: frames, steals, results, failures, lost
holders, expired leases, late and duplicated messages, tiles that overtake their FrameStart,
gateway takeovers, and tile outputs kept by the thieves that made them (direct data paths),
lost when such a thief dies. After every step the machines' own invariants hold; at the end, with
the faults stopped and every message delivered, **every frame the camera gave is released
(or reported failed), none twice by the last gateway, and nothing is left behind**.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stealer.config import DEFAULT_LIMITS
from stealer.ftp.plan import make_plan
from stealer.network import Network, builtin_cfg
from stealer.roles import gateway as g
from stealer.roles.gateway import GatewayState
from stealer.roles.membership import MembershipState, Promote, SendClaim
from stealer.roles.source import SourceState
from stealer.scheduler import TAIL, TaskRef, WorkQueue
from stealer.sources import Frame
from stealer.wire.messages import (FrameDone, FrameFailed, FrameGo, FrameStart, FrameUnknown, FrameWait, TailDone, TileAck,
                                   TileDone, TilesIn, TilesRedo)

PK = "2x2:4:quad"
SRC = "src/0"
LEASE = 30.0
_text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
PLAN = make_plan(Network.from_cfg_text(_text, seed=11), (2, 2), 4, scheme="quad")
LIMITS = DEFAULT_LIMITS.replace(max_queued_frames=2, finished_frames_remembered=64)  # frames wait too


def tile(frame: int, task: int, kept: bool = False) -> TileDone:
    t = PLAN.task(task)
    y0, y1, x0, x1 = t.output
    if kept:
        return TileDone(SRC, frame, task, PK, "full", np.empty(0, np.float32), sorted(t.produces), kept=True)
    out = np.zeros((PLAN.output_shape[0], y1 - y0, x1 - x0), np.float32)
    return TileDone(SRC, frame, task, PK, "full", out, sorted(t.produces))


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.queue = WorkQueue("src", LEASE, max_attempts=3)
        self.source = SourceState(self.queue, PK, PLAN)
        self.epoch = 0
        self.gw = GatewayState("gw0", lambda key: PLAN, limits=LIMITS)
        self.tails = WorkQueue("gw0", LEASE, max_attempts=3)
        self.to_gateway: list[tuple[str, object]] = []  # (sender, message)
        self.to_source: list[object] = []
        self.held: dict[str, list[TaskRef]] = {"a": [], "b": []}
        self.kept: dict[str, set[tuple[int, int]]] = {"a": set(), "b": set()}  # (frame, task) outputs kept
        self.frames_made = 0
        self.released: dict[int, list[int]] = {}  # epoch -> frames released by that gateway
        self.failed: set[int] = set()

    # ---------------------------------------------------------------- plumbing
    def carry_out(self, actions: list) -> None:
        for act in actions:
            if isinstance(act, g.Notify):
                self.to_source.append(act.msg)
            elif isinstance(act, g.QueueTail):
                self.tails.add([act.ref], front=True)
            elif isinstance(act, g.DropTail):
                self.tails.done(act.ref)
            elif isinstance(act, g.ReleaseOutputs):
                if act.node in self.kept:
                    self.kept[act.node] = {k for k in self.kept[act.node] if k[0] != act.key[1]}
            elif isinstance(act, g.Released):
                self.released.setdefault(self.epoch, []).append(act.result["frame"])
                if "error" in act.result:
                    self.failed.add(act.result["frame"])

    def announce(self, actions: list) -> None:
        for act in actions:
            self.to_gateway.append(("src", act.msg))
            self.source.announced((act.msg.source, act.msg.frame), f"gw{self.epoch}")

    def give_ups(self) -> None:
        for ref in self.queue.pop_given_up():
            self.announce(self.source.give_up(ref, "failed in a test"))

    def deliver_gateway(self, i: int) -> None:
        sender, msg = self.to_gateway.pop(i % len(self.to_gateway))
        if isinstance(msg, FrameStart):
            self.carry_out(self.gw.frame_start(sender, msg, self.now))
        elif isinstance(msg, FrameFailed):
            self.carry_out(self.gw.frame_failed(sender, msg, self.now))
        elif isinstance(msg, TileDone):
            self.carry_out(self.gw.tile_done(sender, msg, self.now))
        elif isinstance(msg, TailDone):
            self.tails.done(TaskRef(msg.source, msg.frame, TAIL))
            self.carry_out(self.gw.tail_done(sender, msg, self.now))

    def deliver_source(self, i: int) -> None:
        msg = self.to_source.pop(i % len(self.to_source))
        if isinstance(msg, TileAck):
            self.source.tile_ack(msg, self.now)
        elif isinstance(msg, TilesIn):
            self.source.tiles_in(msg)
        elif isinstance(msg, FrameDone):
            self.source.frame_done(msg)
        elif isinstance(msg, FrameWait):
            self.source.hold(msg)
        elif isinstance(msg, FrameGo):
            self.source.admitted(msg)
        elif isinstance(msg, FrameUnknown):
            self.announce(self.source.frame_unknown(msg))
        elif isinstance(msg, TilesRedo):
            self.source.tiles_redo(msg)

    # ---------------------------------------------------------------- rules
    @precondition(lambda self: self.source.inflight.get(SRC, 0) < 4)
    @rule()
    def camera_frame(self) -> None:
        n = self.frames_made
        self.frames_made += 1
        self.announce(self.source.new_frame(SRC, Frame(n, 8, 8, np.zeros((3, 8, 8), np.float32)), self.now))

    @rule(thief=st.sampled_from(["a", "b"]))
    def steal(self, thief: str) -> None:
        ref = self.queue.take(thief, self.now, ready=self.source.ready)
        if ref is not None:
            self.held[thief].append(ref)

    @rule(thief=st.sampled_from(["a", "b"]), i=st.integers(0, 7), keep=st.booleans())
    def finish_task(self, thief: str, i: int, keep: bool = False) -> None:
        if self.held[thief]:
            ref = self.held[thief].pop(i % len(self.held[thief]))
            if keep:
                self.kept[thief].add((ref.frame, ref.task))
            self.to_gateway.append((thief, tile(ref.frame, ref.task, keep)))

    @rule(thief=st.sampled_from(["a", "b"]), i=st.integers(0, 7))
    def task_fails(self, thief: str, i: int) -> None:
        if self.held[thief]:
            ref = self.held[thief].pop(i % len(self.held[thief]))
            if self.queue.holder(ref) == thief:
                self.queue.fail(ref)
                self.give_ups()

    @rule(thief=st.sampled_from(["a", "b"]))
    def thief_dies(self, thief: str) -> None:
        self.held[thief].clear()
        self.kept[thief].clear()  # what it kept dies with it; it comes back empty
        self.queue.peer_lost(thief)
        self.give_ups()
        self.carry_out(self.gw.holder_lost(thief, self.now))

    @rule()
    def leases_run_out(self) -> None:
        self.now += LEASE + 1  # the holders may still deliver late: the gateway drops repeats
        self.queue.expire(self.now)
        self.give_ups()
        self.tails.expire(self.now)

    @rule(i=st.integers(0, 63))
    def message_to_gateway(self, i: int) -> None:
        if self.to_gateway:
            self.deliver_gateway(i)

    @rule(i=st.integers(0, 63))
    def duplicate_to_gateway(self, i: int) -> None:
        if self.to_gateway:
            self.to_gateway.append(self.to_gateway[i % len(self.to_gateway)])

    @rule(i=st.integers(0, 63))
    def message_to_source(self, i: int) -> None:
        if self.to_source:
            self.deliver_source(i)

    @rule()
    def run_a_tail(self) -> None:
        ref = self.tails.take("a", self.now)
        if ref is None:
            return
        tail = self.gw.tail_input((ref.source, ref.frame))
        if tail is not None and tail[1] is None:  # fetch the kept outputs from their holders
            holders = tail[4]
            assert sorted(t for ids in holders.values() for t in ids) == list(range(len(PLAN.tasks)))
            for node, ids in holders.items():
                have = (self.gw.tiles_here((ref.source, ref.frame), ids) is not None if node == self.gw.node_id
                        else all((ref.frame, t) in self.kept.get(node, set()) for t in ids))
                if not have:  # what the thief does: tell the gateway, whose tiles then run again
                    self.carry_out(self.gw.outputs_lost((ref.source, ref.frame), node, self.now))
                    return
        self.to_gateway.append(("a", TailDone(ref.source, ref.frame, "ab" * 32)))

    @rule(i=st.integers(0, 63))
    def frame_start_lost(self, i: int) -> None:
        """An announcement is lost with a connection that was replaced (both sides dialled at
        once) or cut, while the source saw no gateway change: the gateway learns of the frame
        only from its results (FrameUnknown)."""
        starts = [k for k, (_, m) in enumerate(self.to_gateway) if isinstance(m, FrameStart)]
        if starts:
            del self.to_gateway[starts[i % len(starts)]]

    @rule()
    def gateway_dies_and_a_standby_takes_over(self) -> None:
        # what was on its way to or from the dead gateway is gone with its connections
        self.to_gateway = [(s, m) for s, m in self.to_gateway if not isinstance(m, (FrameStart, FrameFailed))]
        self.to_source.clear()
        self.epoch += 1
        self.gw = GatewayState(f"gw{self.epoch}", lambda key: PLAN, limits=LIMITS)
        self.tails = WorkQueue(f"gw{self.epoch}", LEASE, max_attempts=3)
        self.announce(self.source.gateway_changed(f"gw{self.epoch}"))

    # ---------------------------------------------------------------- checks
    @invariant()
    def machines_are_consistent(self) -> None:
        self.gw.validate()
        self.source.validate()
        for epoch, frames in self.released.items():
            assert len(frames) == len(set(frames)), f"gateway {epoch} released a frame twice: {frames}"
        assert self.gw.active <= LIMITS.max_queued_frames
        # no task is retried forever: each is given up at its third failed attempt
        assert all(n < self.queue.max_attempts for n in self.queue.attempts.values())
        assert all(n < self.tails.max_attempts for n in self.tails.attempts.values())

    def teardown(self) -> None:
        """Faults stop; everything is delivered and run: every frame comes out."""
        for _ in range(400):
            if not self.source.frames:
                break
            while self.to_gateway:
                self.deliver_gateway(0)
            while self.to_source:
                self.deliver_source(0)
            for thief in ("a", "b"):
                while self.held[thief]:
                    self.finish_task(thief, 0)
            ref = self.queue.take("a", self.now, ready=self.source.ready)
            if ref is not None:
                self.held["a"].append(ref)
            self.run_a_tail()
            if not self.to_gateway and not self.to_source and not self.held["a"] and not len(self.queue):
                self.leases_run_out()  # work lost with a dead gateway's messages comes back by lease
        assert not self.source.frames, f"stranded: {sorted(self.source.frames)}"
        released = {f for frames in self.released.values() for f in frames}
        assert released == set(range(self.frames_made)), (released, self.frames_made)
        last = self.released.get(self.epoch, [])
        assert len(last) == len(set(last))
        # late copies of frames an earlier gateway released wait a while for a FrameStart
        self.gw.expire_early(self.now + LIMITS.early_tile_seconds + 1)
        assert not self.gw.frames and not self.gw.early and self.gw.held_bytes == 0


TestCluster = Cluster.TestCase
TestCluster.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ membership
ROLES = {"n0": "gateway", "n1": "standby", "n2": "standby", "n3": "worker"}
PAIRS = [(a, b) for a in ROLES for b in ROLES if a < b]


class Elections(RuleBasedStateMachine):
    """Four nodes (a gateway, two standbys, a worker) whose links come and go at random, with
    gateway claims delivered late or not at all. Once every link is up and every claim is
    delivered, exactly one node is the gateway and every node follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.m = {n: MembershipState(n, r) for n, r in ROLES.items()}
        self.links: set[tuple[str, str]] = set()
        self.claims: list[tuple[str, str, int]] = []  # (to, from, epoch)

    def carry_out(self, node: str, actions: list) -> None:
        for act in actions:
            if isinstance(act, SendClaim):
                self.claims.append((act.node, node, act.epoch))
            elif isinstance(act, Promote):
                for a, b in self.links:
                    if node in (a, b):
                        self.claims.append((b if a == node else a, node, act.epoch))

    @rule(pair=st.sampled_from(PAIRS))
    def link_up(self, pair: tuple[str, str]) -> None:
        if pair in self.links:
            return
        self.links.add(pair)
        a, b = pair
        self.carry_out(a, self.m[a].peer_joined(b, self.m[b].role))
        self.carry_out(b, self.m[b].peer_joined(a, self.m[a].role))

    @rule(pair=st.sampled_from(PAIRS))
    def link_down(self, pair: tuple[str, str]) -> None:
        if pair not in self.links:
            return
        self.links.discard(pair)
        a, b = pair
        self.claims = [c for c in self.claims if {c[0], c[1]} != {a, b}]  # gone with the connection
        self.carry_out(a, self.m[a].peer_lost(b))
        self.carry_out(b, self.m[b].peer_lost(a))

    @rule(i=st.integers(0, 31))
    def deliver_claim(self, i: int) -> None:
        if self.claims:
            to, sender, epoch = self.claims.pop(i % len(self.claims))
            self.carry_out(to, self.m[to].claim(sender, epoch))

    @invariant()
    def a_worker_never_leads_and_someone_does(self) -> None:
        assert not self.m["n3"].is_gateway
        assert any(m.is_gateway for m in self.m.values())

    def teardown(self) -> None:
        for pair in PAIRS:
            self.link_up(pair)
        for _ in range(1000):
            if not self.claims:
                break
            self.deliver_claim(0)
        leaders = [n for n, m in self.m.items() if m.is_gateway]
        assert len(leaders) == 1, leaders
        assert all(m.gateway_id == leaders[0] for m in self.m.values()), {n: m.gateway_id for n, m in self.m.items()}


TestElections = Elections.TestCase
TestElections.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
