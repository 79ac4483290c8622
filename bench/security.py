"""Security benchmark: handshake cost, frame-MAC throughput, and memory under rogue peers.

    python bench/security.py [--quick] [--compare-old REF] [--out bench/out/security.json]

1. Handshake cost on 127.0.0.1: sequential ``connect()`` calls (TCP connect + handshake)
   to a server in another process, open cluster vs cluster secret vs secret with frame
   MACs; plus the crypto alone (proofs and frame keys per handshake) and the one-time key
   derivation (scrypt).
2. Frame-MAC cost: MB/s of one-way 5 MB array messages (then one echo to sync), with and
   without ``authenticate_frames``; plus raw keyed-BLAKE2b speed for reference.
3. Memory of a server process under the rogue-peer attack of ``tests/test_security.py``
   (garbage, 200 MB length lies, a 300-connection flood, slow-loris, bogus proofs / lies
   after Hello) while an honest client keeps exchanging arrays: VmRSS idle vs peak.
   ``--compare-old REF`` also runs one "claim 200 MB, then stall" liar against the server
   of git revision REF (extracted with ``git archive`` to a temp dir), to show what the
   lie cost before the length was bounded by the handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hashlib  # noqa: E402

import numpy as np  # noqa: E402

from stealer.wire import PROTOCOL_VERSION, Hello, TensorMsg, connect, decode, encode, read_frame  # noqa: E402
from stealer.wire.auth import ClusterKey, Transcript, new_nonce  # noqa: E402
from stealer.wire.framing import frame_pieces  # noqa: E402
from stealer.wire.messages import AuthChallenge, AuthInit, AuthProof, Welcome  # noqa: E402

SECRET = b"bench-secret-0123456789abcdef"
MODEL = "ab" * 32
MODES = {"open": {}, "secret": {"secret": SECRET}, "secret+frames": {"secret": SECRET, "authenticate_frames": True}}

SERVER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from stealer.config import DEFAULT_LIMITS
from stealer.wire import PROTOCOL_VERSION, Hello, TensorMsg, serve
mode = sys.argv[2]
kw = {}
if mode != "open":
    kw["secret"] = b"bench-secret-0123456789abcdef"
if mode == "secret+frames":
    kw["authenticate_frames"] = True
limits = DEFAULT_LIMITS
changes = dict(handshake_timeout=0.5, heartbeat_interval=0.1, peer_dead_after=0.5, close_timeout=0.5)
if hasattr(limits, "max_connections_per_ip"):
    changes["max_connections_per_ip"] = 8
limits = limits.replace(**changes)

async def handler(comm):
    while True:
        msg = await comm.recv()
        if isinstance(msg, TensorMsg) and msg.tag != "bulk":
            await comm.send(msg)

async def main():
    hello = lambda: Hello(PROTOCOL_VERSION, "s" * 32, "worker", 0, 2, "ab" * 32, 0)
    async with serve("127.0.0.1", 0, handler, hello, limits=limits, **kw) as srv:
        print(srv.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class ServerProcess:
    """A server in its own process (its memory is measured alone)."""

    def __init__(self, mode: str, root: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(root), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=str(root),
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hello(node: str) -> Hello:
    return Hello(PROTOCOL_VERSION, node * 32, "worker", 0, 2, MODEL, 0)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ---- 1. handshakes ---------------------------------------------------------------------


async def handshake_times(mode: str, n: int) -> list[float]:
    kw = dict(MODES[mode])
    if "secret" in kw:
        kw["secret"] = ClusterKey(SECRET)  # derived once, as a node does
    with ServerProcess(mode) as srv:
        times = []
        for i in range(n + 10):
            t0 = time.perf_counter()
            comm = await connect("127.0.0.1", srv.port, hello("c"), heartbeat=False, **kw)
            dt = time.perf_counter() - t0
            comm.abort("bench")
            if i >= 10:  # warm-up
                times.append(dt)
    return times


async def handshakes(n: int, rounds: int) -> list[dict]:
    """Rounds interleave the modes, so load from other processes hits them alike."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            times[mode] += await handshake_times(mode, n)
    return [
        {"mode": m, "n": len(t), "p50_us": pct(t, 50) * 1e6, "p99_us": pct(t, 99) * 1e6,
         "mean_us": statistics.fmean(t) * 1e6}
        for m, t in times.items()
    ]


def crypto_cost(n: int) -> dict:
    t0 = time.perf_counter()
    ClusterKey(b"a fresh secret, not cached yet!!")
    derive_ms = (time.perf_counter() - t0) * 1e3
    key = ClusterKey(SECRET)
    t0 = time.perf_counter()
    for _ in range(n):  # what both sides compute for one handshake
        t = Transcript(new_nonce(), new_nonce(), "c" * 32, "s" * 32, True, True)
        p = key.server_proof(t)
        key.check_server_proof(t, p)
        q = key.client_proof(t)
        key.check_client_proof(t, q)
        key.frame_macs(t, server=True)
        key.frame_macs(t, server=False)
    per = (time.perf_counter() - t0) / n * 1e6
    return {"key_derivation_ms": derive_ms, "proofs_and_keys_both_sides_us": per}


# ---- 2. frame MACs ---------------------------------------------------------------------


async def throughput(mode: str, n: int, reps: int) -> list[float]:
    kw = dict(MODES[mode])
    arr = np.random.default_rng(0).standard_normal(5 * 2**20 // 4).astype(np.float32)
    rates = []
    with ServerProcess(mode) as srv:
        async with await connect("127.0.0.1", srv.port, hello("c"), **kw) as comm:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(n):
                    await comm.send(TensorMsg("bulk", arr))
                await comm.send(TensorMsg("sync", arr[:1]))
                await comm.recv()
                rates.append(n * arr.nbytes / (time.perf_counter() - t0) / 1e6)
    return rates


async def throughputs(n: int, rounds: int) -> list[dict]:
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            rates[mode] += await throughput(mode, n, 2)
    return [
        {"mode": m, "messages": n * len(r), "message_mb": 5 * 2**20 / 1e6, "mb_s": max(r),
         "mb_s_median": statistics.median(r)}
        for m, r in rates.items()
    ]


def blake2_speed() -> float:
    data = np.zeros(5 * 2**20, np.uint8).data
    t0 = time.perf_counter()
    for _ in range(20):
        hashlib.blake2b(data, key=b"k" * 32, digest_size=32).digest()
    return 20 * len(data) / (time.perf_counter() - t0) / 1e6


# ---- 3. rogue peers --------------------------------------------------------------------


def frame(msg: object) -> bytes:
    return b"".join(bytes(p) for p in frame_pieces(*encode(msg)))  # type: ignore[arg-type]


async def open_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def until_dropped(r: asyncio.StreamReader, w: asyncio.StreamWriter, timeout: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout):
            while await r.read(65536):
                pass
    except (ConnectionError, TimeoutError):
        pass
    w.transport.abort()


async def garbage(port: int, rng: random.Random) -> None:
    r, w = await open_from(port, "127.0.0.3")
    w.write(rng.randbytes(rng.randrange(1, 4096)))
    await until_dropped(r, w)


async def liar(port: int, stall: bool, source: str = "127.0.0.4") -> None:
    r, w = await open_from(port, source)
    w.write(struct.pack(">I", 200_000_000) + bytes(1000))
    if stall:
        await until_dropped(r, w)
    else:
        w.transport.abort()


async def flood(port: int, n: int) -> None:
    conns = []
    for i in range(0, n, 50):
        conns += await asyncio.gather(*(open_from(port, "127.0.0.2") for _ in range(min(50, n - i))))
    await asyncio.gather(*(until_dropped(r, w) for r, w in conns))


async def slow_loris(port: int) -> None:
    r, w = await open_from(port, "127.0.0.5")
    dropped = asyncio.ensure_future(until_dropped(r, w))
    for b in frame(AuthInit("l" * 32, new_nonce())):
        if dropped.done():
            break
        w.write(bytes([b]))
        await asyncio.sleep(0.05)
    await dropped


async def bogus_proof(port: int) -> None:
    r, w = await open_from(port, "127.0.0.6")
    w.write(frame(AuthInit("b" * 32, new_nonce())))
    try:
        ch = decode(*await read_frame(r))
        if isinstance(ch, AuthChallenge):  # else a Reject: too many from this address
            w.write(frame(AuthProof(os.urandom(32))) + frame(hello("b")))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    await until_dropped(r, w)


async def liar_after_hello(port: int) -> None:
    r, w = await open_from(port, "127.0.0.7")
    w.write(frame(hello("q")))
    if isinstance(decode(*await read_frame(r)), Welcome):
        w.write(struct.pack(">I", 200_000_000) + bytes(64 * 1024))
    await until_dropped(r, w)


async def rogue_attack(mode: str) -> dict:
    kw = dict(MODES[mode])
    rng = random.Random(1)
    arr = np.random.default_rng(0).standard_normal(64 * 1024).astype(np.float32)
    with ServerProcess(mode) as srv:
        async with await connect("127.0.0.1", srv.port, hello("h"), **kw) as honest:
            for _ in range(20):  # warm the server's allocator with honest traffic first
                await honest.send(TensorMsg("echo", arr))
                await honest.recv()
            await asyncio.sleep(0.2)
            idle = srv.status("VmRSS")
            peak = idle
            done = asyncio.Event()
            exchanges = 0

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, srv.status("VmRSS"))
                    await asyncio.sleep(0.005)

            async def traffic() -> None:
                nonlocal exchanges
                while not done.is_set():
                    await honest.send(TensorMsg("echo", arr))
                    out = await honest.recv()
                    assert isinstance(out, TensorMsg) and np.array_equal(out.array, arr)
                    exchanges += 1
                    await asyncio.sleep(0.002)

            tasks = [asyncio.create_task(sample()), asyncio.create_task(traffic())]
            t0 = time.perf_counter()
            await asyncio.gather(
                *(garbage(srv.port, rng) for _ in range(20)),
                *(liar(srv.port, stall=i % 2 == 0) for i in range(20)),
                flood(srv.port, 300),
                *(slow_loris(srv.port) for _ in range(10)),
                *((bogus_proof(srv.port) for _ in range(10)) if mode != "open" else (liar_after_hello(srv.port) for _ in range(5))),
            )
            attack = time.perf_counter() - t0
            await asyncio.sleep(0.2)
            done.set()
            await asyncio.gather(*tasks)
        hwm = srv.status("VmHWM")
    return {"mode": mode, "attack_s": attack, "honest_exchanges": exchanges, "idle_rss_mib": idle / 2**20,
            "peak_rss_mib": peak / 2**20, "delta_mib": (peak - idle) / 2**20, "hwm_mib": hwm / 2**20}


async def old_liar(ref: str) -> dict:
    """One 'claim 200 MB, then stall' liar against the server of git revision ``ref``."""
    with tempfile.TemporaryDirectory(prefix="stealer-old-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "stealer"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = {}
        for label, root in (("old", Path(tmp)), ("new", ROOT)):
            with ServerProcess("open", root) as srv:
                await asyncio.sleep(0.2)
                idle = srv.status("VmRSS")
                peak = idle
                task = asyncio.create_task(liar(srv.port, stall=True, source="127.0.0.9"))
                while not task.done():
                    peak = max(peak, srv.status("VmRSS"))
                    await asyncio.sleep(0.005)
                await task
            out[label] = {"idle_rss_mib": idle / 2**20, "peak_rss_mib": peak / 2**20, "delta_mib": (peak - idle) / 2**20}
    return {"ref": ref, **out}


# ---- main ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict:
    rounds = 1 if args.quick else 3
    res: dict = {"rogue": []}
    res["handshake"] = await handshakes(100 if args.quick else 200, rounds)
    res["crypto"] = crypto_cost(2000)
    res["blake2b_mb_s"] = blake2_speed()
    res["throughput"] = await throughputs(10 if args.quick else 20, rounds)
    for mode in ("open", "secret"):
        res["rogue"].append(await rogue_attack(mode))
    if args.compare_old:
        res["old_liar"] = await old_liar(args.compare_old)
    return res


def report(res: dict) -> None:
    print("handshake on 127.0.0.1 (connect + handshake, sequential)")
    print(f"  {'mode':<14} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for r in res["handshake"]:
        print(f"  {r['mode']:<14} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['mean_us']:>8.0f}")
    c = res["crypto"]
    print(f"  crypto per handshake (both sides): {c['proofs_and_keys_both_sides_us']:.1f} us; "
          f"key derivation once per process: {c['key_derivation_ms']:.0f} ms")
    print(f"throughput of 5 MB array messages (keyed BLAKE2b alone: {res['blake2b_mb_s']:.0f} MB/s)")
    base = res["throughput"][0]["mb_s"]
    for r in res["throughput"]:
        print(f"  {r['mode']:<14} best {r['mb_s']:>6.0f} MB/s, median {r['mb_s_median']:>6.0f} MB/s  "
              f"(best x{r['mb_s'] / base:.2f})")
    print("server process memory under the rogue-peer attack")
    print(f"  {'mode':<8} {'idle MiB':>9} {'peak MiB':>9} {'delta':>7} {'attack s':>9} {'honest ex':>10}")
    for r in res["rogue"]:
        print(f"  {r['mode']:<8} {r['idle_rss_mib']:>9.1f} {r['peak_rss_mib']:>9.1f} {r['delta_mib']:>7.1f} "
              f"{r['attack_s']:>9.2f} {r['honest_exchanges']:>10}")
    if "old_liar" in res:
        o = res["old_liar"]
        print(f"one 'claim 200 MB then stall' liar: {o['ref']} +{o['old']['delta_mib']:.1f} MiB, "
              f"now +{o['new']['delta_mib']:.1f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compare-old", metavar="REF", help="also run one liar against git revision REF")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "security.json"))
    args = ap.parse_args()
    res = asyncio.run(main(args))
    report(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
