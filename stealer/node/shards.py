"""Sharded tail layers (``stealer node --shards K [--coded]``): the shell of
:mod:`stealer.roles.shards`.

The gateway is the *coordinator*: it places the tail layers (:class:`ShardPlacer`) over the
nodes it knows, tells each what to hold (:class:`ShardAssign`), and runs every frame's tail
itself: the layers without weights in a tail thread, each weighted layer as shard tasks
(:class:`ShardTask`) to its holders, gathered (or one shard recovered from the parity) by
:class:`LayerRound`'s decisions. Every node holding shards reads exactly their byte ranges of
its own weights file (:func:`stealer.shard.read_shards`), answers :class:`ShardReady`, and
computes the tasks it is sent (:class:`ShardResult`).

A node in shard mode never loads the whole model: :func:`load_partial_network` gives it the
fused block's weights (for tiles) and nothing else; its shards come later, by assignment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import kernels

from ..darknet import ModelSpec
from ..errors import CommClosedError, ConfigError, ProtocolError, StealerError
from ..ftp.execute import fused_maps
from ..layers import ConnectedSpec, ConvSpec
from ..network import Network, output_digest
from ..placement import Placement, channels_of
from ..roles import shards as sh_role
from ..scheduler import TaskRef
from ..shard import gather, read_parity, read_shards, recover, run_rows
from ..wire.messages import ShardAssign, ShardReady, ShardResult, ShardTask, TailDone
from .config import Job, Peer, parse_plan_key
from .shardstate import HoldKey, PendingShard
from .state import NodeState

log = logging.getLogger("stealer.node")

UNLIMITED = 1 << 40
"""What a node offering no limit (``max_memory`` 0) counts as in a placement."""

_GATED_INPUT_BYTES = 1 << 20
"""Shard inputs of at least this size are sent one at a time (see ``ShardShell._send_shard``)."""


# --------------------------------------------------------------------------------- loading


def weights_cache_dir() -> Path:
    """Where random weights files are cached: ``$STEALER_CACHE`` or the temp dir."""
    return Path(os.environ.get("STEALER_CACHE") or tempfile.gettempdir()) / "stealer-weights"


def random_weights_file(spec: ModelSpec, cfg: str | os.PathLike[str], seed: int) -> Path:
    """A darknet weights file of ``cfg``'s seeded random weights, written once per (cfg, seed).

    The file is written by a child process (``stealer weights``), so that this process never
    holds the whole model even then (``random_weights`` draws every layer from one generator in
    sequence; the child holds the model while it writes). Written to a temporary name and
    renamed, so a node that starts alongside never reads half a file.
    """
    text = Path(spec.source).read_bytes() if Path(spec.source).is_file() else spec.source.encode()
    path = weights_cache_dir() / f"{hashlib.sha256(text).hexdigest()[:16]}-seed{seed}.weights"
    if path.is_file() and path.stat().st_size == spec.weights_nbytes():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    proc = subprocess.run([sys.executable, "-m", "stealer", "weights", "--cfg", str(cfg), "--seed", str(seed),
                           "--out", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"could not write random weights to {tmp}: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, path)
    return path


def model_hash(spec: ModelSpec, weights: str | os.PathLike[str] | None, seed: int) -> str:
    """The model hash :meth:`Network.from_darknet` (a weights file) or :meth:`Network.from_random`
    (``seed``) gives, without loading the model: nodes in shard mode and others agree."""
    digest = hashlib.sha256()
    if weights is not None:
        digest.update(Path(spec.source).read_bytes())
        with open(weights, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(Path(spec.source).read_bytes() if Path(spec.source).is_file() else spec.source.encode())
        digest.update(f"random-weights:{seed}".encode())
    return digest.hexdigest()[:16]


def load_partial_network(spec: ModelSpec, weights: str | os.PathLike[str], layers: int, model_hash: str
                         ) -> tuple[Network, int]:
    """A network holding only the weights of layers ``0 .. layers-1`` (the fused block), read by
    range from ``weights``; returns it and the bytes of weights it holds."""
    net = Network(spec, {}, model_hash, partial=True)
    wanted = [(l.index, 0, channels_of(l)) for l in spec.weighted_layers() if l.index < layers]
    held, _ = read_shards(weights, spec, wanted) if wanted else ([], 0)
    for sw in held:
        table = net.conv if isinstance(spec.layers[sw.layer], ConvSpec) else net.fc
        table[sw.layer] = (sw.weight, sw.bias)
    return net, sum(sw.nbytes for sw in held)


class RemoteTail(Network):
    """The tail's forward pass at the coordinator: layers without weights run here (in the tail
    thread), each weighted layer from ``start`` on is ``remote(i, x)`` (its shard tasks, waited
    for on the event loop). Holds no weights."""

    def __init__(self, net: Network, start: int, remote: Callable[[int, np.ndarray], np.ndarray]) -> None:
        super().__init__(net.spec, {}, net.model_hash, partial=True)
        self._start = start
        self._remote = remote

    def run_layer(self, i: int, x: np.ndarray, *, executor: Any = None, threads: int = 1) -> np.ndarray:
        if i >= self._start and isinstance(self.layers[i], (ConvSpec, ConnectedSpec)):
            return self._remote(i, x)
        return super().run_layer(i, x, executor=executor, threads=threads)


def _rows(layer: ConvSpec | ConnectedSpec, x: np.ndarray, w: np.ndarray, b: np.ndarray, pre: bool) -> np.ndarray:
    """A shard's output (what runs in a compute thread)."""
    return run_rows(layer, x, w, b, pre_activation=pre)


def warm_holding(layer: ConvSpec | ConnectedSpec, w: np.ndarray, b: np.ndarray, parity: bool) -> None:
    """Run a holding's kernels once, as its shard tasks will (the parity: pre-activation; a shard:
    both, as a coded placement or not sends it), on a small input, so that its first task does not
    compile (a node's start-up warm-up compiles each layer's own activation only). At most 16 of
    its rows, on a map of the size :meth:`Network.warm_up` uses: milliseconds once compiled."""
    rows = min(len(b), 16)
    wr, br = np.ascontiguousarray(w[:rows]), np.ascontiguousarray(b[:rows])
    if isinstance(layer, ConvSpec):
        sy, sx = layer.strides
        side = layer.span + 2 * max(sy, sx)
        x = np.zeros((layer.in_shape[0], side, side), np.float32)
        out = (rows, (side + 2 * layer.pad - layer.span) // sy + 1, (side + 2 * layer.pad - layer.span) // sx + 1)
        small = dataclasses.replace(layer, in_shape=x.shape, out_shape=out, filters=rows)
        for pre in (True,) if parity else (True, False):
            run_rows(small, x, wr, br, pre_activation=pre)
    else:
        v = np.zeros(wr.shape[1], np.float32)
        for pre in (True,) if parity else (True, False):
            run_rows(layer, v, wr, br, pre_activation=pre)


def _tail(runner: RemoteTail, maps: dict[int, np.ndarray], start: int, net: Network, img_w: int, img_h: int,
          thresh: float, nms: float) -> tuple[str, list[dict[str, Any]]]:
    outs = runner.outputs_from(maps, start)
    dets = [d.to_dict() for d in net.detect(outs, img_w=img_w, img_h=img_h, thresh=thresh, nms=nms)]
    return output_digest(outs), dets


# --------------------------------------------------------------------------------- the shell


class ShardShell(NodeState):
    """Holding and computing shards; placing and gathering them at the coordinator.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, id, peers, gateway, stats, sharding,
    _pool, _tasks.
    """

    # ---------------------------------------------------------------- holder side
    def _on_shard_assign(self, peer: Peer | None, msg: ShardAssign) -> None:
        if self.sharding is None:
            log.warning("shard-assign from %s ignored: this node runs without --shards",
                        (peer.node_id if peer else self.id)[:8])
            return
        self._spawn(self._hold(msg.epoch, [(l, a, z, bool(p), k) for l, a, z, p, k in msg.holdings], peer),
                    "shard hold")

    async def _hold(self, epoch: int, holdings: list[tuple[int, int, int, bool, int]], reply_to: Peer | None) -> None:
        st = self.sharding
        assert st is not None
        if st.lock is None:
            st.lock = asyncio.Lock()
        async with st.lock:
            if epoch < st.epoch:
                return  # a newer assignment was read already
            st.epoch = epoch
            want = {(l, a, z, p): k for l, a, z, p, k in holdings}
            for key in [key for key in st.held if key not in want]:
                del st.held[key]  # dropped first: this node's peak stays what the placement says
            ok, error = True, ""
            try:
                for key, k in want.items():
                    if key not in st.held:
                        st.held[key] = await asyncio.get_running_loop().run_in_executor(
                            None, self._read_holding, key, k)
            except StealerError as exc:
                ok, error = False, str(exc)
                log.error("cannot hold the shards of placement %d: %s", epoch, exc)
            self.stats.shard_bytes = st.nbytes
            self._event({"event": "shards-held", "time": time.time(), "epoch": epoch, "ok": ok,
                         "holdings": [list(key) for key in st.held], "nbytes": st.nbytes})
        reply = ShardReady(epoch, ok, st.nbytes, error[:500])
        if reply_to is None:
            self._on_shard_ready(None, reply)
        else:
            self._post(reply_to, reply)

    def _read_holding(self, key: HoldKey, k: int) -> tuple[np.ndarray, np.ndarray]:
        """In a thread: the weights of one holding, by range from this node's weights file."""
        layer, start, stop, parity = key
        if self.cfg.weights_file is None:
            raise ConfigError("this node has no weights file to read shards from")
        spec = self.net.spec
        if not 0 <= layer < len(spec.layers) or not isinstance(spec.layers[layer], (ConvSpec, ConnectedSpec)):
            raise ProtocolError(f"layer {layer} has no weights to hold")
        if parity:
            p, _ = read_parity(self.cfg.weights_file, spec, layer, k)
            if (start, stop) != (0, p.rows):
                raise ProtocolError(f"layer {layer}: the parity of {k} shards has {p.rows} rows, not [{start}, {stop})")
            w, b = p.weight, p.bias
        else:
            (sw,), _ = read_shards(self.cfg.weights_file, spec, [(layer, start, stop)])
            w, b = sw.weight, sw.bias
        shape = spec.layers[layer]
        assert isinstance(shape, (ConvSpec, ConnectedSpec))
        warm_holding(shape, w, b, parity)
        return w, b

    async def _on_shard_task(self, peer: Peer | None, msg: ShardTask) -> None:
        assert peer is not None
        reply = await self._run_shard(msg.layer, msg.start, msg.stop, msg.parity, msg.pre_activation, msg.data)
        if isinstance(reply, str):
            await self._respond(peer, ShardResult(msg.task_id, False, error=reply[:500]), msg.op)
        else:
            y, seconds = reply
            await self._respond(peer, ShardResult(msg.task_id, True, y, seconds), msg.op)

    async def _run_shard(self, index: int, start: int, stop: int, parity: bool, pre: bool, x: np.ndarray
                         ) -> tuple[np.ndarray, float] | str:
        """One shard task here: its output and seconds, or why not (a string)."""
        st = self.sharding
        held = st.held.get((index, start, stop, parity)) if st is not None else None
        if held is None:
            return f"layer {index} [{start}, {stop}){' parity' if parity else ''} is not held here"
        layer = self.net.layers[index]
        assert isinstance(layer, (ConvSpec, ConnectedSpec))
        want = tuple(self.net.input_shape_of(index))
        if x.dtype != np.float32 or tuple(x.shape) != want:
            return f"layer {index}: input {x.dtype} {tuple(x.shape)} is not the float32 {want} it reads"
        if not x.flags.writeable:
            # the wire's zero-copy view: a read-only array is another type to Numba, whose kernels
            # would compile again for it (seconds to tens of seconds in a cold process, which the
            # coordinator rightly takes for a late or lost holder); one copy of the input is cheap
            x = np.array(x)
        t0 = time.perf_counter()
        w, b = held
        try:
            if self.cfg.slots > 0:
                y = await self._compute(_rows, layer, x, w, b, pre or parity)
            else:  # a node too small for tiles still serves its shards
                y = await asyncio.get_running_loop().run_in_executor(None, _rows, layer, x, w, b, pre or parity)
        except StealerError as exc:
            return f"layer {index}: {exc}"
        self.stats.shard_tasks += 1
        return y, time.perf_counter() - t0

    # ---------------------------------------------------------------- coordinator: placement
    def _offer(self, max_memory: int) -> int:
        return max_memory or UNLIMITED

    def _shards_changed(self) -> None:
        """Peers came or went (or this node started as gateway): place again."""
        st = self.sharding
        if st is None or not self.is_gateway:
            return
        now = time.monotonic()
        if st.placer is None:
            st.placer = sh_role.ShardPlacer(self.net.spec, self.id, self.layers, self.cfg.shards, self.cfg.coded,
                                            now, self.cfg.shard_timing, pipeline=self.cfg.pipeline)
        offers = {self.id: self._offer(self.cfg.max_memory)}
        offers.update({pid: self._offer(p.max_memory) for pid, p in self.peers.items()})
        self._carry_out_placement(st.placer.nodes_changed(offers, now))

    def _shards_peer_lost(self, node: str) -> None:
        st = self.sharding
        if st is None:
            return
        for p in list(st.pending.values()):
            if p.round.jobs[p.job].node == node:
                p.reasons[p.job] = "holder lost"
                p.round.fail(p.job)
                p.wake.set()
        self._shards_changed()

    def _shard_tick(self) -> None:
        st = self.sharding
        if st is None or st.placer is None:
            return
        st.timer = None
        self._carry_out_placement(st.placer.tick(time.monotonic()))

    def _carry_out_placement(self, actions: list[sh_role.PlaceAction]) -> None:
        st = self.sharding
        assert st is not None and st.placer is not None
        for act in actions:
            if isinstance(act, sh_role.Assign):
                if act.node == self.id:
                    self._spawn(self._hold(act.epoch, [(l, a, z, bool(p), k) for l, a, z, p, k in act.holdings], None),
                                "shard hold")
                elif act.node in self.peers:
                    self._post(self.peers[act.node], ShardAssign(act.epoch, [list(h) for h in act.holdings]))
            elif isinstance(act, sh_role.Activated):
                st.active, st.active_epoch = act.placement, act.epoch
                self._placement_changed()
                nodes = {n.name: {"weights": st.node_bytes.get(n.name, 0), "planned": n.weights,
                                  "peak": n.peak} for n in act.placement.nodes}
                log.info("placement %d active: K=%d%s over %d node(s)", act.epoch, act.placement.shards,
                         " + parity" if act.placement.coded else "", len(act.placement.nodes))
                self._event({"event": "placement", "time": time.time(), "epoch": act.epoch,
                             "shards": act.placement.shards, "coded": act.placement.coded, "nodes": nodes,
                             "layers": {l.index: [[h.node, h.start, h.stop, int(h.parity)] for h in l.holders]
                                        for l in act.placement.layers if l.mode in ("whole", "shards")}})
            elif isinstance(act, sh_role.PlaceFailed):
                if st.last_failure != act.message:
                    log.warning("no placement of the tail fits the nodes known (frames wait): %s", act.message)
                    self._event({"event": "placement-failed", "time": time.time(), "error": act.message})
                st.last_failure = act.message
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        at = st.placer.next_check()
        if at is not None:
            st.timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._shard_tick)

    def _placement_changed(self) -> None:
        st = self.sharding
        assert st is not None
        if st.changed is not None:
            st.changed.set()
        st.changed = asyncio.Event()

    def _on_shard_ready(self, peer: Peer | None, msg: ShardReady) -> None:
        st = self.sharding
        if st is None or st.placer is None or not self.is_gateway:
            return
        sender = peer.node_id if peer is not None else self.id
        st.node_bytes[sender] = msg.nbytes
        if not msg.ok:
            log.warning("node %s cannot hold its shards: %s", sender[:8], msg.error)
        self._carry_out_placement(st.placer.ready(sender, msg.epoch, msg.ok, time.monotonic()))

    def _on_shard_result(self, peer: Peer | None, msg: ShardResult) -> None:
        st = self.sharding
        if st is None:
            return
        p = st.pending.pop(msg.task_id, None)
        if p is None:
            # a late answer of a round that is over (recovered, or re-run): its holder is alive
            node = st.ended.get(msg.task_id)
            if node is not None and peer is not None and peer.node_id == node:
                del st.ended[msg.task_id]
                if msg.ok and st.placer is not None:
                    self._carry_out_placement(st.placer.answered(node, time.monotonic(), late=True))
            return
        job = p.round.jobs[p.job]
        if peer is None or peer.node_id != job.node:
            st.pending[msg.task_id] = p  # still the holder's to answer
            raise ProtocolError(f"shard-result {msg.task_id} from a node it was not sent to")
        now = time.monotonic()
        if msg.ok:
            assert msg.data is not None
            want = (job.stop - job.start,) + tuple(self.net.layers[p.round.layer].out_shape[1:])
            if msg.data.dtype != np.float32 or tuple(msg.data.shape) != want:
                p.reasons[p.job] = "bad result"
                p.round.fail(p.job)
                p.wake.set()
                raise ProtocolError(f"shard-result {msg.task_id}: {msg.data.dtype} {tuple(msg.data.shape)}, "
                                    f"not float32 {want}")
            p.outs[p.job] = msg.data
            p.round.result(p.job, now)
            if st.placer is not None:
                self._carry_out_placement(st.placer.answered(job.node, now))
        else:
            p.reasons[p.job] = msg.error or "failed"
            p.round.fail(p.job)
        p.wake.set()

    # ---------------------------------------------------------------- coordinator: tails
    def _start_sharded_tail(self, ref: TaskRef) -> None:
        self._spawn(self._sharded_tail(ref), f"sharded tail {ref.source[:8]}/{ref.frame}")

    async def _sharded_tail(self, ref: TaskRef) -> None:
        st = self.sharding
        assert st is not None
        key = (ref.source, ref.frame)
        tail = self.gateway.tail_input(key)
        if tail is None:
            return
        plan_key, fused, img_w, img_h, holders = tail
        if fused is None:  # tiles kept their outputs (a peer chose a direct data path): fetch them
            job = Job(ref, plan_key, None, img_w, img_h, self.id, holders=holders)
            if not await self._collect_outputs(job):
                return  # those tiles run again, and their frame's tail with them
            fused = job.data
            assert fused is not None
        _, start, _ = parse_plan_key(plan_key)
        loop = asyncio.get_running_loop()
        recovered: list[list[int]] = []

        def remote(i: int, x: np.ndarray) -> np.ndarray:  # in the tail thread
            fut = asyncio.run_coroutine_threadsafe(self._shard_layer(i, x, recovered), loop)
            st.in_threads.add(fut)
            try:
                return fut.result()
            finally:
                st.in_threads.discard(fut)

        if st.tail_pool is None:
            # one frame's tail per pipeline stage at once (and one more, gathering): consecutive
            # frames' tails then run on different stages' nodes together
            st.tail_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, self.cfg.pipeline + 1),
                                                                 thread_name_prefix="tail")
        runner = RemoteTail(self.net, start, remote)
        t0 = time.perf_counter()
        try:
            maps = fused_maps(self._plan(plan_key), np.asarray(fused))
            digest, dets = await loop.run_in_executor(st.tail_pool, _tail, runner, maps, start, self.net, img_w, img_h,
                                                      self.cfg.thresh, self.cfg.nms)
        except (StealerError, ValueError) as exc:
            log.error("sharded tail of %s/%d failed: %s", ref.source[:8], ref.frame, exc)
            if self.is_gateway:
                self._carry_out(self.gateway.give_up(key, ref.task, str(exc), time.monotonic()))
            return
        self.stats.tails_run += 1
        self._on_tail_done(None, TailDone(ref.source, ref.frame, digest, dets, time.perf_counter() - t0,
                                          recovered=recovered))

    async def _active_placement(self, index: int, avoid: set[str], after: int | None) -> tuple[Placement, int]:
        """The active placement, once there is one that is newer than ``after`` or does not
        put layer ``index`` on any node of ``avoid`` (at most one lease: then the active one)."""
        st = self.sharding
        assert st is not None
        give_up = time.monotonic() + self.cfg.shard_timing.lease
        while True:
            p = st.active
            if p is not None:
                nodes = {h.node for h in p.layers[index].holders}
                if after is None or st.active_epoch > after or not (nodes & avoid) or time.monotonic() >= give_up:
                    return p, st.active_epoch
            if st.changed is None:
                st.changed = asyncio.Event()
            waiter = st.changed
            timeout = None if p is None else max(0.0, give_up - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout)

    async def _shard_layer(self, index: int, x: np.ndarray, recovered: list[list[int]]) -> np.ndarray:
        """Layer ``index`` of one frame from its shards (see :class:`LayerRound`)."""
        st = self.sharding
        assert st is not None
        layer = self.net.layers[index]
        assert isinstance(layer, (ConvSpec, ConnectedSpec))
        bounds: list[tuple[int, int]] = []
        have: dict[int, np.ndarray] = {}
        have_pre = False  # whether what is in hand is pre-activation (a coded round's) or final
        avoid: set[str] = set()
        after: int | None = None
        while True:
            placement, epoch = await self._active_placement(index, avoid, after)
            lp = placement.layers[index]
            shards = sorted((h for h in lp.holders if not h.parity), key=lambda h: h.start)
            parity = [h for h in lp.holders if h.parity]
            new_bounds = [(h.start, h.stop) for h in shards]
            pre = bool(parity)
            if new_bounds != bounds or pre != have_pre:
                # split otherwise, or the parity came or went (coded rounds return pre-activation
                # outputs, others final ones): what is in hand does not fit this round
                bounds, have, have_pre = new_bounds, {}, pre
            jobs = [sh_role.ShardJob(h.node, n, h.start, h.stop) for n, h in enumerate(shards) if n not in have]
            jobs += [sh_role.ShardJob(h.node, -1, h.start, h.stop) for h in parity]
            rnd = sh_role.LayerRound(len(shards), jobs, time.monotonic(), self.cfg.shard_timing, frozenset(have),
                                     layer=index)
            outs: dict[int, np.ndarray] = {}
            reasons: dict[int, str] = {}
            wake = asyncio.Event()
            ids = self._issue(rnd, x, pre, epoch, outs, reasons, wake)
            try:
                while True:
                    d = rnd.decide(time.monotonic())
                    if isinstance(d, sh_role.Exact | sh_role.Recover):
                        parts = dict(have)
                        parts.update({job.number: outs[j] for j, job in enumerate(jobs)
                                      if not job.parity and j in outs})
                        if isinstance(d, sh_role.Recover):
                            par = next(outs[j] for j, job in enumerate(jobs) if job.parity and j in outs)
                            others = {n: v for n, v in parts.items() if n != d.shard}
                            parts = others
                            parts[d.shard] = recover(par, others, d.shard, bounds)
                            recovered.append([index, d.shard])
                            self.stats.shards_recovered += 1
                            late = [job.node for j, job in enumerate(jobs) if job.number == d.shard]
                            log.info("layer %d: shard %d (on %s) recovered from the parity", index, d.shard,
                                     late[0][:8] if late else "?")
                            if late and late[0] != self.id and st.placer is not None:
                                # a frozen or slow holder: re-place without it if the others suffice
                                self._carry_out_placement(st.placer.suspect(late[0], time.monotonic(),
                                                                            degrade=False))
                        y = gather([parts[n] for n in range(len(shards))])
                        if pre:
                            kernels.activate(y, layer.activation)
                        return y.reshape(layer.out_shape)
                    if isinstance(d, sh_role.Rerun):
                        for j, job in enumerate(jobs):
                            if not job.parity and j in outs:
                                have[job.number] = outs[j]
                        # holders that lost or sat on a task are left out; one that dropped its
                        # shard for a newer placement only needs that placement to become active
                        lost = {jobs[j].node for j in rnd.failed if "not held" not in reasons.get(j, "")}
                        avoid = set(d.nodes)
                        after = epoch
                        self.stats.shard_reruns += len(d.shards)
                        log.warning("layer %d: shard(s) %s lost (%s); run again under the next placement", index,
                                    list(d.shards), ", ".join(sorted({reasons.get(j, "late") for j in rnd.failed})))
                        self._event({"event": "shard-rerun", "time": time.time(), "layer": index,
                                     "shards": list(d.shards), "nodes": sorted(avoid)})
                        for node in sorted(lost - {self.id}):
                            if st.placer is not None:
                                self._carry_out_placement(st.placer.suspect(node, time.monotonic(), degrade=True))
                        break
                    assert isinstance(d, sh_role.Wait)
                    timeout = None if d.until is None else max(0.0, d.until - time.monotonic())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout)
                    wake.clear()
            finally:
                for tid in ids:
                    gone = st.pending.pop(tid, None)
                    if gone is not None:  # still out: remember whose it is, for a late answer
                        st.ended[tid] = gone.round.jobs[gone.job].node
                while len(st.ended) > self.cfg.limits.ended_shard_tasks_remembered:
                    st.ended.popitem(last=False)

    def _issue(self, rnd: sh_role.LayerRound, x: np.ndarray, pre: bool, epoch: int, outs: dict[int, np.ndarray],
               reasons: dict[int, str], wake: asyncio.Event) -> list[int]:
        """Send a round's tasks (this node's own run in its compute threads); returns their ids."""
        st = self.sharding
        assert st is not None
        ids = []
        for j, job in enumerate(rnd.jobs):
            if job.node == self.id:
                self._spawn(self._local_shard(rnd, j, x, pre, outs, reasons, wake), "local shard")
                continue
            peer = self.peers.get(job.node)
            if peer is None:
                reasons[j] = "holder lost"
                rnd.fail(j)
                continue
            tid = next(st.ids)
            st.pending[tid] = PendingShard(rnd, j, outs, reasons, wake)
            ids.append(tid)
            msg = ShardTask(tid, epoch, rnd.layer, job.start, job.stop, job.parity, pre, x)
            self._spawn(self._send_shard(peer, msg, tid), "shard task")
        wake.set()
        return ids

    async def _send_shard(self, peer: Peer, msg: ShardTask, tid: int) -> None:
        st = self.sharding
        assert st is not None
        if st.send_gate is None:
            st.send_gate = asyncio.Lock()
        try:
            if msg.data.nbytes < _GATED_INPUT_BYTES:
                await peer.comm.send(msg)
            else:
                # one big input at a time: the K copies of a layer's input all leave by this
                # node's one uplink anyway, so sending them together only makes each arrive later
                # and, on a link slower than the writes (Wi-Fi), keeps every unsent copy in its
                # transport's buffer at once (K x 6.4 MB for VGG-16's first sharded layer). Not
                # measurable on loopback, where the kernel takes each copy at once: the VGG-16
                # coordinator's 17 MiB over its plan is something else (left open)
                async with st.send_gate:
                    await peer.comm.send(msg)
        except CommClosedError:
            st = self.sharding
            p = st.pending.pop(tid, None) if st is not None else None
            if p is not None:
                p.reasons[p.job] = "holder lost"
                p.round.fail(p.job)
                p.wake.set()

    async def _local_shard(self, rnd: sh_role.LayerRound, j: int, x: np.ndarray, pre: bool,
                           outs: dict[int, np.ndarray], reasons: dict[int, str], wake: asyncio.Event) -> None:
        job = rnd.jobs[j]
        got = await self._run_shard(rnd.layer, job.start, job.stop, job.parity, pre, x)
        if isinstance(got, str):
            reasons[j] = got
            rnd.fail(j)
        else:
            outs[j] = got[0]
            rnd.result(j, time.monotonic())
        wake.set()

    def _close_shards(self) -> None:
        st = self.sharding
        if st is None:
            return
        if st.timer is not None:
            st.timer.cancel()
        for fut in list(st.in_threads):
            fut.cancel()  # a tail thread waiting on a layer ends now
        if st.tail_pool is not None:
            st.tail_pool.shutdown(wait=False, cancel_futures=True)


def load_shard_node(args: Any) -> tuple[Network, str, int, bool]:
    """What ``stealer node --shards`` loads: the network with the fused block's weights only (if
    this node's ``--max-memory`` fits a tile; else none), the weights file its shards are read
    from (``--weights``, or the cached file of ``--random-weights``), the bytes of weights held,
    and whether it computes tiles."""
    from ..darknet import parse_cfg
    from ..ftp.plan import default_layers, make_plan, resolve_scheme
    from ..network import resolve_cfg
    from .config import default_memory, memory_needs

    spec = parse_cfg(resolve_cfg(args.cfg))
    seed = 0 if args.random_weights is None else args.random_weights
    path = Path(args.weights) if args.weights else random_weights_file(spec, resolve_cfg(args.cfg), seed)
    digest = model_hash(spec, args.weights, seed)
    scheme = resolve_scheme(args.scheme, spec, args.layers)
    grid = (1, 1) if args.grid == "auto" else args.grid
    depth = args.layers or default_layers(spec, grid, scheme)
    net = Network(spec, {}, digest, partial=True)
    tile, _ = memory_needs(net, make_plan(net, grid, depth, scheme=scheme))
    memory = args.max_memory if args.max_memory is not None else default_memory()
    computes = not memory or memory >= tile
    held = 0
    if computes:
        net, held = load_partial_network(spec, path, depth, digest)
    else:
        read_shards(path, spec, [])  # the file's header and length are checked now, not at the first shard
    return net, str(path), held, computes
