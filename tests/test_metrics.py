"""Prometheus metrics of real nodes (``--metrics``), scraped over real HTTP and parsed with the
reference parser, and ``stealer status`` against them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stealer.config import DEFAULT_LIMITS
from stealer.discovery import new_node_id
from stealer.errors import ConfigError
from stealer.metrics import histogram_quantile, metrics_address_arg, metrics_host
from stealer.network import Network, builtin_cfg
from stealer.node import Node, NodeConfig, RuntimeLimits, Stats
from stealer.sources import SyntheticSource

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]

# Timing constants patched down so a lost peer is noticed quickly; safe because Limits and
# RuntimeLimits are frozen objects passed to these nodes only.
FAST = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=1.0, handshake_timeout=2.0)
FAST_RT = RuntimeLimits(lease=5.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)


@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


def config(gateway=False, sources=(), frames=None, peers=(), **kw) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=gateway,
                      sources=[SyntheticSource(s) for s in sources], frames=frames, peers=list(peers),
                      discovery=False, grid=(3, 3), layers=9, limits=FAST, runtime=FAST_RT,
                      metrics=kw.pop("metrics", ("127.0.0.1", 0)), **kw)


def cli_env() -> dict[str, str]:
    """A ``python -m stealer`` child runs this checkout's package (the installed one may be
    another worktree's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the Prometheus text format."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()


def test_metrics_address_and_where_it_binds():
    assert metrics_address_arg(":9100") == (None, 9100)
    assert metrics_address_arg("9100") == (None, 9100)
    assert metrics_address_arg("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert metrics_address_arg("[::1]:9100") == ("::1", 9100)
    for bad in ("host:", "host:http", ":70000", ""):
        with pytest.raises(Exception, match="HOST:PORT"):
            metrics_address_arg(bad)
    # a cluster with a secret keeps /metrics (no authentication) on loopback unless told
    assert metrics_host(None, "0.0.0.0", has_secret=True) == "127.0.0.1"
    assert metrics_host("0.0.0.0", "0.0.0.0", has_secret=True) == "0.0.0.0"
    assert metrics_host(None, "0.0.0.0", has_secret=False) == "0.0.0.0"
    assert metrics_host(None, "10.0.0.5", has_secret=False) == "10.0.0.5"


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.99)
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0  # beyond the last bound


async def test_scraped_counters_are_the_nodes_stats_and_the_histogram_counts_released_frames(tiny_net):
    frames = 5
    gw = Node(tiny_net, config(gateway=True, speculate=False))
    src = None
    results = []
    try:
        await gw.start()
        src = Node(tiny_net, config(sources=[3], frames=frames, peers=[("127.0.0.1", gw.port)], speculate=False))
        await src.start()
        async with asyncio.timeout(90):
            while len(results) < frames:
                results.append(await gw.results.get())
        # every frame released and every task in hand delivered: the counters stand still
        assert await src.drain(30) and await gw.drain(30)
        texts = {node.id: await scrape(node.metrics.port) for node in (gw, src)}
        for node in (gw, src):
            got = samples(texts[node.id])
            for f in dataclasses.fields(Stats):
                assert got[(f"stealer_{f.name}_total", ())] == getattr(node.stats, f.name), f.name
            info = next(dict(labels) for (name, labels) in got if name == "stealer_node_info")
            assert info["node_id"] == node.id and info["role"] == node.role
            assert info["model_hash"] == tiny_net.model_hash and info["plan"] == "3x3:9:quad"
            assert got[("stealer_peers", ())] == 1
            assert got[("stealer_queued_tasks", (("kind", "tile"),))] == 0
            assert got[("stealer_frames_in_flight", ())] == 0
            assert 0 <= got[("stealer_busy_fraction", ())] <= 1
            assert got[("stealer_server_accepted_total", ())] == node._server.stats.accepted
            assert ("process_resident_memory_bytes", ()) in got
            # tasks: one observation per task run here (a 1x1 frame's tile and tail are one)
            counts = {k: got.get(("stealer_task_seconds_count", (("kind", k),)), 0) for k in ("tile", "tail", "whole")}
            assert counts["tile"] + counts["tail"] + 2 * counts["whole"] == node.stats.tiles_run + node.stats.tails_run
            assert sum(got.get(("stealer_task_seconds_sum", (("kind", k),)), 0) for k in counts) == \
                pytest.approx(node.stats.busy_seconds)
            # bytes: per peer (one here), and the node's total is their sum (no peer has left)
            (other,) = node.peers
            peer_in = got[("stealer_peer_bytes_received_total", (("peer", other[:8]),))]
            peer_out = got[("stealer_peer_bytes_sent_total", (("peer", other[:8]),))]
            assert 0 < peer_in <= node.peers[other].comm.bytes_in and 0 < peer_out <= node.peers[other].comm.bytes_out
            assert got[("stealer_bytes_received_total", ())] == peer_in
            assert got[("stealer_bytes_sent_total", ())] == peer_out
        # what the gateway read from the source (scraped first) the source had written by its scrape
        gw_got, src_got = samples(texts[gw.id]), samples(texts[src.id])
        assert gw_got[("stealer_peer_bytes_received_total", (("peer", src.id[:8]),))] <= \
            src_got[("stealer_peer_bytes_sent_total", (("peer", gw.id[:8]),))]
        # the source's tiles went to the gateway: far more than heartbeats and handshakes
        assert src_got[("stealer_bytes_sent_total", ())] > 9 * frames * 100
        gw_got = samples(texts[gw.id])
        assert gw.stats.frames_done == frames
        assert gw_got[("stealer_frame_latency_seconds_count", ())] == frames
        assert gw_got[("stealer_frame_latency_seconds_sum", ())] == pytest.approx(sum(r["latency"] for r in results))
        assert gw_got[("stealer_frame_latency_seconds_bucket", (("le", "+Inf"),))] == frames
        assert samples(texts[src.id])[("stealer_frame_latency_seconds_count", ())] == 0  # not the gateway
        assert gw.stats.tails_run + src.stats.tails_run == frames
        assert sum(got[("stealer_tiles_run_total", ())] for got in map(samples, texts.values())) >= 9 * frames

        # stealer status against both, as a real process (it must not block this loop)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stealer", "status", f"127.0.0.1:{gw.metrics.port}", f":{src.metrics.port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env())
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        for n in (src, gw):
            if n is not None:
                await n.close()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[:4] == ["target", "node", "role", "peers"] and len(lines) == 3
    row = dict(zip(lines[0].replace("p50 s", "p50").replace("p99 s", "p99").split(), lines[1].split()))
    assert row["node"] == gw.id[:8] and row["role"] == "gateway" and row["frames"] == str(frames)
    assert row["tails"] == str(gw.stats.tails_run) and row["stolen"] == str(gw.stats.stolen)
    assert float(row["p50"]) > 0 and float(row["p99"]) >= float(row["p50"])
    assert row["in/s"] != "-" and row["out/s"] != "-"  # two scrapes (the heartbeats alone move bytes)
    src_row = lines[2].split()
    assert src_row[1] == src.id[:8] and src_row[2] == "worker"


async def test_metrics_port_in_use_is_a_clear_error_and_close_frees_it(tiny_net):
    first = Node(tiny_net, config(gateway=True))
    await first.start()
    try:
        taken = first.metrics.port
        second = Node(tiny_net, config(metrics=("127.0.0.1", taken)))
        with pytest.raises(ConfigError, match=f"--metrics 127.0.0.1:{taken}: cannot listen"):
            await second.start()
        await second.close()
    finally:
        await first.close()
        await first.close()  # safe twice
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", taken))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_with_nothing_listening_says_so(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "stealer", "status", f"127.0.0.1:{port}"], capture_output=True,
                       text=True, timeout=60, env=cli_env(), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert f"127.0.0.1:{port}: cannot read http://127.0.0.1:{port}/metrics" in r.stderr
    assert "is a node running with --metrics there?" in r.stderr


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = 120):
    """Poll ``check()`` until it gives a value (a real condition, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"node exited ({proc.returncode}): {log.read_text()}"
        value = check()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen in {timeout} s: {log.read_text()}")


@pytest.mark.usefixtures("warm_kernels")
def test_a_node_process_from_a_config_file_serves_metrics_and_logs_json(tmp_path):
    cfg = tmp_path / "tiny64.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64")
                   .replace("height=416", "height=64"))
    toml = tmp_path / "node.toml"
    toml.write_text(f"""
cfg = "{cfg}"
random-weights = 3
gateway = true
source = ["synthetic:2"]
frames = 9                 # the command line says 3
grid = "3x3"
layers = 9
host = "127.0.0.1"
no-discovery = true
metrics = "127.0.0.1:0"
stats = "stats.json"
""")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "stealer", "-v", "node", "--config", str(toml),
                                 "--frames", "3"], stdout=o, stderr=e, env=cli_env(), cwd=tmp_path)
    try:
        def listening() -> dict | None:
            for line in out.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "listening":
                    return json.loads(line)
            return None

        event = wait_for("listening", listening, proc, err)
        port = event["metrics_port"]

        def three_frames() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            return text if samples(text).get(("stealer_frames_done_total", ())) == 3 else None

        text = wait_for("3 frames released", three_frames, proc, err)
        assert samples(text)[("stealer_frame_latency_seconds_count", ())] == 3
        r = subprocess.run([sys.executable, "-m", "stealer", "status", f"127.0.0.1:{port}"], capture_output=True,
                           text=True, timeout=60, env=cli_env(), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        row = r.stdout.splitlines()[1].split()
        assert row[1] == event["node_id"][:8] and row[2] == "gateway"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # stderr is a file, not a terminal: every log line is a JSON object naming the node
    lines = [l for l in err.read_text().splitlines() if l.strip()]
    assert lines, "no log lines with -v"
    for line in lines:
        rec = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), rec
        assert rec["node"] == event["node_id"] and rec["ts"].endswith("Z")
    assert any("serving metrics at http://127.0.0.1:" in json.loads(l)["msg"] for l in lines)
    # the file's frames = 9 was overridden by --frames 3 (the drain at SIGTERM finishes every
    # frame already started, so with 9 there would be more)
    assert json.loads((tmp_path / "stats.json").read_text())["frames_done"] == 3


def test_status_rates_come_from_two_scrapes_over_the_nodes_own_uptime():
    from stealer.metrics import status_table, with_rates

    def parsed(node_id, up, got, put):
        return {"info": {"node_id": node_id, "role": "worker"}, "p50": math.nan, "p99": math.nan,
                "values": {"stealer_uptime_seconds": up, "stealer_bytes_received_total": got,
                           "stealer_bytes_sent_total": put}}

    m = with_rates(parsed("a", 10.0, 1000, 50), parsed("a", 12.0, 25_000, 2_050))
    assert m["rate_in"] == 12_000 and m["rate_out"] == 1000
    assert "rate_in" not in with_rates(parsed("a", 10.0, 0, 0), parsed("b", 1.0, 9, 9))  # restarted: another node
    table = status_table([("h:1", m)]).splitlines()
    assert table[0].split()[-2:] == ["in/s", "out/s"] and table[1].split()[-2:] == ["12.0k", "1.0k"]
    table = status_table([("h:1", parsed("a", 1.0, 4_500_000, 812))]).splitlines()  # one scrape: totals
    assert table[0].split()[-2:] == ["in", "out"] and table[1].split()[-2:] == ["4.5M", "812"]
