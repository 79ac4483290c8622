"""``--mqtt``: results of a real small cluster published to a real broker (Debian's mosquitto,
started here on a free 127.0.0.1 port) and read by a real paho subscriber: every result, in
order, the same bytes as the ``--out`` line; a broker that is down at start-up and one
killed mid-run; the option parsing.

The broker tests skip, saying why, only when no mosquitto binary exists or it cannot be
started (``apt-get install mosquitto``).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from stealer.config import DEFAULT_LIMITS
from stealer.discovery import new_node_id
from stealer.errors import ConfigError
from stealer.network import Network, builtin_cfg
from stealer.node import Node, NodeConfig, RuntimeLimits
from stealer.outputs.mqtt import (DEFAULT_TOPIC, MqttConfig, add_mqtt_args, mqtt_config_from_args, parse_broker,
                                  topic_for)
from stealer.sources import SyntheticSource

paho = pytest.importorskip("paho.mqtt.client")

pytestmark = pytest.mark.timeout(180)

# Timing constants patched down (a lost peer noticed quickly, the broker retried every 0.1-0.5
# s instead of 1-30 s); safe because Limits and RuntimeLimits are frozen objects passed to
# these nodes only.
FAST = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=1.0, handshake_timeout=2.0,
                              mqtt_reconnect_min=0.1, mqtt_reconnect_max=0.5, mqtt_flush_timeout=5.0)
FAST_RT = RuntimeLimits(lease=5.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)
WAIT = 90.0  # seconds any awaited condition may take on a loaded 2-core CI machine


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto on 127.0.0.1:``port`` with persistence in ``workdir`` (saved at every
    change, so a subscriber's persistent session survives a SIGKILL and a restart)."""

    def __init__(self, exe: str, workdir: Path, extra: str = "allow_anonymous true\n") -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "mosquitto.log"
        self.conf = workdir / "mosquitto.conf"
        user = f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user who cannot write here
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{extra}persistence true\n"
                             f"persistence_location {workdir}/\nautosave_interval 1\nautosave_on_changes true\n"
                             f"log_dest stderr\n{user}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it accepts connections. Raises RuntimeError if it exits."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} in 20 s: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path):
    """A started broker; skips (with the reason) where none can be run."""
    exe = mosquitto_binary()
    if exe is None:
        pytest.skip("no mosquitto binary (apt-get install mosquitto)")
    b = Broker(exe, tmp_path)
    try:
        b.start()
    except (RuntimeError, OSError) as e:
        b.stop(signal.SIGKILL)
        pytest.skip(f"mosquitto cannot be started: {e}")
    yield b
    b.stop(signal.SIGKILL)


class Subscriber:
    """A paho client on its own thread with a persistent session (QoS 1), subscribed to every
    result topic: what a broker queues for it while it is away reaches it when it is back."""

    def __init__(self, port: int, client_id: str, topic: str = "stealer/results/#") -> None:
        self.messages: list[tuple[str, bytes]] = []  # appended in paho's thread (list.append is atomic)
        self.subscribed = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        c.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        c.on_connect = lambda client, u, f, rc, p: client.subscribe(topic, qos=1)
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = lambda client, u, m: self.messages.append((m.topic, m.payload))
        c.connect_async("127.0.0.1", port)
        c.loop_start()
        self.client = c
        if not self.subscribed.wait(30):
            raise AssertionError("the test's subscriber could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def results(self) -> list[bytes]:
        """Payloads in arrival order, each (source, frame) once (QoS 1 may repeat one after a
        reconnect)."""
        seen, out = set(), []
        for _, payload in self.messages:
            key = (json.loads(payload)["source"], json.loads(payload)["frame"])
            if key not in seen:
                seen.add(key)
                out.append(payload)
        return out


@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


def config(gateway=False, sources=(), frames=None, peers=(), limits=FAST, **kw) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=gateway,
                      sources=[SyntheticSource(s) for s in sources], frames=frames, peers=list(peers),
                      discovery=False, grid=(3, 3), layers=9, limits=limits, runtime=FAST_RT, **kw)


async def until(what: str, cond: Callable[[], Any], timeout: float = WAIT) -> None:
    """Wait for a real condition, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not seen in {timeout} s")
        await asyncio.sleep(0.02)


async def cluster(tiny_net: Network, gw_cfg: NodeConfig, frames: int, **src_kw: Any) -> tuple[Node, Node]:
    gw = Node(tiny_net, gw_cfg)
    await gw.start()
    src = Node(tiny_net, config(sources=[3], frames=frames, peers=[("127.0.0.1", gw.port)], **src_kw))
    await src.start()
    return gw, src


async def released(gw: Node, frames: int) -> list[dict]:
    out = []
    async with asyncio.timeout(WAIT):
        while len(out) < frames:
            out.append(await gw.results.get())
    return out


async def test_every_result_reaches_a_subscriber_in_order_as_its_out_line(tiny_net, broker, tmp_path):
    frames = 6
    sub = await asyncio.to_thread(Subscriber, broker.port, "t-live", "shelf/#")
    out = tmp_path / "results.jsonl"
    mqtt = MqttConfig("127.0.0.1", broker.port, topic="shelf/{source}/detections")
    gw = src = None
    try:
        gw, src = await cluster(tiny_net, config(gateway=True, out=str(out), mqtt=mqtt, metrics=("127.0.0.1", 0)),
                                frames)
        await released(gw, frames)
        assert gw.mqtt is not None
        await until("every result confirmed by the broker", lambda: gw.mqtt.stats.published == frames)
        await until("every result at the subscriber", lambda: len(sub.messages) >= frames)
        from tests.test_metrics import samples, scrape

        got = samples(await scrape(gw.metrics.port))
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
        await asyncio.to_thread(sub.close)
    lines = out.read_text().splitlines()
    assert len(lines) == frames
    # the same bytes as the --out lines, in the same (release) order, none twice on a steady link
    assert [payload for _, payload in sub.messages] == [line.encode() for line in lines]
    assert [topic for topic, _ in sub.messages] == [f"shelf/{json.loads(line)['source']}/detections"
                                                    for line in lines]
    assert [json.loads(line)["frame"] for line in lines] == list(range(frames))
    stats = gw.mqtt.stats
    assert (stats.published, stats.dropped, stats.connects, stats.disconnects) == (frames, 0, 1, 0)
    assert got[("stealer_mqtt_published_total", ())] == frames and got[("stealer_mqtt_dropped_total", ())] == 0
    assert got[("stealer_mqtt_connected", ())] == 1 and got[("stealer_mqtt_queued", ())] == 0
    assert src.mqtt is None  # only the gateway (or a standby) publishes


async def test_broker_down_at_start_is_retried_and_an_overflow_drops_the_oldest_counted(
        tiny_net, broker, tmp_path, caplog):
    """The gateway starts with the broker down: it runs anyway; results wait in a queue of
    mqtt_queue (3 here), the oldest dropped past it and counted; once the broker is up, the
    waiting ones reach the subscriber (whose persistent session the broker kept)."""
    frames, queue = 5, 3
    sub = await asyncio.to_thread(Subscriber, broker.port, "t-late")
    await asyncio.to_thread(broker.stop)  # SIGTERM: the broker saves the subscriber's session
    out = tmp_path / "results.jsonl"
    limits = FAST.replace(mqtt_queue=queue)
    gw = src = None
    try:
        gw, src = await cluster(tiny_net, config(gateway=True, out=str(out), limits=limits,
                                                 mqtt=MqttConfig("127.0.0.1", broker.port)), frames)
        await released(gw, frames)
        assert gw.mqtt is not None
        stats = gw.mqtt.stats
        assert not gw.mqtt.connected and stats.connects == 0
        assert (stats.published, stats.dropped, gw.mqtt.queued) == (0, frames - queue, queue)
        assert "cannot reach the MQTT broker at 127.0.0.1:" in caplog.text
        assert "dropping the oldest" in caplog.text
        await asyncio.to_thread(broker.start)
        await until("the waiting results confirmed", lambda: stats.published == queue)
        await until("the waiting results at the subscriber", lambda: len(sub.results()) == queue)
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
        await asyncio.to_thread(sub.close)
    lines = out.read_text().splitlines()
    assert sub.results() == [line.encode() for line in lines[frames - queue:]]
    assert [t for t, _ in sub.messages] == [f"stealer/results/{json.loads(l)['source']}" for l in lines[frames - queue:]]
    assert (stats.published, stats.dropped, stats.connects) == (queue, frames - queue, 1)


async def test_broker_killed_mid_run_and_restarted_loses_nothing_the_gateway_holds(tiny_net, broker, tmp_path):
    """SIGKILL the broker after a few results, let the gateway release more while it is
    gone, restart it: every result reaches the subscriber, in order (QoS 1: maybe twice)."""
    frames = 12
    sub = await asyncio.to_thread(Subscriber, broker.port, "t-kill")
    out = tmp_path / "results.jsonl"
    gw = src = None
    try:
        # paced (4 frames/s), so the broker is killed between two results, not while one is
        # between its acknowledgement and its delivery (a killed broker's own loss)
        gw, src = await cluster(tiny_net, config(gateway=True, out=str(out), mqtt=MqttConfig("127.0.0.1", broker.port)),
                                frames, fps=4.0)
        await until("3 results at the subscriber", lambda: len(sub.messages) >= 3)
        await asyncio.to_thread(broker.stop, signal.SIGKILL)
        gone_at = gw.stats.frames_done
        assert gw.mqtt is not None
        await until("2 results released while the broker is gone", lambda: gw.stats.frames_done >= gone_at + 2)
        await until("the gateway saw the broker go", lambda: gw.mqtt.stats.disconnects == 1)
        assert gw.mqtt.queued >= 2  # waiting, not lost
        await asyncio.to_thread(broker.start)
        await released(gw, frames)
        await until("every result confirmed", lambda: gw.mqtt.stats.published == frames)
        await until("every result at the subscriber", lambda: len(sub.results()) == frames)
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
        await asyncio.to_thread(sub.close)
    lines = out.read_text().splitlines()
    assert sub.results() == [line.encode() for line in lines]
    stats = gw.mqtt.stats
    assert stats.dropped == 0 and stats.connects == 2 and stats.disconnects == 1


async def test_a_broker_that_cannot_be_reached_at_shutdown_counts_what_is_left(tiny_net):
    """No broker at all: the gateway runs, and at close every result it released is counted
    dropped (none vanishes unaccounted)."""
    frames = 3
    port = free_port()  # nothing listens there
    gw = src = None
    try:
        gw, src = await cluster(tiny_net, config(gateway=True, mqtt=MqttConfig("127.0.0.1", port)), frames)
        await released(gw, frames)
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
    assert gw.mqtt is not None and gw.mqtt.queued == 0
    assert (gw.mqtt.stats.published, gw.mqtt.stats.dropped) == (0, frames)


def parse(*argv: str, environ: dict[str, str] | None = None) -> MqttConfig | None:
    p = argparse.ArgumentParser()
    add_mqtt_args(p)
    return mqtt_config_from_args(p.parse_args(list(argv)), environ=environ or {})


def test_options_topics_and_credentials(tmp_path):
    assert parse() is None
    assert parse("--mqtt", "broker.lan") == MqttConfig("broker.lan", 1883, DEFAULT_TOPIC, 1)
    assert parse("--mqtt", "10.0.0.2:1884", "--mqtt-qos", "0").port == 1884
    assert parse("--mqtt", "[::1]:1885").host == "::1"
    assert parse("--mqtt", "b", "--mqtt-tls").port == 8883
    for bad in ("", ":1883", "b:0", "b:x", "[::1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_broker(bad)
    with pytest.raises(ConfigError, match="needs --mqtt"):
        parse("--mqtt-topic", "x/{source}")
    with pytest.raises(ConfigError, match="wildcards"):
        parse("--mqtt", "b", "--mqtt-topic", "stealer/#")
    with pytest.raises(ConfigError, match="needs --mqtt-username"):
        parse("--mqtt", "b", environ={"STEALER_MQTT_PASSWORD": "pw"})
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = parse("--mqtt", "b", "--mqtt-username", "cam", "--mqtt-password-file", str(pw))
    assert cfg is not None and cfg.username == "cam" and cfg.password == "s3cret"
    assert "s3cret" not in repr(cfg)
    cfg = parse("--mqtt", "b", "--mqtt-username", "cam", environ={"STEALER_MQTT_PASSWORD": "envpw"})
    assert cfg is not None and cfg.password == "envpw"
    with pytest.raises(ConfigError, match="cannot read"):
        parse("--mqtt", "b", "--mqtt-username", "u", "--mqtt-password-file", str(tmp_path / "missing"))
    # a source id is NODE/INDEX: one subtopic per node; characters a topic may not carry go
    assert topic_for(DEFAULT_TOPIC, "ab12/0") == "stealer/results/ab12/0"
    assert topic_for("t/{source}", "a+b#c") == "t/a_b_c"
    assert topic_for("all", "ab12/0") == "all"


async def test_credentials_from_a_file_are_used_and_a_refusal_is_counted(tiny_net, tmp_path, caplog):
    """A broker that needs a user name and password: the right ones publish, a wrong password
    is refused (logged, counted, retried), never fatal."""
    exe, passwd = mosquitto_binary(), shutil.which("mosquitto_passwd")
    if exe is None or passwd is None:
        pytest.skip("no mosquitto / mosquitto_passwd binary (apt-get install mosquitto)")
    pwfile = tmp_path / "passwd"
    subprocess.run([passwd, "-b", "-c", str(pwfile), "cam", "right horse"], check=True, capture_output=True)
    b = Broker(exe, tmp_path, extra=f"allow_anonymous false\npassword_file {pwfile}\n")
    try:
        b.start()
    except (RuntimeError, OSError) as e:
        b.stop(signal.SIGKILL)
        pytest.skip(f"mosquitto cannot be started: {e}")
    gws: list[Node] = []
    src = None
    try:
        good = Node(tiny_net, config(gateway=True, mqtt=MqttConfig("127.0.0.1", b.port, username="cam",
                                                                   password="right horse")))
        bad = Node(tiny_net, config(mqtt=MqttConfig("127.0.0.1", b.port, username="cam", password="wrong"),
                                    standby=True))
        for n in (good, bad):
            await n.start()
            gws.append(n)
        src = Node(tiny_net, config(sources=[3], frames=2, peers=[("127.0.0.1", good.port)]))
        await src.start()
        await released(good, 2)
        await until("both results confirmed", lambda: good.mqtt.stats.published == 2)
        await until("the wrong password refused twice", lambda: bad.mqtt.stats.refused >= 2)
        assert bad.mqtt.stats.connects == 0 and not bad.mqtt.connected
    finally:
        for n in [src, *gws]:
            if n is not None:
                await n.close()
        b.stop(signal.SIGKILL)
    assert "refused the connection: Not authorized" in caplog.text
    assert caplog.text.count("refused the connection") == 1  # once, not at every retry
    assert "wrong" not in caplog.text and "right horse" not in caplog.text
