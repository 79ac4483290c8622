"""The dashboard (``--http``): its JSON API, event stream, frames and token, over real HTTP to
real nodes on 127.0.0.1; the frame previews that cross the wire; and ``annotate``."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import aiohttp
import numpy as np
import pytest
from PIL import Image

from stealer.annotate import COCO_NAMES, annotate, class_names, label
from stealer.config import DEFAULT_LIMITS
from stealer.dashboard import dashboard_token, dashboard_url
from stealer.dashboard.frames import FrameStore, preview_jpeg, render_preview
from stealer.discovery import new_node_id
from stealer.errors import StealerError
from stealer.network import Network, builtin_cfg
from stealer.node import Node, NodeConfig, RuntimeLimits
from stealer.sources import SyntheticSource
from stealer.wire import ClusterKey
from stealer.wire.messages import Preview

pytestmark = pytest.mark.timeout(180)

SECRET = b"dashboard-test-secret-0123456789"

# Timing constants patched down so that reports and previews come often in a short test;
# safe because Limits and RuntimeLimits are frozen objects passed to these nodes only.
FAST = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=1.0, handshake_timeout=2.0,
                              dashboard_report_interval=0.2, preview_interval=0.05)
FAST_RT = RuntimeLimits(lease=5.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)


@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


def config(gateway=False, sources=(), frames=None, peers=(), **kw) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host=kw.pop("host", "127.0.0.1"), gateway=gateway,
                      sources=[SyntheticSource(s) for s in sources], frames=frames, peers=list(peers),
                      discovery=False, grid=(2, 2), layers=9, limits=kw.pop("limits", FAST), runtime=FAST_RT,
                      thresh=kw.pop("thresh", 0.0), **kw)


async def get(url: str, **kw) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, **kw) as resp:
            return resp.status, await resp.read(), dict(resp.headers)


async def sse_events(url: str, wanted: set[str], timeout: float = 30.0) -> dict[str, dict]:
    """Read the event stream until one event of each ``wanted`` kind came; their payloads."""
    got: dict[str, dict] = {}
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            kind = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind is not None:
                    got.setdefault(kind, json.loads(line[6:]))
                    if wanted <= set(got):
                        return got
    return got


async def until(predicate, what: str, timeout: float = 60.0):
    async with asyncio.timeout(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover


# ------------------------------------------------------------------------ annotate, previews

def test_annotate_draws_each_box_where_its_detection_is_scaled_to_the_image():
    black = Image.new("RGB", (200, 100))
    # a box of the 400x200 camera image, drawn on a half-size preview
    det = {"cls": 0, "prob": 0.9, "left": 100, "top": 80, "right": 300, "bottom": 180}
    out = np.asarray(annotate(black, [det], img_w=400, img_h=200))  # the box at (50, 40)-(150, 90)
    assert np.asarray(black).max() == 0  # the input is left as it is
    assert out[40:91, 50].all(axis=1).any() and out[40:91, 50].any(axis=1).all()  # left edge, whole height
    assert out[40:91, 150].any(axis=1).all() and out[90, 50:151].any(axis=1).all()  # right, bottom edges
    assert not out[42:89, 52:149].any()  # inside the box: nothing drawn
    assert out[25:40, 51:100].any()  # the label, above the box
    assert not out[:, 152:].any() and not out[92:, :].any() and not out[:, :49].any()  # nothing outside
    # relative boxes (no pixel box) land on the same place
    rel = {"cls": 0, "prob": 0.9, "x": 0.5, "y": 0.65, "w": 0.5, "h": 0.5}
    assert np.array_equal(np.asarray(annotate(black, [rel])), out)
    # junk is skipped, not drawn, never raised
    assert not np.asarray(annotate(black, [{"cls": 1}, {"left": "x"}, {"x": float("nan"), "y": 0, "w": 1, "h": 1}])).any()


def test_labels_and_class_names():
    assert label(0, 0.876) == "person 0.88"
    assert label(99, 0.5) == "class 99 0.50"
    assert class_names(80) is COCO_NAMES and class_names(20)[14] == "person" and class_names(3) == ()


def test_preview_is_downscaled_and_fits_its_byte_limit():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)  # noise: the worst case for JPEG
    jpeg = preview_jpeg(pixels, 320, 96 * 1024)
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and im.size == (320, 240) and len(jpeg) <= 96 * 1024
    small = preview_jpeg(pixels, 320, 20 * 1024)  # lower quality until it fits
    assert len(small) <= 20 * 1024
    with pytest.raises(StealerError, match="does not fit"):
        preview_jpeg(pixels, 320, 100)
    floats = preview_jpeg(np.full((3, 96, 96), 0.5, np.float32), 320, 96 * 1024)  # a tensor feed
    assert Image.open(io.BytesIO(floats)).size == (96, 96)


def test_render_preview_refuses_what_is_not_a_small_jpeg():
    big = io.BytesIO()
    Image.new("RGB", (2000, 10)).save(big, "JPEG")
    with pytest.raises(StealerError, match="larger than"):
        render_preview(big.getvalue(), [], 2000, 10, 1280)
    with pytest.raises(StealerError, match="not a JPEG"):
        render_preview(b"\x89PNG not at all", [], 10, 10, 1280)


async def test_frame_store_draws_when_both_preview_and_result_are_in_in_either_order():
    store = FrameStore(max_sources=2, max_side=1280)
    jpeg = preview_jpeg(np.zeros((3, 60, 80), np.uint8), 320, 96 * 1024)
    det = {"cls": 2, "prob": 0.5, "left": 10, "top": 10, "right": 50, "bottom": 40}
    seen = []

    async def watch():
        async for f in store.subscribe():
            seen.append((f.source, f.frame))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    store.result({"source": "a/0", "frame": 1, "detections": [det]})
    store.preview("a/0", 1, 80, 60, jpeg)  # result first
    store.preview("b/0", 4, 80, 60, jpeg)  # preview first: waits
    assert store.latest("b/0") is None
    store.result({"source": "b/0", "frame": 4, "detections": []})
    async with asyncio.timeout(10):
        while len(seen) < 2:
            await asyncio.sleep(0.01)
    a = store.latest("a/0")
    assert a is not None and a.frame == 1 and a.detections == 1 and (a.width, a.height) == (80, 60)
    assert np.asarray(Image.open(io.BytesIO(a.jpeg))).max() > 100  # the box is drawn on the black frame
    assert sorted(seen) == [("a/0", 1), ("b/0", 4)]
    store.result({"source": "c/0", "frame": 0, "detections": []})
    store.preview("c/0", 0, 80, 60, jpeg)  # a third source: the least recently updated goes
    async with asyncio.timeout(10):
        while store.latest("c/0") is None:
            await asyncio.sleep(0.01)
    assert [f.source for f in store.sources()] == ["b/0", "c/0"]
    await store.close()
    await asyncio.wait_for(watcher, 5)


def test_token_is_keyed_by_the_secret_and_stable():
    a, b = ClusterKey(SECRET), ClusterKey(SECRET)
    other = ClusterKey(b"another-secret-of-enough-bytes!!")
    assert dashboard_token(a) == dashboard_token(b)
    assert dashboard_token(a) != dashboard_token(other)
    assert len(dashboard_token(a)) == 32 and int(dashboard_token(a), 16) >= 0
    assert dashboard_url("127.0.0.1", 8080, a) == f"http://127.0.0.1:8080/?token={dashboard_token(a)}"
    assert dashboard_url("::1", 8080, None) == "http://[::1]:8080/"


# ------------------------------------------------------------------------ real nodes

async def test_dashboard_api_shows_the_cluster_and_annotated_frames_of_both_kinds_of_source(tiny_net):
    """A gateway with --http and a source of its own, a worker with a source: the remote
    source's previews cross the wire (Preview), the gateway's own need no message."""
    frames = 6
    gw = Node(tiny_net, config(gateway=True, sources=[1], frames=frames, http=("127.0.0.1", 0)))
    src = None
    try:
        await gw.start()
        src = Node(tiny_net, config(sources=[2], frames=frames, peers=[("127.0.0.1", gw.port)]))
        await src.start()
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        async with asyncio.timeout(90):
            for _ in range(2 * frames):
                await gw.results.get()

        status, body, headers = await get(base + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"/static/app.js" in body
        for asset in ("app.js", "style.css"):
            status, body, _ = await get(f"{base}/static/{asset}")
            assert status == 200 and body and b"http://" not in body and b"https://" not in body  # all local
        assert (await get(base + "/static/secrets.txt"))[0] == 404

        async def both_frames():
            state = json.loads((await get(base + "/api/state"))[1])
            return state if len(state["sources"]) == 2 else None

        state = await until(both_frames, "an annotated frame of each source")
        own, remote = f"{gw.id}/0", f"{src.id}/0"
        assert {s["source"] for s in state["sources"]} == {own, remote}
        for s in state["sources"]:
            status, jpeg, headers = await get(base + s["url"])
            assert status == 200 and headers["Content-Type"] == "image/jpeg"
            im = Image.open(io.BytesIO(jpeg))
            assert im.format == "JPEG" and im.size == (s["width"], s["height"]) and max(im.size) <= 320
            assert 0 <= s["frame"] < frames
        assert (await get(base + "/api/frame/nobody/0.jpg"))[0] == 404

        async def reported():
            state = json.loads((await get(base + "/api/state"))[1])
            peer = next(n for n in state["nodes"] if not n["self"])
            return state if peer["tasks"] is not None and peer["seen"] is not None else None

        state = await until(reported, "the worker's counters at the gateway")
        me, peer = state["nodes"]
        assert me["id"] == gw.id and me["role"] == "gateway" and me["self"] and me["cores"] == 1
        assert peer["id"] == src.id and peer["role"] == "worker" and peer["cores"] == 1
        assert 0 <= me["busy"] <= 1 and 0 <= peer["busy"] <= 1
        assert me["tasks"] == gw.stats.tiles_run + gw.stats.tails_run
        assert peer["tasks"] <= src.stats.tiles_run + src.stats.tails_run
        assert me["tasks"] + src.stats.tiles_run + src.stats.tails_run >= 2 * frames * 5  # 4 tiles + a tail each
        assert state["totals"]["frames"] == 2 * frames
        assert state["plan"]["grid"] == "2x2" and state["plan"]["layers"] == 9 and state["plan"]["scheme"] == "quad"
        assert "stolen by" in state["plan"]["tail"]
        assert any(e["event"] == "peer-joined" and e["peer"] == src.id for e in state["events"])
        released = [s for s in state["series"] if s["fps"] > 0]
        assert released and all(s["p99"] >= s["p50"] > 0 for s in released)
        assert len(state["series"]) <= FAST.dashboard_history
        # the link's bytes at both ends: what the gateway received is what the worker sent
        assert gw._link_bytes()[0] > 0 and src._link_bytes()[1] > 0

        # the event stream: the whole state first, then updates with the newest sample
        got = await sse_events(base + "/api/events", {"state", "update"})
        assert got["state"]["node"]["id"] == gw.id and "series" in got["state"]
        assert "series" not in got["update"] and got["update"]["sample"]["t"] > 0
        assert gw.dashboard.updates_sent >= 1 and gw.dashboard.update_bytes > 0

        # a preview of a source that is not the sender's is refused
        stranger = Preview(f"{new_node_id()}/0", 0, 96, 96, np.frombuffer(b"\xff\xd8", np.uint8))
        gw._on_preview(gw.peers[src.id], stranger)
        assert gw.dashboard.frames.latest(stranger.source) is None
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()


async def test_a_frame_event_comes_when_a_new_annotated_frame_is_drawn(tiny_net):
    gw = Node(tiny_net, config(gateway=True, http=("127.0.0.1", 0)))
    src = None
    try:
        await gw.start()
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        stream = asyncio.create_task(sse_events(base + "/api/events", {"state", "frame"}, timeout=90))
        await until(lambda: asyncio.sleep(0, gw.dashboard._clients), "the stream to open")
        src = Node(tiny_net, config(sources=[5], frames=4, peers=[("127.0.0.1", gw.port)]))
        await src.start()
        got = await stream
        assert got["frame"]["source"] == f"{src.id}/0" and got["frame"]["url"].endswith(".jpg")
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()


async def test_no_previews_are_made_when_no_dashboard_watches(tiny_net):
    gw = Node(tiny_net, config(gateway=True, metrics=None))
    src = None
    try:
        await gw.start()
        src = Node(tiny_net, config(sources=[3], frames=4, peers=[("127.0.0.1", gw.port)]))
        await src.start()
        async with asyncio.timeout(90):
            for _ in range(4):
                await gw.results.get()
        assert gw.dashboard is None and not src._preview_sent and not src._preview_wait
        assert not gw.peers[src.id].status.watching
        assert src.peers[gw.id].status is not None and not src.peers[gw.id].status.watching
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()


async def test_with_a_secret_it_binds_localhost_and_needs_the_token(tiny_net):
    gw = Node(tiny_net, config(gateway=True, http=(None, 0), secret=SECRET, host="0.0.0.0"))
    try:
        await gw.start()
        assert gw.dashboard.host == "127.0.0.1"
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        token = dashboard_token(ClusterKey(SECRET))
        for path in ("/", "/api/state", "/api/events", "/api/frame/x/0.jpg"):
            assert (await get(base + path))[0] == 403, path
            assert (await get(f"{base}{path}?token={'0' * 32}"))[0] == 403, path
        status, body, _ = await get(f"{base}/api/state?token={token}")
        assert status == 200 and json.loads(body)["node"]["id"] == gw.id
        assert (await get(base + "/api/state", headers={"X-Stealer-Token": token}))[0] == 200
        assert (await get(f"{base}/?token={token}"))[0] == 200
        assert (await get(base + "/static/app.js"))[0] == 200  # the script holds no data
    finally:
        await gw.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_same_port_as_metrics_serves_both(tiny_net):
    port = free_port()
    node = Node(tiny_net, config(gateway=True, http=("127.0.0.1", port), metrics=("127.0.0.1", port)))
    try:
        await node.start()
        assert node.dashboard.port == port and node.metrics is not None and node.metrics.port == 0
        status, body, _ = await get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"stealer_node_info" in body
        assert (await get(f"http://127.0.0.1:{port}/api/state"))[0] == 200
    finally:
        await node.close()
