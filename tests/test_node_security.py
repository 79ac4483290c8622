"""A whole node under attack, through real sockets: only nodes with the cluster secret get in,
and rogue peers (garbage, lying lengths, connection floods, stalled handshakes) neither stop the
honest cluster nor make the node's memory grow."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from stealer.images import synthetic_frame
from stealer.network import Network, builtin_cfg
from stealer.node import Node

from .test_node import collect, config, expected_digest, tiny_net  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)

SECRET = b"correct horse battery staple, twice over"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def test_only_nodes_with_the_secret_join(tiny_net):
    gw = Node(tiny_net, config(gateway=True, sources=[40], frames=3, secret=SECRET))
    await gw.start()
    good = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], secret=SECRET, authenticate_frames=False))
    bad = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], secret=b"a different secret of 16+ bytes"))
    open_node = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)]))
    for n in (good, bad, open_node):
        await n.start()
    try:
        results = await collect(gw, 3)
        peers = set(gw.peers)
    finally:
        for n in (open_node, bad, good, gw):
            await n.close()
    assert good.id in peers and bad.id not in peers and open_node.id not in peers
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 40, f) for f in range(3)]


async def test_frame_macs_end_to_end(tiny_net):
    gw = Node(tiny_net, config(gateway=True, sources=[41], frames=2, secret=SECRET, authenticate_frames=True))
    await gw.start()
    w = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], secret=SECRET, authenticate_frames=True))
    await w.start()
    try:
        results = await collect(gw, 2)
    finally:
        await w.close()
        await gw.close()
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 41, f) for f in range(2)]


async def _garbage(port: int, payload: bytes, hold: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(hold)
    except OSError:
        pass
    finally:
        writer.close()


async def test_rogue_peers_do_not_stop_the_honest_cluster(tiny_net):
    gw = Node(tiny_net, config(gateway=True, sources=[42], frames=8, max_inflight=2, secret=SECRET))
    await gw.start()
    honest = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], secret=SECRET))
    await honest.start()
    await asyncio.sleep(0.2)
    before = rss_mib()
    attacks = []
    for i in range(20):  # garbage
        attacks.append(_garbage(gw.port, os.urandom(200), 0.5))
    for i in range(20):  # a 200 MB frame announced, then nothing
        attacks.append(_garbage(gw.port, struct.pack(">I", 200 << 20) + b"x" * 100, 3.0))
    for i in range(150):  # a connection flood that never says anything (slow-loris)
        attacks.append(_garbage(gw.port, b"", 3.0))
    peak = before

    async def sample() -> None:  # the peak during the attack, not what is left after it
        nonlocal peak
        while True:
            peak = max(peak, rss_mib())
            await asyncio.sleep(0.02)

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        attack = asyncio.gather(*attacks)
        results = await collect(gw, 8, timeout=120)
        await attack
    finally:
        sampler.cancel()
        await honest.close()
        await gw.close()
    assert [r["output_sha256"] for r in results] == [expected_digest(tiny_net, 42, f) for f in range(8)]
    assert peak - before < 64, f"memory peaked {peak - before:.1f} MiB above its start under attack"


def test_cli_secret_errors_are_one_clear_line(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "STEALER_SECRET"}
    r = subprocess.run([sys.executable, "-m", "stealer", "node", "--no-discovery", "--secret-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing" in r.stderr
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    r = subprocess.run([sys.executable, "-m", "stealer", "node", "--no-discovery", "--secret-file", str(short)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "16" in r.stderr and "tooshort" not in r.stderr  # never echo the secret
    r = subprocess.run([sys.executable, "-m", "stealer", "node", "--no-discovery", "--authenticate-frames"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "needs a cluster secret" in r.stderr
