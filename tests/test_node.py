"""The node runtime: in-process clusters on real 127.0.0.1 sockets, checked bit for bit against
single-device inference of the same frames."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import numpy as np
import pytest

from stealer.config import DEFAULT_LIMITS
from stealer.discovery import new_node_id
from stealer.images import synthetic_frame
from stealer.network import Network, builtin_cfg
from stealer.node import Node, NodeConfig, RuntimeLimits, pack_strips, unpack_strips
from stealer.errors import CommClosedError, ProtocolError
from stealer.sources import SyntheticSource

pytestmark = pytest.mark.timeout(120)

# Timing constants patched down so a lost peer is noticed quickly; safe because Limits and
# RuntimeLimits are frozen objects passed to these nodes only.
FAST = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=1.0, handshake_timeout=2.0)
FAST_RT = RuntimeLimits(lease=5.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)


@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


def expected_digest(net: Network, seed: int, frame: int) -> str:
    out = net.forward(synthetic_frame(seed, frame, net.input_shape))
    return hashlib.sha256(out.tobytes()).hexdigest()


def config(gateway=False, sources=(), frames=None, peers=(), **kw) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=gateway,
                      sources=[SyntheticSource(s) for s in sources], frames=frames,
                      peers=list(peers), discovery=False, grid=kw.pop("grid", (3, 3)),
                      layers=kw.pop("layers", 9), limits=FAST, runtime=kw.pop("runtime", FAST_RT), **kw)


async def collect(node: Node, n: int, timeout: float = 60) -> list[dict]:
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await node.results.get())
    return out


def test_strip_packing_roundtrip_and_validation():
    strips = {3: np.ones((2, 1, 4), np.float32), 1: np.zeros((2, 3, 1), np.float32)}
    meta, data = pack_strips(strips)
    back = unpack_strips(meta, data)
    assert back.keys() == strips.keys() and all(np.array_equal(back[k], strips[k]) for k in strips)
    with pytest.raises(ProtocolError, match="more data"):
        unpack_strips([[1, 2, 3, 4]], np.zeros(5, np.float32))
    with pytest.raises(ProtocolError, match="longer"):
        unpack_strips([[1, 1, 1, 1]], np.zeros(5, np.float32))


@pytest.mark.parametrize("scheme, policy", [("quad", "steal"), ("none", "steal"), ("quad", "share")])
async def test_three_nodes_steal_and_match_single_device(tiny_net, scheme, policy):
    gw = Node(tiny_net, config(gateway=True, scheme=scheme, policy=policy))
    await gw.start()
    thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], scheme=scheme, policy=policy))
    await thief.start()
    # work sharing hands a frame's tiles to the nodes the source knows when the frame arrives:
    # the source starts once the others are up, so that "every node got tiles" can hold
    src = Node(tiny_net, config(sources=[5], frames=4, peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)],
                                scheme=scheme, policy=policy))
    await src.start()
    try:
        results = await collect(gw, 4)
    finally:
        for n in (thief, src, gw):
            await n.close()
    assert [r["frame"] for r in results] == [0, 1, 2, 3]  # released in frame order
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 5, r["frame"]), r
    total_tiles = sum(n.stats.tiles_run for n in (gw, src, thief))
    assert total_tiles >= 4 * 9
    assert gw.stats.frames_done == 4
    if policy == "steal":
        assert thief.stats.stolen + gw.stats.stolen > 0, "idle nodes never stole"
    else:  # shared round-robin: every node got tiles pushed, the gateway runs every tail
        assert thief.stats.tiles_run > 0 and gw.stats.tiles_run > 0 and gw.stats.tails_run == 4
    if scheme == "quad":
        assert sum(n.stats.reuse_fallbacks for n in (gw, src, thief)) < total_tiles


async def test_grants_carry_the_strips_their_victim_holds(tiny_net):
    """A computing source holds the strips of the producer tiles it ran: when it grants a
    reuse tile that consumes them, they go with the grant (no fetch), and every frame is
    still bit-exact; the holders it names for the rest come from the gateway's acks."""
    gw = Node(tiny_net, config(gateway=True, speculate=False))
    await gw.start()
    thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], speculate=False))
    await thief.start()
    src = Node(tiny_net, config(sources=[7], frames=8, max_inflight=3, speculate=False,
                                peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)]))
    try:
        await src.start()
        results = await collect(gw, 8)
    finally:
        for n in (thief, src, gw):
            await n.close()
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 7, r["frame"]), r
    assert src.stats.strips_granted > 0
    # (whether a thief gets a second tile unasked, and whether a node runs two back to back,
    # depends on how deep the queue is at that moment, a race here: test_roles checks those
    # decisions, test_only_short_tasks_go_two_at_a_time the node's use of them)
    assert sum(n.stats.region_refetches for n in (gw, src, thief)) == 0


def test_only_short_tasks_go_two_at_a_time(tiny_net):
    """Pairing and batched steals hide hand-off latency, which only matters for short tasks;
    a long task's second would only wait (its lease ageing into a straggler's)."""
    from stealer.scheduler import TaskRef

    node = Node(tiny_net, config(sources=[1]))
    short = node.cfg.runtime.short_task
    assert not node._short_tasks()  # nothing known yet: one at a time
    node.queue.typical[False] = 2 * short  # a node that computes nothing judges by its leases
    assert node._short_tasks()
    node.stats.tiles_run, node.stats.busy_seconds = 10, 10 * 0.5 * short
    assert node._short_tasks()
    node.stats.busy_seconds = 10 * 3 * short  # this node's own compute time decides
    assert not node._short_tasks()
    node.queue.add(TaskRef("s/0", 0, t) for t in range(50))  # a deep queue is not enough
    assert node._take_second() is None and len(node.queue) == 50


async def _camera_only_cluster(tiny_net, frames: int):
    """A source that computes nothing (every tile is stolen), a gateway and a thief; no
    speculative copies, so every grant is run exactly once."""
    gw = Node(tiny_net, config(gateway=True, speculate=False))
    await gw.start()
    thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], speculate=False))
    await thief.start()
    src = Node(tiny_net, config(sources=[6], frames=frames, slots=0, max_inflight=3,
                                peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)], speculate=False))
    return gw, src, thief


async def _camera_only_run(tiny_net, frames: int, setup=None):
    """Run :func:`_camera_only_cluster` until the gateway has ``frames`` results; ``setup`` may
    change the nodes first. Returns the results and the three nodes (closed)."""
    gw, src, thief = await _camera_only_cluster(tiny_net, frames)
    if setup is not None:
        setup(gw, src, thief)
    try:
        await src.start()
        results = await collect(gw, frames)
    finally:
        for n in (thief, src, gw):
            await n.close()
    return results, gw, src, thief


async def test_reuse_tiles_are_granted_with_their_small_region(tiny_net):
    results, gw, src, thief = await _camera_only_run(tiny_net, 6)
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 6, r["frame"]), r
    # the camera ran nothing itself; once a tile's producers were in, it shipped the small region
    assert src.stats.tiles_run == 0 and src.stats.small_grants > 0
    assert sum(n.stats.region_refetches for n in (gw, thief)) == 0
    # both computing nodes stole tiles, and strips went from producer to consumer directly
    assert gw.stats.tiles_run > 0 and thief.stats.tiles_run > 0
    assert gw.stats.strips_served + thief.stats.strips_served > 0
    assert sum(n.stats.reuse_fallbacks for n in (gw, thief)) < sum(n.stats.tiles_run for n in (gw, thief)) / 2


async def test_gone_strips_bring_the_full_region_from_the_owner(tiny_net):
    def forget_strips(*nodes):
        # no node keeps the strips it produces (as if every holder had evicted them): every
        # tile shipped with only its small region must fetch its full region from the camera
        for node in nodes:
            node._held.put = lambda *args: None

    results, gw, src, thief = await _camera_only_run(tiny_net, 6, forget_strips)
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 6, r["frame"]), r
    assert src.stats.small_grants > 0
    assert sum(n.stats.region_refetches for n in (gw, thief)) == src.stats.small_grants


async def test_camera_pixels_travel_and_give_the_letterboxed_result(tiny_net, tmp_path):
    """Frames of another size and aspect than the network's (a camera's): tiles travel as the
    uint8 pixels they are letterboxed from, and the result is still bit-identical."""
    from PIL import Image

    from stealer.images import load_input
    from stealer.sources import ImageDirSource

    rng = np.random.default_rng(4)
    sizes = [(130, 70), (61, 97), (96, 96)]  # (w, h): wider, taller, the network's own
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    def images(gw, src, thief):
        src.cfg.sources = [ImageDirSource(str(tmp_path))]

    results, gw, src, thief = await _camera_only_run(tiny_net, len(sizes), images)
    for r in results:
        x, _, _ = load_input(tmp_path / f"{r['frame']}.png", tiny_net.input_shape)
        assert r["output_sha256"] == hashlib.sha256(tiny_net.forward(x).tobytes()).hexdigest(), r
    # the camera computed nothing: every tile went out as pixels and came back computed
    assert src.stats.tiles_run == 0 and src.stats.pixel_grants >= len(sizes) * 9


async def test_null_compute_moves_data_as_a_real_run(tiny_net):
    """Null compute (runtime benchmarks) skips the kernels, not the protocol: reuse tiles still
    find their producers' strips (zeros of the right shapes) instead of falling back."""
    def null(*nodes):
        for node in nodes:
            node.cfg.null_compute = True

    results, gw, src, thief = await _camera_only_run(tiny_net, 4, null)
    assert [r["frame"] for r in results] == [0, 1, 2, 3]
    # no tile shipped small found its strips missing (without strips every one of them would)
    assert src.stats.small_grants > 0 and sum(n.stats.region_refetches for n in (gw, thief)) == 0
    assert gw.stats.strips_served + thief.stats.strips_served > 0


async def test_frames_made_before_the_gateway_appears_are_queued_once(tiny_net):
    src = Node(tiny_net, config(sources=[8], frames=3))
    await src.start()
    try:
        async with asyncio.timeout(30):
            while not src.source.frames:  # the camera has a frame and waits for a gateway
                await asyncio.sleep(0.01)
        gw = Node(tiny_net, config(gateway=True, peers=[("127.0.0.1", src.port)]))
        await gw.start()
        try:
            results = await collect(gw, 3)
        finally:
            await gw.close()
    finally:
        await src.close()
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 8, f) for f in range(3)]
    # the gateway's first claim is not a takeover: nothing starts again, no tile runs twice
    assert src.stats.frames_resent == 0 and gw.stats.duplicates_dropped == 0


async def test_gateway_is_source_and_two_sources_in_flight(tiny_net):
    gw = Node(tiny_net, config(gateway=True, sources=[1, 2], frames=3, max_inflight=2))
    await gw.start()
    worker = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)]))
    await worker.start()
    try:
        results = await collect(gw, 6)
        await asyncio.wait_for(gw.wait_sources_done(), 30)
    finally:
        await worker.close()
        await gw.close()
    by_source: dict[str, list[int]] = {}
    for r in results:
        by_source.setdefault(r["source"], []).append(r["frame"])
        seed = 1 if r["source"].endswith("/0") else 2
        assert r["output_sha256"] == expected_digest(tiny_net, seed, r["frame"])
    assert sorted(by_source.values()) == [[0, 1, 2], [0, 1, 2]]


async def test_nodes_find_each_other_by_mdns(tiny_net):
    # the source is on the worker: no frame can reach the gateway until mDNS has joined them
    cfg_gw = config(gateway=True)
    cfg_w = config(sources=[3], frames=2)
    for c in (cfg_gw, cfg_w):
        c.discovery, c.loopback = True, True
    async with Node(tiny_net, cfg_gw) as gw, Node(tiny_net, cfg_w) as w:
        results = await collect(gw, 2, timeout=60)
        assert w.id in gw.peers and gw.id in w.peers
    assert all(r["output_sha256"] == expected_digest(tiny_net, 3, r["frame"]) for r in results)


async def test_model_mismatch_is_refused_and_cluster_keeps_working(tiny_net):
    other = Network.from_cfg_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                                  .replace("height=416", "height=96"), seed=12)
    gw = Node(tiny_net, config(gateway=True, sources=[4], frames=2))
    await gw.start()
    stranger = Node(other, config(peers=[("127.0.0.1", gw.port)]))
    await stranger.start()
    try:
        results = await collect(gw, 2)
        assert stranger.id not in gw.peers and not stranger.peers
    finally:
        await stranger.close()
        await gw.close()
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 4, f) for f in (0, 1)]


async def _rogue(port: int, net: Network):
    """A raw peer with the right model hash, so it passes the handshake."""
    from stealer.wire import Hello, connect
    from stealer.wire.messages import PROTOCOL_VERSION

    hello = Hello(PROTOCOL_VERSION, new_node_id(), "worker", 0, 1, net.model_hash, 0)
    return await connect("127.0.0.1", port, hello, limits=FAST)


async def steal_one(rogue):
    """Ask until a task is granted (the queue may still be empty for a moment)."""
    from stealer.wire.messages import StealReply, StealRequest

    async with asyncio.timeout(30):
        while True:
            await rogue.send(StealRequest(1))
            while not isinstance(msg := await rogue.recv(), StealReply):
                pass
            if msg.granted:
                return msg


async def test_thief_that_dies_holding_a_task_loses_nothing(tiny_net):
    """A peer steals a tile, then its connection drops without a result: the tile is queued again
    and the frame still completes with the exact result."""
    src_cfg = config(gateway=True, sources=[8], frames=2, max_inflight=1)
    src_cfg.slots = 1
    gw = Node(tiny_net, src_cfg)
    await gw.start()
    try:
        rogue = await _rogue(gw.port, tiny_net)
        reply = await steal_one(rogue)
        stolen = (reply.source, reply.frame, reply.task)
        rogue.abort("simulated crash")
        results = await collect(gw, 2)
    finally:
        await gw.close()
    assert gw.stats.requeued >= 1, "the stolen task was never queued again"
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 8, f) for f in (0, 1)]
    assert stolen[1] in (0, 1)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\x00\x00\x10garbage-garbage!", id="garbage"),
        pytest.param(b"\xff\xff\xff\xff" + b"x" * 64, id="oversized-length"),
    ],
)
async def test_garbage_from_a_peer_drops_only_that_peer(tiny_net, payload):
    gw = Node(tiny_net, config(gateway=True, sources=[9], frames=2))
    await gw.start()
    try:
        rogue = await _rogue(gw.port, tiny_net)
        rogue._writer.write(payload)  # raw bytes on an authenticated connection
        await rogue._writer.drain()
        results = await collect(gw, 2)
        async with asyncio.timeout(10):
            while rogue.peer.node_id in gw.peers or len(gw.peers) > 0:
                await asyncio.sleep(0.05)
    finally:
        await gw.close()
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 9, f) for f in (0, 1)]


async def test_unknown_message_type_drops_only_that_peer(tiny_net):
    from stealer.wire.messages import TensorMsg

    gw = Node(tiny_net, config(gateway=True, sources=[10], frames=1))
    await gw.start()
    try:
        rogue = await _rogue(gw.port, tiny_net)
        async with asyncio.timeout(10):
            while rogue.local.node_id not in gw.peers:
                await asyncio.sleep(0.01)
        await rogue.send(TensorMsg("nope", np.zeros(3, np.float32)))
        with pytest.raises(CommClosedError):  # the gateway drops the connection that sent it
            async with asyncio.timeout(10):
                while True:
                    await rogue.recv()
        assert rogue.local.node_id not in gw.peers
        results = await collect(gw, 1)  # ... and goes on serving
    finally:
        await gw.close()
    assert results[0]["output_sha256"] == expected_digest(tiny_net, 10, 0)


async def test_standby_takes_over_when_the_gateway_dies(tiny_net, tmp_path):
    """The gateway dies after two frames: the standby with the smallest id claims the gateway,
    the source restarts every unacknowledged frame there, and every frame still comes out
    exactly once per gateway, bit-identical to single-device inference."""
    gw = Node(tiny_net, config(gateway=True))
    await gw.start()
    standbys: list[Node] = []
    for i in range(2):  # a full mesh, as discovery would make it
        c = config(peers=[("127.0.0.1", gw.port)] + [("127.0.0.1", n.port) for n in standbys])
        c.standby = True
        c.out = str(tmp_path / f"standby{i}.jsonl")
        standbys.append(Node(tiny_net, c))
        await standbys[-1].start()
    src = Node(tiny_net, config(sources=[12], frames=6, max_inflight=2,
                                peers=[("127.0.0.1", gw.port)] + [("127.0.0.1", n.port) for n in standbys]))
    await src.start()
    try:
        first = await collect(gw, 2)
        async with asyncio.timeout(30):
            while not gw.gateway.frames:  # a frame the gateway has started but not finished
                await asyncio.sleep(0.001)
        await gw.close()  # the gateway goes away mid-stream, with that frame unfinished
        while not gw.results.empty():  # it may have released more than two before it went
            first.append(gw.results.get_nowait())
        winner = min(standbys, key=lambda n: n.id)
        later: list[dict] = []
        async with asyncio.timeout(60):  # a frame the old gateway released may come out again
            while {r["frame"] for r in first + later} != set(range(6)):
                later.append(await winner.results.get())
        await asyncio.sleep(0.5)  # a second release of a frame, if there were one, comes out now
        while not winner.results.empty():
            later.append(winner.results.get_nowait())
        takeovers = [n.stats.takeovers for n in standbys]
    finally:
        for n in (src, *standbys):
            await n.close()
    assert sorted(takeovers) == [0, 1] and winner.stats.takeovers == 1
    frames = {r["frame"]: r["output_sha256"] for r in first + later}
    assert sorted(frames) == list(range(6))
    # each gateway releases a frame at most once (a set would hide a duplicate); the winner
    # releases in order every frame the old gateway had not released
    assert len(first) == len({r["frame"] for r in first}) and len(later) == len({r["frame"] for r in later})
    assert [r["frame"] for r in later] == sorted(r["frame"] for r in later)
    assert all(frames[f] == expected_digest(tiny_net, 12, f) for f in frames)
    assert src.stats.frames_resent >= 1


async def test_idle_node_copies_a_straggler_and_first_result_wins(tiny_net):
    """A thief steals a tile and sits on it (a straggler that never answers but stays connected):
    an idle node runs a speculative copy, so the frame finishes long before the lease runs out."""

    rt = RuntimeLimits(lease=120.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0, straggler_min=0.3)
    gw = Node(tiny_net, config(gateway=True, sources=[13], frames=1, runtime=rt))
    await gw.start()
    try:
        rogue = await _rogue(gw.port, tiny_net)
        await steal_one(rogue)  # and never answer
        results = await collect(gw, 1, timeout=30)  # the lease alone would take 120 s
        await rogue.close()
    finally:
        await gw.close()
    assert gw.stats.speculative >= 1
    assert results[0]["output_sha256"] == expected_digest(tiny_net, 13, 0)


async def test_deadline_overload_drops_unstarted_frames_in_order(tiny_net):
    """A source producing frames faster than the cluster computes them, with a deadline: frames
    nothing started on are dropped (and reported, in order); everything computed is exact."""
    cfg = config(gateway=True, sources=[14], frames=24, max_inflight=1)
    cfg.deadline = 5.0
    async with Node(tiny_net, cfg) as gw:
        results = await collect(gw, 24)
    assert [r["frame"] for r in results] == list(range(24))
    dropped = [r for r in results if r.get("dropped")]
    done = [r for r in results if not r.get("dropped")]
    assert dropped and done and gw.stats.frames_dropped == len(dropped)
    for r in done:
        assert "missing_tiles" not in r
        assert r["output_sha256"] == expected_digest(tiny_net, 14, r["frame"])


async def test_deadline_finishes_a_frame_with_missing_tiles_marked(tiny_net):
    """A tile is stolen by a peer that never answers: at the deadline the gateway finishes the
    frame without it and says which tile is missing."""

    cfg = config(gateway=True, sources=[15], frames=1, speculate=False)
    cfg.deadline = 1.0
    gw = Node(tiny_net, cfg)
    await gw.start()
    from stealer.wire.messages import StealReply

    try:
        rogue = await _rogue(gw.port, tiny_net)
        reply = await steal_one(rogue)
        granted = [reply.task]

        async def extra_grants():  # from a deep queue a steal brings more than one tile
            with contextlib.suppress(CommClosedError):
                while True:
                    msg = await rogue.recv()
                    if isinstance(msg, StealReply) and msg.granted:
                        granted.append(msg.task)

        listener = asyncio.ensure_future(extra_grants())
        (result,) = await collect(gw, 1, timeout=30)
        listener.cancel()
        await rogue.close()
    finally:
        await gw.close()
    assert 1 <= len(granted) <= gw.cfg.runtime.steal_batch
    assert result["missing_tiles"] == sorted(granted)
    assert 0 < result["missing_fraction"] < 1 and result["snr_db_estimate"] > 0
    assert result["output_sha256"] != expected_digest(tiny_net, 15, 0)


async def test_small_node_serves_tiles_only(tiny_net):
    """A node whose --max-memory fits a tile but not the tail layers never takes a tail."""
    from stealer.ftp.plan import make_plan
    from stealer.node import memory_needs

    tile, tail = memory_needs(tiny_net, make_plan(tiny_net, (3, 3), 9, scheme="quad"))
    assert 0 < tile and 0 < tail
    gw = Node(tiny_net, config(gateway=True, sources=[16], frames=4))
    await gw.start()
    small = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], max_memory=tile + tail // 2))
    await small.start()
    try:
        results = await collect(gw, 4)
    finally:
        await small.close()
        await gw.close()
    assert small.stats.tails_run == 0 and gw.stats.tails_run == 4
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 16, f) for f in range(4)]


def test_dropped_weights_give_a_clear_error(tiny_net):
    from stealer.darknet import random_weights

    net = Network(tiny_net.spec, random_weights(tiny_net.spec, 1), "x")
    x = np.zeros(net.input_shape, np.float32)
    assert net.drop_weights(9) > 0
    net.forward(x, 0, 9)  # the fused layers still run
    with pytest.raises(ValueError, match="weights were dropped"):
        net.forward(x)


async def test_a_failing_task_does_not_stop_the_node(tiny_net, monkeypatch):
    """The first tile computation raises (a bug, not a StealerError): the slot survives, the
    task comes back when its lease runs out, and the frame completes exactly."""
    rt = RuntimeLimits(lease=1.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)
    gw = Node(tiny_net, config(gateway=True, sources=[17], frames=1, runtime=rt, speculate=False))
    original = gw._compute_tile
    calls = []

    def flaky(job, borrowed):
        calls.append(job.ref)
        if len(calls) == 1:
            raise ValueError("simulated kernel bug")
        return original(job, borrowed)

    monkeypatch.setattr(gw, "_compute_tile", flaky)
    async with gw:
        (result,) = await collect(gw, 1)
    assert gw.stats.task_errors == 1 and gw.stats.requeued >= 1
    assert result["output_sha256"] == expected_digest(tiny_net, 17, 0)


async def test_two_gateways_that_meet_end_with_one_and_no_result_twice(tiny_net, tmp_path):
    """Split brain healing: two nodes that both act as gateway at the same epoch (as after a
    partition in which each side's standby took over) meet. The smaller node id wins on both
    sides, the other steps down and stops writing results; the source's frames all come out
    once, from the winner."""
    a_cfg = config(gateway=True)
    a_cfg.out = str(tmp_path / "a.jsonl")
    a = Node(tiny_net, a_cfg)
    await a.start()
    b_cfg = config(gateway=True, peers=[("127.0.0.1", a.port)])
    b_cfg.out = str(tmp_path / "b.jsonl")
    b = Node(tiny_net, b_cfg)
    await b.start()
    src = None
    winner, loser = (a, b) if a.id < b.id else (b, a)
    try:
        async with asyncio.timeout(10):
            while loser.is_gateway or winner.gateway_id != winner.id or loser.gateway_id != winner.id:
                await asyncio.sleep(0.01)
        src = Node(tiny_net, config(sources=[21], frames=4, peers=[("127.0.0.1", a.port), ("127.0.0.1", b.port)]))
        await src.start()
        results = await collect(winner, 4)
        await asyncio.sleep(0.3)
    finally:
        for n in (src, a, b):
            if n is not None:
                await n.close()
    assert [r["frame"] for r in results] == [0, 1, 2, 3]
    assert all(r["output_sha256"] == expected_digest(tiny_net, 21, r["frame"]) for r in results)
    assert loser.results.empty() and winner.results.empty()
    lines = (tmp_path / ("a.jsonl" if loser is a else "b.jsonl")).read_text().splitlines()
    assert lines == [], "the node that stepped down released results"


async def test_a_closing_standby_does_not_take_over(tiny_net, tmp_path):
    """Defect: at close(), every connection's teardown ran the election, so a standby that was
    shutting down took over as gateway (and told its peers so) on its way out."""
    gw = Node(tiny_net, config(gateway=True))
    await gw.start()
    c = config(peers=[("127.0.0.1", gw.port)])
    c.standby = True
    standby = Node(tiny_net, c)
    await standby.start()
    try:
        async with asyncio.timeout(10):
            while standby.gateway_id != gw.id:
                await asyncio.sleep(0.01)
        await standby.close()
    finally:
        await gw.close()
    assert standby.stats.takeovers == 0 and not standby.is_gateway


async def test_a_1x1_frame_runs_tile_and_tail_on_one_node(tiny_net):
    """Affinity at 1x1: the node that runs a frame's only tile runs its tail on the fused map
    in hand, so no fused map crosses a link (the gateway queues no tail) and every frame is
    still bit-identical to single-device inference."""
    gw = Node(tiny_net, config(gateway=True, grid=(1, 1), scheme="none"))
    await gw.start()
    thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], grid=(1, 1), scheme="none"))
    await thief.start()
    src = Node(tiny_net, config(sources=[23], frames=6, peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)],
                                grid=(1, 1), scheme="none"))
    await src.start()
    try:
        results = await collect(gw, 6)
    finally:
        for n in (src, thief, gw):
            await n.close()
    assert [r["frame"] for r in results] == list(range(6))
    assert all(r["output_sha256"] == expected_digest(tiny_net, 23, r["frame"]) for r in results)
    nodes = (gw, thief, src)
    assert sum(n.stats.whole_frames for n in nodes) >= 6
    assert all(n.stats.tails_run == n.stats.whole_frames for n in nodes)  # no tail ran on its own


def test_frames_in_flight_follow_the_nodes_known_by_default(tiny_net):
    """--max-inflight auto: every computing node has a task to run and one to fetch meanwhile;
    a fixed 4 kept half of an 8-node shelf idle at 1x1. An explicit count wins."""
    node = Node(tiny_net, config(sources=[1, 2]))
    assert node._inflight_limit() == 2  # alone, two sources: ceil((2 + 2) / 2)
    for i in range(7):
        node.peers[f"peer{i}"] = None  # type: ignore[assignment]  # only counted here
    assert node._inflight_limit() == 9  # 2 x 8 computing nodes + 2, shared by two sources
    node.cfg.max_inflight = 7
    assert node._inflight_limit() == 7
