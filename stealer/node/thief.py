"""A compute slot's side: the compute loop (own queue first, then steal, prefetch, a second task
queued behind the first), stealing and taking a grant's input, running a job, delivering its
result to the gateway in the background, and fetching the reuse strips a tile consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, TypeVar

import msgspec
import numpy as np

from ..codec import MAX_DECODED_BYTES
from ..errors import CommClosedError, PlanError, ProtocolError, StealerError
from ..images import pixel_rect
from ..assembly import FrameAssembly
from ..roles.strips import unpack_outputs, unpack_strips
from ..roles.worker import refused_steal, restarts_lease, speed_worth_telling
from ..scheduler import TAIL, PeerLoad, TaskRef, choose_victim
from ..wire.messages import (
    Message,
    OutputsFetch,
    OutputsMissing,
    TaskStarted,
    RegionReply,
    RegionRequest,
    StealReply,
    StealRequest,
    StripsFetch,
    StripsReply,
    StripsRequest,
    TailDone,
    TaskFailed,
    TileDone,
)
from .config import MAX_IMAGE_SIDE, Job, Peer, memory_needs
from .state import NodeState
from .peers import _POST_DATA_BYTES, _array_bytes

log = logging.getLogger("stealer.node")  # one logger for the whole shell, as before the split
T = TypeVar("T")


class Thief(NodeState):
    """The compute loop, stealing, running and delivering jobs, fetching strips.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, id, first_task_at, _own_plan_key,
    peers, queue, stats, _work, _stopping, _request_ids, _pending, _assigned, gateway, _held,
    _tail_ok, _draining, _running, _idle_changed, _delivery_slots, worker.
    """

    def _accepts_tails(self) -> bool:
        if self.sharding is not None:  # --shards: the gateway runs every tail, as shard tasks
            return False
        if self._tail_ok is None:  # computed once: the plan's accounting is not free
            tile, tail = memory_needs(self.net, self._plan(self._own_plan_key))
            self._tail_ok = self.cfg.max_memory == 0 or self.cfg.max_memory >= tile + tail
        return self._tail_ok

    async def _compute_loop(self, slot: int) -> None:
        prefetch: asyncio.Task[Job | None] | None = None
        try:
            while not self._stopping.is_set():
                job = None
                if prefetch is not None:
                    job = await prefetch
                    prefetch = None
                    if job is not None:
                        job.prefetched = True
                if job is None:
                    job = self._take_local()
                if job is None and self._may_steal():
                    job = await self._steal()
                if job is None:
                    self._work.clear()
                    if self._take_possible():
                        # try again, but let the loop run first: a stale peer status must never
                        # turn this into a busy loop that starves the connections
                        await asyncio.sleep(0)
                        continue
                    await self._work.wait()
                    continue
                second = self._take_second()
                if second is None and self._should_prefetch():
                    # overlap communication with compute: fetch the next task's data while this
                    # one runs (on Wi-Fi a tile's input takes a good fraction of its compute time)
                    prefetch = asyncio.get_running_loop().create_task(self._steal(), name="prefetch")
                if second is None:
                    await self._run_job(job)
                else:
                    self.stats.paired += 1
                    await asyncio.gather(self._run_job(job), self._run_job(second))
        finally:
            if prefetch is not None:
                prefetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    job = await prefetch
                    if job is not None:  # stolen but never run: its lease brings it back
                        log.info("dropping prefetched %s at stop", job.ref)

    def _take_second(self) -> Job | None:
        """A task to run right behind the one in hand, when there is plenty of work: a tile a
        victim sent with the last steal, or one of this node's own from a deep queue. Its input
        is ready and it waits in the compute thread's queue, so the thread goes on to it at once
        instead of waiting for the event loop to hand it over (each hand-over costs the loop a
        wake-up and the thread the GIL: 0.8 ms measured with three busy nodes in one process)."""
        if not self._short_tasks():
            return None
        if self._assigned:
            return self._assigned.pop(0)
        if not self.worker.deep_queue(self.queue.queued_tiles, len(self.peers)):
            return None
        return self._take_local()

    def _loads(self) -> dict[str, PeerLoad]:
        return {pid: p.load for pid, p in self.peers.items()}

    def _short_tasks(self) -> bool:
        return self.worker.short_tasks(self.stats.tiles_run + self.stats.tails_run, self.stats.busy_seconds,
                                       self.queue.typical.get(False))

    def _has_gateway(self) -> bool:
        return self.is_gateway or self._gateway_seen.is_set()

    def _may_steal(self) -> bool:
        return self.worker.may_steal(self._draining, self._has_gateway())

    def _should_prefetch(self) -> bool:
        ran = self.stats.tiles_run + self.stats.tails_run
        return self.worker.should_prefetch(draining=self._draining, queued_here=len(self.queue),
                                           assigned=len(self._assigned), loads=self._loads(),
                                           transfer_seconds=self._steal_seconds,
                                           compute_seconds=self.stats.busy_seconds / ran if ran else None,
                                           has_gateway=self._has_gateway())

    def _take_possible(self) -> bool:
        return self.worker.take_possible(draining=self._draining, assigned=len(self._assigned),
                                         queued=len(self.queue), queued_tails=self.queue.queued_tails,
                                         accepts_tails=self._accepts_tails(), loads=self._loads(),
                                         has_gateway=self._has_gateway())

    def _take_local(self) -> Job | None:
        if self._assigned:
            return self._assigned.pop(0)
        now = time.monotonic()
        ref = self.queue.take(self.id, now, accept_tail=self._accepts_tails(), ready=self.source.ready,
                              prefer=self._near(self.id))
        if ref is None and self.cfg.speculate and not self._draining and self.queue.outstanding(self.id):
            # own queue empty but tasks are out with others: copy a straggler, if one is late
            ref = self.queue.speculate(self.id, now, min_age=self.cfg.runtime.straggler_min,
                                       accept_tail=self._accepts_tails())
            if ref is None:
                asyncio.get_running_loop().call_later(self.cfg.runtime.straggler_min, self._work.set)
                return None
            self.stats.speculative += 1
        if ref is None:
            return None
        self._work_changed()
        return self._local_job(ref)

    async def _steal(self) -> Job | None:
        tried: set[str] = set()
        while not self._stopping.is_set():
            loads = {pid: p.load for pid, p in self.peers.items()}
            victim = choose_victim(loads, want_tails=self._accepts_tails(), tile_seconds=1.0,
                                   tail_seconds=12.0, exclude=tried)
            speculative = False
            if victim is None:
                victim = self.worker.straggler_victim(loads, tried)
                speculative = victim is not None
            if victim is None:
                return None
            tried.add(victim)
            peer = self.peers.get(victim)
            if peer is None:
                continue
            rid = next(self._request_ids)
            fut: asyncio.Future[StealReply] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            asked = time.monotonic()
            try:
                peer.comm.post(StealRequest(rid, self._accepts_tails(), speculative))
                reply = await _reply_within(fut, self.cfg.runtime.steal_timeout)
            except (CommClosedError, asyncio.TimeoutError):
                self._pending.pop(rid, None)
                self.stats.steal_failures += 1
                continue
            if reply.granted:
                job = self._job_or_report(reply, peer)
                if job is None:
                    continue
                if job.ref.is_tail and job.data is None and not await self._collect_outputs(job):
                    continue  # its tiles run again; the gateway drops the lease
                self.stats.stolen += 1
                self.stats.speculative += int(speculative)
                took = time.monotonic() - asked  # request to data in hand: what a prefetch hides
                old = self._steal_seconds
                self._steal_seconds = took if old is None else 0.8 * old + 0.2 * took
                return job
            self.stats.steal_failures += 1
            peer.load = refused_steal(peer.load, speculative)
            if speculative:
                # nothing old enough yet: look again once a lease could have become a straggler
                asyncio.get_running_loop().call_later(self.cfg.runtime.straggler_min, self._work.set)
        return None

    def _on_reply(self, peer: Peer | None, msg: StealReply | StripsReply | RegionReply) -> None:
        if isinstance(msg, StealReply) and msg.request_id == 0 and msg.granted and peer is not None:
            # a task sent without being asked: pushed by a source (policy "share"), or the
            # extra tiles of a steal from a deep queue
            job = self._job_or_report(msg, peer)
            if job is not None:
                self._assigned.append(job)
                self.stats.stolen += self.cfg.policy == "steal"
                self._work.set()
            return
        fut = self._pending.pop(msg.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif isinstance(msg, StealReply) and msg.granted and peer is not None:
            # A grant that arrived after we gave up: hand it back by letting its lease lapse
            # would delay the frame; run it instead (the steal is still valid).
            job = self._job_or_report(msg, peer)
            if job is not None:
                self._spawn(self._run_job(job), "late grant")

    def _job_or_report(self, reply: StealReply, peer: Peer) -> Job | None:
        """The job of a grant, or None if the grant is malformed: the victim hears of it (the
        task's attempt counts at once) and this slot goes on."""
        try:
            return self._job_from_grant(reply, peer.node_id)
        except ProtocolError as exc:
            log.warning("grant of %s/%d/%d from %s is malformed: %s", reply.source[:8], reply.frame, reply.task,
                        peer.node_id[:8], exc)
            self.stats.task_errors += 1
            with contextlib.suppress(ValueError):
                self._post(peer, TaskFailed(reply.source, reply.frame, reply.task, f"malformed grant: {exc}"))
            return None

    def _job_from_grant(self, reply: StealReply, victim: str) -> Job:
        job = Job(TaskRef(reply.source, reply.frame, reply.task), reply.plan, reply.data,
                  reply.img_w, reply.img_h, victim, granted_at=time.monotonic(), keep_output=reply.keep_output)
        if reply.task == TAIL and reply.data is None:  # its tiles' outputs are where they were made
            try:
                n_tasks = len(self._plan(reply.plan).tasks)
            except PlanError:
                raise ProtocolError(f"tail grant of unknown plan {reply.plan!r}") from None
            if sorted(t for ids in reply.holders.values() for t in ids) != list(range(n_tasks)):
                raise ProtocolError(f"tail grant's holders {reply.holders} do not list each of its {n_tasks} tiles once")
            job.holders = reply.holders
        if reply.task != TAIL:
            try:
                full = self._plan(reply.plan).task(reply.task).full.input_region
            except (KeyError, IndexError, PlanError):
                raise ProtocolError(f"grant of unknown task {reply.task} of plan {reply.plan!r}") from None
            self._take_tile_input(job, reply)
            job.partial = job.region != tuple(full)
            if reply.holders or reply.strips_meta:
                job.holders = reply.holders
                job.strips = unpack_strips(reply.strips_meta, reply.strips) if reply.strips_meta else None
        return job

    def _take_tile_input(self, job: Job, msg: StealReply | RegionReply) -> None:
        """Put a tile's input from a grant (or region reply) into the job, checking that pixels
        are exactly the rectangle the network-input region is made from before any use. Encoded
        pixels are checked as far as their metadata goes (codec, size bound, origin) and decoded
        later, in the compute thread (:meth:`Kernels._compute_tile`): a bad payload is then this
        task's failure, reported to its owner."""
        _, h, w = self.net.input_shape
        if len(msg.region) != 4 or not (0 <= msg.region[0] <= msg.region[1] <= h
                                        and 0 <= msg.region[2] <= msg.region[3] <= w):
            raise ProtocolError(f"tile region {msg.region!r} outside the {h}x{w} input")
        region = (msg.region[0], msg.region[1], msg.region[2], msg.region[3])
        job.region, job.data, job.pixels, job.encoded, job.codec = region, msg.data, None, None, "raw"
        if msg.pixels is None and msg.encoded is None:
            return
        if not (0 < job.img_w <= MAX_IMAGE_SIDE and 0 < job.img_h <= MAX_IMAGE_SIDE):
            raise ProtocolError(f"image size {job.img_w}x{job.img_h} out of range")
        py0, py1, px0, px1 = pixel_rect(region, job.img_w, job.img_h, w, h)
        channels = self.net.input_shape[0]
        want = (channels, py1 - py0, px1 - px0)
        if list(msg.pixel_origin) != [py0, px0]:
            raise ProtocolError(f"pixels at {msg.pixel_origin} are not at {[py0, px0]}, where region "
                                f"{list(region)} needs them")
        job.pixel_origin = (py0, px0)
        if msg.encoded is not None:
            # what the payload must decode to: the region's pixels, or the whole image for jpeg
            shape = (channels, job.img_h, job.img_w) if msg.codec == "jpeg" else want
            if msg.encoded.dtype != np.uint8 or msg.encoded.ndim != 1:
                raise ProtocolError(f"encoded input {msg.encoded.dtype} {msg.encoded.shape} is not flat uint8")
            if math.prod(shape) > MAX_DECODED_BYTES or math.prod(want) == 0:
                raise ProtocolError(f"{msg.codec} input of {shape} pixels: empty, or more than a peer may "
                                    f"make this node decode ({MAX_DECODED_BYTES} B)")
            job.codec, job.encoded, job.encoded_shape = msg.codec, msg.encoded, shape
            return
        assert msg.pixels is not None
        if msg.pixels.dtype != np.uint8 or msg.pixels.shape != want:
            raise ProtocolError(f"pixels {msg.pixels.dtype} {msg.pixels.shape} are not the {want} uint8 "
                                f"that region {list(region)} needs")
        job.pixels = msg.pixels

    def _report_failure(self, job: Job, reason: str) -> None:
        """A task in hand failed: its owner counts the attempt now (not when the lease ends)."""
        if job.victim == self.id:
            self.stats.requeued += len(self.queue.fail(job.ref))
            self._give_up_failed(reason)
            self._work_changed()
            return
        peer = self.peers.get(job.victim)
        if peer is not None:
            with contextlib.suppress(ValueError):
                self._post(peer, TaskFailed(job.ref.source, job.ref.frame, job.ref.task, reason[:500]))

    async def _run_job(self, job: Job) -> None:
        if self.first_task_at is None:
            self.first_task_at = time.time()
            self._event({"event": "first-task", "time": self.first_task_at, "stolen": job.victim != self.id})
        if job.prefetched and job.victim in self.peers and restarts_lease(time.monotonic() - job.granted_at,
                                                                          self.cfg.runtime.straggler_min):
            # its lease and the straggler clock start now, not when it was granted
            self._post(self.peers[job.victim], TaskStarted(job.ref.source, job.ref.frame, job.ref.task))
        self._running += 1
        try:
            await self._run_job_inner(job)
        finally:
            self._running -= 1
            self._idle_changed.set()

    def _runs_whole(self, job: Job) -> bool:
        """Whether this node runs a frame's tail right after its tile: when the grid is 1x1
        (the tile is the whole fused block) and this node can hold the tail. Its fused map
        then never travels: the gateway would only have sent it on to another node, and at
        1x1 that is two of the three transfers of a frame (measured 5.7 MB per frame at 8
        nodes, where pixels, map and map come to about 4.1 MB)."""
        return len(self._plan(job.plan_key).tasks) == 1 and self._accepts_tails()

    async def _run_job_inner(self, job: Job) -> None:
        plan = self._plan(job.plan_key)
        try:
            msg: TileDone | TailDone
            if job.ref.is_tail:
                if job.data is None and not await self._collect_outputs(job):
                    return
                msg = await self._compute(self._compute_tail, job)
                self.stats.tails_run += 1
                self.stats.flops_run += self._model_flops - plan.frame_flops
            elif self._runs_whole(job):
                msg = await self._compute(self._compute_whole, job, None)
                self.stats.flops_run += self._model_flops
                self.stats.tiles_run += 1
                self.stats.tails_run += 1
                self.stats.whole_frames += 1
            else:
                borrowed = await self._fetch_strips(job)
                if borrowed is None and job.partial and not await self._fetch_full_region(job):
                    return
                tile, published = await self._compute(self._compute_tile, job, borrowed)
                msg = tile
                if self._keeps_output(job, plan) and self._kept.put((job.ref.source, job.ref.frame), job.ref.task,
                                                                    tile.output, time.monotonic()):
                    # a direct data path: the tail's runner fetches it from here
                    msg = msgspec.structs.replace(tile, output=_NO_OUTPUT, kept=True)
                    self.stats.outputs_kept += 1
                self.stats.flops_run += plan.task(job.ref.task).variant(tile.variant == "reuse").flops
                for sid, arr in published.items():  # kept here, on the loop: the cache is not thread-safe
                    # a copy if it is a view, so a held strip never pins a whole layer buffer
                    self._held.put((job.ref.source, job.ref.frame), sid, arr if arr.base is None else arr.copy())
                self.stats.tiles_run += 1
        except StealerError as exc:
            log.error("task %s failed: %s", job.ref, exc)
            self.stats.task_errors += 1
            self._report_failure(job, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a task boundary: one bad task must not stop this slot
            log.exception("task %s failed; its owner queues it again", job.ref)
            self.stats.task_errors += 1
            self._report_failure(job, f"{type(exc).__name__}: {exc}")
            return
        if speed_worth_telling(self._speed_told, self._measured_speed()):
            self._work_changed()  # a status goes out with it (grid auto plans by peers' speeds)
        gw = None if self.is_gateway else self._gateway()
        if gw is not None and _array_bytes(msg) < _POST_DATA_BYTES:
            try:  # a small result is written at once: no task, no wait
                gw.comm.post(msg)
                return
            except CommClosedError:
                pass  # the slow path below waits for the next gateway
        # deliver in the background so that this slot computes its next task meanwhile; the
        # slot waits only when pending_results are already on their way
        await self._delivery_slots.acquire()
        self._running += 1
        self._spawn(self._deliver(job.ref, msg), "deliver")

    def _keeps_output(self, job: Job, plan: Any) -> bool:
        """Whether a tile's output stays here for the node that will run its frame's tail: its
        source advised it (:meth:`SourceState.keep_outputs`), the grid has more than one tile
        (a 1x1 tile runs its tail here at once, :meth:`_runs_whole`), and this node is not the
        gateway (where the tail is queued: the map is where it must be)."""
        return (job.keep_output and self.cfg.direct_outputs and len(plan.tasks) > 1 and not self.is_gateway
                and self.sharding is None and self._has_gateway())

    async def _collect_outputs(self, job: Job) -> bool:
        """A tail's input from the nodes that kept its tiles' outputs (``job.holders``: node id
        -> task ids; this node for those it kept, or, as the gateway, those that came to it),
        all at once. False if any holder could not give its part: the gateway hears of it
        (:class:`OutputsMissing`) and has those tiles run again."""
        plan = self._plan(job.plan_key)
        key = (job.ref.source, job.ref.frame)
        holders = dict(job.holders or {})
        timeout = self.cfg.runtime.outputs_timeout

        async def from_node(node_id: str, ids: list[int]) -> dict[int, np.ndarray] | None:
            if node_id == self.id:
                got = self._kept.get(key, ids)
                if got is None and self.is_gateway:
                    got = self.gateway.tiles_here(key, ids)
                return None if got is None else {t: a.ravel() for t, a in got.items()}
            peer = self.peers.get(node_id)
            if peer is None:
                return None
            reply = await self._request(peer, lambda rid: OutputsFetch(rid, key[0], key[1], ids), timeout)
            if not isinstance(reply, StripsReply) or not reply.found:
                return None
            return unpack_outputs(reply.meta, reply.data)

        parts = await asyncio.gather(*(from_node(n, ids) for n, ids in holders.items()))
        assembly = FrameAssembly.for_plan(plan)
        missing = []
        for (node_id, ids), part in zip(holders.items(), parts):
            if part is None or sorted(part) != sorted(ids):
                missing.append(node_id)
                continue
            for task, flat in part.items():
                try:
                    assembly.add_flat(task, flat)
                except ValueError as exc:
                    raise ProtocolError(f"tile outputs from {node_id[:8]}: {exc}") from None
        if missing:
            for node_id in missing:
                log.warning("%s: the tile outputs %s kept could not be fetched; they run again", job.ref, node_id[:8])
                self._report_outputs_missing(job, node_id)
            return False
        job.data, job.holders = assembly.output, None
        self.stats.outputs_fetched += 1
        return True

    def _report_outputs_missing(self, job: Job, holder: str) -> None:
        msg = OutputsMissing(job.ref.source, job.ref.frame, holder)
        if job.victim == self.id:
            self._on_outputs_missing(None, msg)
            return
        peer = self.peers.get(job.victim)
        if peer is not None:
            with contextlib.suppress(ValueError, CommClosedError):
                self._post(peer, msg)

    async def _deliver(self, ref: TaskRef, msg: Message) -> None:
        try:
            await self._to_gateway(msg)
        except (CommClosedError, asyncio.TimeoutError) as exc:
            log.warning("result of %s not delivered (%s); its lease will bring it back", ref, exc)
        finally:
            self._delivery_slots.release()
            self._running -= 1
            self._idle_changed.set()

    async def _fetch_strips(self, job: Job) -> dict[int, np.ndarray] | None:
        plan = self._plan(job.plan_key)
        task = plan.task(job.ref.task)
        if task.reuse is None or not task.consumes:
            return None
        key = (job.ref.source, job.ref.frame)
        holders: dict[str, list[int]] | None = job.holders
        if holders is not None:
            # from the source's acks; checked, since they came over the wire: asking a node
            # for strips the tile does not consume would fill the tile with wrong data
            listed = [s for ids in holders.values() for s in ids] + list(job.strips or ())
            if sorted(listed) != sorted(task.consumes):
                raise ProtocolError(f"{job.ref}: holders {holders} and strips {sorted(job.strips or ())} "
                                    f"do not list strips {list(task.consumes)}")
        elif self.is_gateway:
            holders = self.gateway.strip_locations(key, task.consumes)
        else:
            gw = self._gateway()
            if gw is not None:
                reply = await self._request(gw, lambda rid: StripsRequest(rid, job.ref.source, job.ref.frame,
                                                                          job.ref.task, job.plan_key))
                if isinstance(reply, StripsReply) and reply.found:
                    holders = reply.holders
        got = await self._collect_strips(key, task.consumes, holders, job.strips) if holders is not None else None
        if got is None:
            self.stats.reuse_fallbacks += 1
        return got

    async def _request(self, peer: Peer, make: Any, timeout: float | None = None) -> Message | None:
        """Send ``make(request_id)`` to ``peer`` and wait for the reply with that id (None if the
        peer is gone or slower than ``timeout``, by default ``strips_timeout``)."""
        rid = next(self._request_ids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._pending_from[rid] = peer.node_id  # a peer that is lost fails its requests at once
        try:
            peer.comm.post(make(rid))
            return await _reply_within(fut, self.cfg.runtime.strips_timeout if timeout is None else timeout)
        except (CommClosedError, asyncio.TimeoutError):
            self._pending.pop(rid, None)
            return None
        finally:
            self._pending_from.pop(rid, None)

    async def _collect_strips(self, key: tuple[str, int], wanted: tuple[int, ...], holders: dict[str, list[int]],
                              given: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray] | None:
        """Fetch a dependent tile's strips from the nodes that produced them, all at once (those
        ``given`` with its grant and those this node holds need no message); None if any is
        missing (a holder left, or evicted them), and the tile runs its full variant."""
        async def from_node(node_id: str, ids: list[int]) -> dict[int, np.ndarray] | None:
            if node_id == self.id:
                return self._held.get(key, ids)
            peer = self.peers.get(node_id)
            if peer is None:
                return None
            reply = await self._request(peer, lambda rid: StripsFetch(rid, key[0], key[1], ids))
            if not isinstance(reply, StripsReply) or not reply.found:
                log.info("strips %s of frame %d of %s: %s", ids, key[1], key[0][:8],
                         "not held by " + node_id[:8] if reply is not None else "no answer from " + node_id[:8])
                return None
            return unpack_strips(reply.meta, reply.data)

        got: dict[int, np.ndarray] = dict(given or {})
        remote = []
        for node_id, ids in holders.items():
            if node_id == self.id:
                mine = self._held.get(key, ids)
                if mine is None:
                    return None
                got.update(mine)
            else:
                remote.append((node_id, ids))
        if len(remote) == 1:
            parts = [await from_node(*remote[0])]
        else:
            parts = await asyncio.gather(*(from_node(n, ids) for n, ids in remote))
        for part in parts:
            if part is None:
                return None
            got.update(part)
        return got if all(s in got for s in wanted) else None

    async def _fetch_full_region(self, job: Job) -> bool:
        """The strips of a task shipped with only its reuse region are gone: ask its owner for
        the full region. False if that fails (the owner left, or finished the frame: either way
        nothing waits for this task any more, or its lease brings it back)."""
        peer = self.peers.get(job.victim)
        reply = None
        if peer is not None:
            reply = await self._request(peer, lambda rid: RegionRequest(rid, job.ref.source, job.ref.frame,
                                                                        job.ref.task), self.cfg.runtime.steal_timeout)
        if not isinstance(reply, RegionReply) or not reply.found:  # found: it carries an input (its check)
            log.warning("%s: reuse strips gone and no full region from its owner; dropped here", job.ref)
            return False
        self._take_tile_input(job, reply)
        job.partial = False
        self.stats.region_refetches += 1
        return True


_NO_OUTPUT = np.empty(0, np.float32)  # a kept tile's TileDone carries none


def _expire_reply(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


async def _reply_within(fut: asyncio.Future[T], timeout: float) -> T:
    """``await asyncio.wait_for(fut, timeout)`` for a reply future that only the receive loop
    sets, without wait_for's extra future and callbacks (this runs for every steal and strip
    fetch)."""
    handle = asyncio.get_running_loop().call_later(timeout, _expire_reply, fut)
    try:
        return await fut
    finally:
        handle.cancel()
