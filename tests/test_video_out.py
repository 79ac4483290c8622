"""Annotated video outputs at the gateway: ``--video-out`` files read back with OpenCV,
``--mjpeg`` streams read by a real HTTP client, over real nodes on 127.0.0.1; which previews
the gateway asks for; a slow stream client that loses frames instead of growing memory."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

from stealer.config import DEFAULT_LIMITS
from stealer.dashboard import dashboard_token
from stealer.dashboard.frames import AnnotatedFrame, FrameStore, preview_wants
from stealer.discovery import new_node_id
from stealer.errors import ConfigError
from stealer.network import Network, builtin_cfg
from stealer.node import Node, NodeConfig, RuntimeLimits
from stealer.outputs.mjpeg import BOUNDARY, CLIENT_BACKLOG, start_mjpeg
from stealer.outputs.video import VideoConfig, VideoOut, fourcc_for, video_path
from stealer.sources import SyntheticSource
from stealer.wire import ClusterKey

pytestmark = pytest.mark.timeout(120)

SECRET = b"video-test-secret-0123456789abcd"

# Timing constants patched down so that a short test sees its frames; safe because Limits
# and RuntimeLimits are frozen objects passed to these nodes only.
FAST = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=1.0, handshake_timeout=2.0,
                              dashboard_report_interval=0.2, video_flush_timeout=10.0)
FAST_RT = RuntimeLimits(lease=5.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)


@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


def config(gateway=False, sources=(), frames=None, peers=(), **kw) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=gateway,
                      sources=[SyntheticSource(s) for s in sources], frames=frames, peers=list(peers),
                      discovery=False, grid=(2, 2), layers=9, limits=kw.pop("limits", FAST), runtime=FAST_RT,
                      thresh=0.0, **kw)


async def read_parts(url: str, count: int, timeout: float = 60.0) -> tuple[dict, list[tuple[dict, bytes]]]:
    """The response headers and the first ``count`` parts (headers, body) of an MJPEG stream."""
    parts = []
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200, await resp.text()
            while len(parts) < count:
                line = await resp.content.readline()
                if not line.strip():
                    continue  # the CRLF after a part
                assert line == f"--{BOUNDARY}\r\n".encode(), line
                headers = {}
                while (line := await resp.content.readline()) != b"\r\n":
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await resp.content.readexactly(int(headers["content-length"]))
                parts.append((headers, body))
            return dict(resp.headers), parts


def jpeg_size(body: bytes) -> tuple[int, int]:
    im = Image.open(io.BytesIO(body))
    assert im.format == "JPEG"
    im.load()
    return im.size


# ------------------------------------------------------------------------ without nodes

def test_the_gateway_asks_for_what_its_most_demanding_output_needs(tmp_path):
    lim = DEFAULT_LIMITS
    video = VideoConfig(str(tmp_path / "v.avi"), side=960)
    base = config(gateway=True)
    assert preview_wants(base) is None
    base.http = ("127.0.0.1", 0)
    assert preview_wants(base) == (lim.preview_side, lim.preview_interval)  # the dashboard: 320 px, 2/s
    base.mjpeg = ("127.0.0.1", 0)
    assert preview_wants(base) == (lim.mjpeg_side, lim.mjpeg_interval)  # bigger and faster
    base.video = video
    assert preview_wants(base) == (960, 0.0)  # every frame
    worker = config(mjpeg=("127.0.0.1", 0), video=video)
    assert preview_wants(worker) is None  # only a node that may be the gateway has results to draw
    assert lim.preview_bytes(lim.preview_side) == lim.preview_max_bytes
    assert lim.preview_bytes(4 * lim.preview_side) == 16 * lim.preview_max_bytes  # by area


def test_video_paths_codecs_and_bad_settings(tmp_path):
    assert video_path("out/{source}.avi", "ab12/0", first=True) == "out/ab12-0.avi"
    assert video_path("out/shelf.mp4", "ab12/0", first=True) == "out/shelf.mp4"
    assert video_path("out/shelf.mp4", "cd34/1", first=False) == "out/shelf-cd34-1.mp4"
    assert fourcc_for("a.AVI") == "MJPG" and fourcc_for("b.mp4") == "mp4v"
    with pytest.raises(ConfigError, match=r"\.avi .*or \.mp4"):
        VideoConfig(str(tmp_path / "v.mkv"))
    with pytest.raises(ConfigError, match="no directory"):
        VideoConfig(str(tmp_path / "missing" / "v.avi"))
    with pytest.raises(ConfigError, match="--video-side"):
        VideoConfig(str(tmp_path / "v.avi"), side=5000)


def test_without_opencv_video_out_fails_at_start_up_naming_the_extra(tmp_path):
    # a real `stealer node` process in which OpenCV cannot be imported
    code = ("import sys; sys.modules['cv2'] = None\n"
            "from stealer.cli import main\n"
            f"sys.exit(main(['node', '--gateway', '--random-weights', '1', '--video-out', {str(tmp_path / 'v.avi')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "camera extra" in proc.stderr and "opencv-python-headless" in proc.stderr
    assert "Traceback" not in proc.stderr


def frame_of(source: str, number: int, at: float, size=(64, 48), shade=0) -> AnnotatedFrame:
    buf = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, 128)).save(buf, "JPEG")
    return AnnotatedFrame(source, number, buf.getvalue(), size[0], size[1], 0, at)


@pytest.mark.parametrize("ext", [".avi", ".mp4"])
async def test_video_out_measures_the_rate_keeps_order_and_one_file_per_source(tmp_path, ext):
    cv2 = pytest.importorskip("cv2", reason="--video-out needs OpenCV (the camera extra)")
    out = VideoOut(VideoConfig(str(tmp_path / f"shelf{ext}")), DEFAULT_LIMITS)
    out.start()
    for n in range(10):  # 4 frames/s by their drawing times; source b: 3 frames, one late
        out.add(frame_of("a/0", n, 100.0 + n / 4, shade=20 * n))
    for n in (0, 2, 1, 3):
        out.add(frame_of("b/1", n, 50.0 + n, size=(33, 20)))
    await out.close()
    await out.close()  # safe twice
    assert out.files == {"a/0": str(tmp_path / f"shelf{ext}"), "b/1": str(tmp_path / f"shelf-b-1{ext}")}
    assert out.written == 13 and out.dropped == 1  # frame 1 of b/1 came after 2
    cap = cv2.VideoCapture(out.files["a/0"])
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(4.0, abs=0.01)
    greens = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (48, 64, 3)
        greens.append(int(img[..., 1].mean()))
    assert len(greens) == 10 and greens == sorted(greens, reverse=True)  # in frame order
    cap = cv2.VideoCapture(out.files["b/1"])
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (32, 20)  # even
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3


async def test_a_slow_stream_client_loses_frames_not_memory():
    store = FrameStore(4, 1280)
    server = await start_mjpeg(store, DEFAULT_LIMITS, None, "127.0.0.1", 0)
    small = io.BytesIO()
    Image.new("RGB", (64, 48)).save(small, "JPEG")
    store.result({"source": "x/0", "frame": 0, "detections": []})
    store.preview("x/0", 0, 64, 48, small.getvalue())
    async with asyncio.timeout(10):
        while store.latest("x/0") is None:
            await asyncio.sleep(0.01)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /x/0 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        async with asyncio.timeout(10):
            while not server.sent:
                await asyncio.sleep(0.01)
        big = os.urandom(1 << 20)  # 1 MiB "JPEGs" (the streams do not decode them)
        pushed = 40  # 40 MiB: far more than the sockets' buffers
        for n in range(1, pushed + 1):
            server._on_frame(AnnotatedFrame("x/0", n, big, 1280, 960, 0, time.time()))
            (client,) = server._clients
            assert client.queue.qsize() <= CLIENT_BACKLOG
            await asyncio.sleep(0.005)
        assert server.dropped >= pushed // 2
        # each frame was written, dropped, is waiting, or (at most one) is being written
        assert pushed - 1 <= server.sent - 1 + server.dropped + client.queue.qsize() <= pushed
    finally:
        sock.close()
        await server.close()
        await store.close()


# ------------------------------------------------------------------------ real nodes

async def test_a_cluster_writes_the_video_and_serves_the_streams(tiny_net, tmp_path):
    """A gateway with --video-out and --mjpeg, a worker with a source: previews of every
    frame cross the wire at the frame's size (96 px < --video-side), the file holds every
    frame, the stream gives JPEGs to a real HTTP client."""
    cv2 = pytest.importorskip("cv2", reason="--video-out needs OpenCV (the camera extra)")
    frames = 6
    path = tmp_path / "shelf.avi"
    gw = Node(tiny_net, config(gateway=True, video=VideoConfig(str(path), fps=5.0), mjpeg=("127.0.0.1", 0)))
    src = None
    try:
        await gw.start()
        base = f"http://127.0.0.1:{gw.mjpeg.port}"
        stream = asyncio.create_task(read_parts(base + "/", 2))  # before any frame: the first source's
        async with asyncio.timeout(10):
            while not gw.mjpeg._clients:
                await asyncio.sleep(0.01)
        src = Node(tiny_net, config(sources=[4], frames=frames, peers=[("127.0.0.1", gw.port)]))
        await src.start()
        async with asyncio.timeout(60):
            for _ in range(frames):
                await gw.results.get()
        source = f"{src.id}/0"
        headers, parts = await stream
        assert headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        numbers = [int(h["x-frame"]) for h, _ in parts]
        assert all(h["x-source"] == source and h["content-type"] == "image/jpeg" for h, _ in parts)
        assert numbers == sorted(numbers) and len(set(numbers)) == 2
        assert all(jpeg_size(body) == (96, 96) for _, body in parts)
        _, named = await read_parts(f"{base}/{source}", 1)  # a source by name: its latest at once
        assert jpeg_size(named[0][1]) == (96, 96)
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/sources") as resp:
                listing = json.loads(await resp.read())
            async with session.get(base + "/nobody/0") as resp:
                assert resp.status == 404
        assert listing["sources"][0]["source"] == source and listing["sources"][0]["path"] == f"/{source}"
        peer_status = src.peers[gw.id].status
        assert peer_status.preview_side == 1280 and peer_status.preview_interval == 0.0

        assert await gw.drain(30)  # the last previews reach the file
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
    assert gw.video.written == frames and gw.video.dropped == 0 and gw.frames.dropped == 0
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    count = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (96, 96, 3)
        count += 1
    assert count == frames


async def test_with_a_secret_the_streams_bind_localhost_and_need_the_token(tiny_net):
    gw = Node(tiny_net, config(gateway=True, mjpeg=(None, 0), secret=SECRET))
    try:
        await gw.start()
        assert gw.mjpeg.host == "127.0.0.1"
        base = f"http://127.0.0.1:{gw.mjpeg.port}"
        token = dashboard_token(ClusterKey(SECRET))
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/sources", "/x/0", f"/?token={'0' * 32}"):
                async with session.get(base + path) as resp:
                    assert resp.status == 403, path
            async with session.get(f"{base}/sources?token={token}") as resp:
                assert resp.status == 200 and json.loads(await resp.read()) == {"sources": []}
            async with session.get(base + "/x/0", headers={"X-Stealer-Token": token}) as resp:
                assert resp.status == 404  # past the token: no such source yet
    finally:
        await gw.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_dashboard_port_serves_the_streams_under_mjpeg(tiny_net):
    port = free_port()
    gw = Node(tiny_net, config(gateway=True, http=("127.0.0.1", port), mjpeg=("127.0.0.1", port)))
    try:
        await gw.start()
        assert gw.mjpeg.port == 0 and gw.dashboard.port == port
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/mjpeg/sources") as resp:
                assert resp.status == 200 and json.loads(await resp.read()) == {"sources": []}
            async with session.get(f"http://127.0.0.1:{port}/api/state") as resp:
                assert resp.status == 200
        assert gw.frames.side == DEFAULT_LIMITS.mjpeg_side and gw.frames.interval == DEFAULT_LIMITS.mjpeg_interval
    finally:
        await gw.close()


def test_stealer_run_passes_the_output_options_to_its_gateway(tmp_path):
    from stealer.cli import build_parser
    from stealer.launcher import gateway_outputs_argv

    parser = build_parser()
    video = str(tmp_path / "{source}.avi")
    given = ["--http", ":8080", "--metrics", "[::1]:9100", "--mjpeg", "0.0.0.0:8081", "--video-out", video,
             "--video-side", "640", "--mqtt", "broker.local:1884", "--mqtt-topic", "t/{source}", "--mqtt-qos", "0",
             "--mqtt-username", "u", "--mqtt-tls"]
    run = parser.parse_args(["run", *given])
    node = parser.parse_args(["node", "--gateway", *gateway_outputs_argv(run)])
    for dest in ("http", "metrics", "mjpeg", "video_out", "video_side", "mqtt", "mqtt_topic", "mqtt_qos",
                 "mqtt_username", "mqtt_tls", "mqtt_client_id", "mqtt_password_file", "mqtt_ca"):
        assert getattr(node, dest) == getattr(run, dest), dest
    assert node.http == (None, 8080) and node.metrics == ("::1", 9100) and node.mqtt == ("broker.local", 1884)
    assert gateway_outputs_argv(parser.parse_args(["run"])) == []
