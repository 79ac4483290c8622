"""A data source's side: the frame loop of each of this node's sources (back-pressure, deadline
drops, waiting for a gateway), carrying out the source machine's messages to the gateway
(:meth:`SourceState` decides them), the gateway's acknowledgements of tiles and frames, work
sharing (policy "share"), and, with ``--grid auto``, re-planning as computing nodes come and go
(:mod:`stealer.ftp.auto` decides).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

import numpy as np

from ..codec import TYPICAL_RATIO
from ..errors import CommClosedError, PlanError, StealerError
from ..ftp.auto import DEFAULT_NODE_SPEED, Cluster, NodeSpec, choose
from ..roles.source import ToGateway
from ..scheduler import TaskRef
from ..sources import Frame, FrameSource, jpeg_frames
from ..wire.messages import FrameDone, FrameDrop, FrameGo, FrameUnknown, FrameWait, Preview, TileAck, TilesIn, TilesRedo
from .config import plan_key
from .state import NodeState

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split


class Source(NodeState):
    """The source loop, frames announced to the gateway, work sharing.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, id, peers, queue, stats,
    _gateway_seen, _frame_freed, _sources_done, _draining, _idle_changed, _handlers.
    """

    async def _run_sources(self) -> None:
        try:
            await asyncio.gather(*(self._run_source(i, src) for i, src in enumerate(self.cfg.sources)))
        finally:
            self._sources_done.set()

    async def _run_source(self, index: int, src: FrameSource) -> None:
        source_id = f"{self.id}/{index}"
        loop = asyncio.get_running_loop()
        frames = src.frames(self.net.input_shape)
        if self.cfg.frame_codec == "jpeg":  # encoded and decoded where the feed is read, off the loop
            frames = jpeg_frames(frames, self.cfg.jpeg_quality, self.net.input_shape)
        source = self.source
        source.inflight[source_id] = 0
        period = 1.0 / self.cfg.fps if self.cfg.fps else 0.0
        next_at = loop.time()
        count = 0
        try:
            while (self.cfg.frames is None or count < self.cfg.frames) and not self._draining:
                while self.cfg.deadline is None and source.inflight[source_id] >= self._inflight_limit():
                    self._frame_freed.clear()
                    await self._frame_freed.wait()
                frame = await loop.run_in_executor(None, next, frames, None)
                if frame is None:
                    break
                count += 1
                if self.cfg.deadline is not None and source.inflight[source_id] >= self._inflight_limit():
                    # overload in deadline mode: drop the oldest frame nothing has started on (or
                    # this new one), rather than queueing without bound
                    dropped = source.drop_oldest_unstarted(source_id)
                    self.stats.frames_dropped += 1
                    number = dropped[1] if dropped is not None else frame.number
                    log.info("deadline mode: dropped frame %d of %s (overload)", number, source_id)
                    self._announce([ToGateway(FrameDrop(source_id, number))])
                    if dropped is None:
                        continue
                started = source.new_frame(source_id, frame, time.monotonic())
                plan = source.plan_of((source_id, frame.number))  # what the frame was cut with
                refs = [TaskRef(source_id, frame.number, t.id) for t in plan.tasks]
                self._announce(started)
                self._preview_candidate(source_id, frame)
                # kept and queued already: it is announced to the first gateway that appears
                await self._wait_for_gateway()
                if self.cfg.policy == "share":
                    await self._share(refs)
                if period:
                    next_at += period
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
            while source.inflight[source_id] > 0:
                self._frame_freed.clear()
                await self._frame_freed.wait()
        finally:
            src.close()

    async def _wait_for_gateway(self) -> None:
        """Sources wait for a gateway as long as it takes, saying so now and then."""
        while not self._gateway_seen.is_set():
            try:
                await asyncio.wait_for(self._gateway_seen.wait(), self.cfg.runtime.gateway_wait)
            except asyncio.TimeoutError:
                log.warning("no gateway for %.0f s; frames wait", self.cfg.runtime.gateway_wait)

    def _announce(self, actions: list[ToGateway]) -> None:
        """Carry out the source machine's messages to the gateway, now (small messages, never
        waited for): with no gateway they are dropped, and every unfinished frame is announced
        again to the next gateway."""
        for act in actions:
            msg = act.msg
            if self.is_gateway:
                self._handlers[type(msg)](None, msg)
                gateway = self.id
            else:
                gw = self._gateway()
                if gw is None:
                    log.info("%s of frame %d of %s waits for a gateway", msg.op, msg.frame, msg.source)
                    continue
                self._post(gw, msg)
                gateway = gw.node_id
            if not isinstance(msg, FrameDrop):
                self.source.announced((msg.source, msg.frame), gateway)
        self.stats.frames_resent = self.source.resent
        self._work_changed()

    def _on_tiles_in(self, msg: TilesIn) -> None:
        if self.source.tiles_in(msg, time.monotonic()):
            self._work_changed()

    def _on_tiles_redo(self, msg: TilesRedo) -> None:
        if self.source.tiles_redo(msg):
            log.warning("tiles %s of frame %d of %s run again: the node that kept their outputs is gone",
                        msg.tasks, msg.frame, msg.source[:8])
            self._work_changed()

    def _on_tile_ack(self, msg: TileAck) -> None:
        self.source.tile_ack(msg, time.monotonic())
        self._work_changed()

    def _inflight_limit(self) -> int:
        """Frames each of this node's sources keeps in flight: ``--max-inflight``, or by default
        enough that every node that computes has a task to run and one to fetch meanwhile (a
        node can only steal what is in flight, and prefetches when the transfer is on its
        critical path), and two more, shared between this node's sources. A fixed 4 kept half
        of an 8-node shelf idle at a 1x1 grid. It grows as peers join (the source loop is woken
        then)."""
        if self.cfg.max_inflight > 0:
            return self.cfg.max_inflight
        chosen = self._auto_inflight()  # grid auto: the planner's choice for the cluster as it is
        if chosen is not None:
            return max(1, math.ceil(chosen / max(1, len(self.cfg.sources))))
        computing = (1 if self.cfg.slots > 0 else 0) + len(self.peers)
        return max(2, math.ceil((2 * computing + 2) / max(1, len(self.cfg.sources))))

    def _computing_nodes(self) -> int:
        return (1 if self.cfg.slots > 0 else 0) + len(self.peers)

    def _auto_inflight(self) -> int | None:
        choice = self._auto_choice
        return choice.best.inflight if choice is not None else None

    def _node_speed(self) -> float:
        """FLOP/s the planner assumes for this node: ``node_speed`` if configured (then for
        every node, measured or not), else its own measured speed once it has computed for a
        while, else an emulated Pi's."""
        if self.cfg.node_speed:
            return self.cfg.node_speed
        return self._measured_speed() or DEFAULT_NODE_SPEED

    def _peer_speed(self, peer_id: str, assumed: float) -> float:
        """A peer's FLOP/s as it measured them (its last Status), else ``assumed``."""
        return (0.0 if self.cfg.node_speed else self.peers[peer_id].load.speed) or assumed

    def _cluster_now(self) -> Cluster:
        """The cluster as the planner sees it: this node (the source) first, then its peers with
        the memory they offered at the handshake; every link at ``link_rate``."""
        speed = self._node_speed()
        link = self.cfg.link_rate
        me = NodeSpec(speed if self.cfg.slots > 0 else 0.0, self.cfg.max_memory, link)
        ids = sorted(self.peers)
        # peers as fast as they measured themselves, else as this node
        nodes = (me, *(NodeSpec(self._peer_speed(i, speed), self.peers[i].max_memory, link) for i in ids))
        gateway = ids.index(self.gateway_id) + 1 if self.gateway_id in ids else 0
        return Cluster(nodes, source=0, gateway=gateway, pixel_ratio=self._pixel_ratio())

    def _pixel_ratio(self) -> float:
        """Wire bytes over raw pixel bytes of this node's grants: measured once it has sent a
        few frames' worth (the codec's ratio depends on the camera's content), else the codec's
        typical figure."""
        raw, sent = self.stats.input_bytes_raw, self.stats.input_bytes_sent
        if raw >= 4 * self.net.input_shape[0] * self.net.input_shape[1] * self.net.input_shape[2] and sent:
            return min(1.5, sent / raw)
        return TYPICAL_RATIO[self.cfg.frame_codec]

    def _replan(self) -> None:
        """Grid auto: when computing nodes joined or left, or one's measured speed moved,
        choose the plan for the cluster as it is now. The next frames are cut with it; frames already started keep
        theirs (SourceState.set_plan). Pure arithmetic over the plans made at start."""
        if not self.cfg.grid_auto or not self._auto_candidates or self._closed:
            return
        nodes = self._computing_nodes()
        cluster = self._cluster_now()
        # re-plan when nodes join or leave, or one's speed moves by a bucket (about 25%)
        planned_for = (nodes, tuple(round(math.log(n.speed) / math.log(1.25)) if n.speed > 0 else 0
                                    for n in cluster.nodes))
        if planned_for == self._planned_for:
            return
        try:
            choice = choose(self._auto_candidates, cluster, self.cfg.objective, self.cfg.latency_budget)
        except PlanError as exc:
            log.error("grid auto: %s; keeping plan %s", exc, self._own_plan_key)
            return
        self._planned_for = planned_for
        self._auto_choice = choice
        best = choice.best
        key = plan_key(best.grid, self.layers, best.scheme)
        candidate = next(c for c in self._auto_candidates if (c.grid, c.scheme) == (best.grid, best.scheme))
        self._plans.setdefault(key, candidate.plan)
        changed = key != self._own_plan_key
        self._own_plan_key = key
        if self._source is not None and self._source.set_plan(key, self._plans[key]):
            self.stats.replans += 1
        log.info("grid auto (%s) for %d computing node(s): %s, %d frames in flight, predicted %.3f fps, "
                 "latency %.2f s (%s)%s", choice.objective, nodes, best.name, best.inflight, best.fps,
                 best.latency, choice.note, "" if changed else "; plan unchanged")
        self._event({"event": "plan", "time": time.time(), "plan": key, "nodes": nodes, "objective": choice.objective,
                     "inflight": best.inflight, "fps": round(best.fps, 4), "latency": round(best.latency, 4),
                     "within_budget": choice.within_budget})
        self._frame_freed.set()  # the frames-in-flight limit may have grown

    def _on_frame_wait(self, msg: FrameWait) -> None:
        if self.source.hold(msg):
            log.info("frame %d of %s waits: the gateway is full", msg.frame, msg.source)
            self._work_changed()

    def _on_frame_unknown(self, msg: FrameUnknown) -> None:
        actions = self.source.frame_unknown(msg)
        if actions:
            log.info("the gateway has results of frame %d of %s but not its announcement: announcing it again",
                     msg.frame, msg.source)
        self._announce(actions)

    def _on_frame_go(self, msg: FrameGo) -> None:
        if self.source.admitted(msg):
            self._work_changed()

    def _source_frame_done(self, msg: FrameDone) -> None:
        self._preview_done(msg)
        if not self.source.frame_done(msg):
            return
        self._frame_freed.set()
        self._idle_changed.set()
        self._work_changed()

    # ------------------------------------------------------------------ frame previews
    def _previews_wanted(self) -> tuple[int, float] | None:
        """The previews the gateway asks for, as (longest side, interval; 0: every frame), or
        None: it said so in its Status (or it is this node)."""
        if self.is_gateway:
            return (self.frames.side, self.frames.interval) if self.frames is not None else None
        gw = self._gateway()
        status = gw.status if gw is not None else None
        if status is None or status.preview_side == 0:
            return None
        return status.preview_side, status.preview_interval

    def _preview_candidate(self, source_id: str, frame: Frame) -> None:
        """A new frame of a source: keep it to preview once its result is out, if previews are
        wanted (not of every frame: those are taken when they are done), the source's last one
        went the interval ago, and none waits (a frame picked while another waits would, with
        a latency above the interval, replace it before it is done, every time)."""
        wants = self._previews_wanted()
        if wants is None or wants[1] == 0.0:
            self._preview_wait.pop(source_id, None)
            return
        waiting = self._preview_wait.get(source_id)
        if waiting is not None and (source_id, waiting.number) in self.source.frames:
            return
        if time.monotonic() - self._preview_sent.get(source_id, -math.inf) < wants[1]:
            return
        self._preview_wait[source_id] = frame

    def _preview_done(self, msg: FrameDone) -> None:
        """A frame's result is out: preview it if it was picked, or if the gateway wants every
        frame (before the source forgets the frame)."""
        waiting = self._preview_wait.get(msg.source)
        if waiting is not None and waiting.number == msg.frame:
            del self._preview_wait[msg.source]
            frame = waiting
        else:
            wants = self._previews_wanted()
            sf = self.source.frames.get((msg.source, msg.frame))
            if wants is None or wants[1] != 0.0 or sf is None:
                return
            frame = sf.frame
        self._preview_sent[msg.source] = time.monotonic()
        out = self._preview_out.get(msg.source)
        if out is None:  # one sender per source: previews go in frame order
            out = self._preview_out[msg.source] = collections.deque()
            self._spawn(self._send_previews(msg.source, out), "preview")
        if len(out) >= self.cfg.limits.video_queue:
            log.info("no preview of frame %d of %s: %d previews wait to be encoded", frame.number, msg.source,
                     len(out))
            return
        out.append(frame)

    async def _send_previews(self, source_id: str, out: collections.deque[Frame]) -> None:
        try:
            while out:
                await self._send_preview(source_id, out.popleft())
        finally:
            if self._preview_out.get(source_id) is out:
                del self._preview_out[source_id]
            self._idle_changed.set()  # drain waits for the previews of finished frames

    async def _send_preview(self, source_id: str, frame: Frame) -> None:
        """Downscale and JPEG-encode the frame off the loop, and give it to the gateway."""
        from ..dashboard.frames import preview_jpeg

        wants = self._previews_wanted()
        if wants is None:
            return
        side = wants[0]
        limits = self.cfg.limits
        image = frame.pixels if frame.pixels is not None else frame.data
        try:
            jpeg = await asyncio.get_running_loop().run_in_executor(
                None, preview_jpeg, image, side, limits.preview_bytes(side))
        except StealerError as exc:
            log.info("no preview of frame %d of %s: %s", frame.number, source_id, exc)
            return
        msg = Preview(source_id, frame.number, frame.img_w, frame.img_h, np.frombuffer(jpeg, np.uint8))
        if self.is_gateway:
            self._handlers[Preview](None, msg)
            return
        gw = self._gateway()
        if gw is not None and self._previews_wanted():
            self._post(gw, msg)

    async def _share(self, refs: list[TaskRef]) -> None:
        """Policy "share" (the baseline of MoDNN and DeepThings' comparison): hand a frame's tiles
        out round-robin over every known node, idle or not, when the frame arrives."""
        members = [self.id, *sorted(self.peers)]
        for i, ref in enumerate(refs):
            target = members[i % len(members)]
            if target == self.id or target not in self.peers:
                continue
            if not self.queue.take_ref(ref, target, time.monotonic()):
                continue  # this node's own slot took it already
            grant = await self._grant_for(ref, 0)
            if grant is None:
                continue
            try:
                await self.peers[target].comm.send(grant)
            except CommClosedError:
                pass  # requeued when the connection is declared lost
        self._work_changed()
