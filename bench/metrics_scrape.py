"""/metrics scrape time at a gateway with N peers (issue 15: "/metrics scrape time with 8 nodes").

    python bench/metrics_scrape.py [--peers 8] [--scrapes 1000] [--busy] [--out bench/out/metrics_scrape.json]

A gateway process with ``--metrics`` and N peer processes (``--slots 0``: they compute
nothing, but each is a connection with its RTT and byte series on the gateway's /metrics),
all real ``stealer node`` processes on 127.0.0.1 with a tiny model. Once the gateway sees
every peer, this process scrapes ``GET /metrics`` over one keep-alive HTTP connection (as
Prometheus does) and times each scrape from request to the last byte: p50, p99, max, the
body size and the number of samples. ``--busy``: the gateway also runs a source and computes
its frames meanwhile (the scrape then waits for the loop between tasks, as in production).
Target: well under a millisecond of the gateway's loop per scrape (the collector only reads
counters), a few milliseconds end to end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stealer.network import builtin_cfg  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _listening(proc: subprocess.Popen[str], timeout: float) -> dict:
    """The node's ``listening`` event from its stdout (it prints JSON events one per line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"node exited with {proc.returncode} before listening")
            continue
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "listening":
                return event
    raise RuntimeError("node did not listen in time")


def _peers(conn: http.client.HTTPConnection) -> tuple[float, str]:
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    for line in body.splitlines():
        if line.startswith("stealer_peers "):
            return float(line.split()[1]), body
    return 0.0, body


def measure(peers: int, scrapes: int, busy: bool, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="stealer-scrape-"))
    cfg = work / "tiny64.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64")
                   .replace("height=416", "height=64"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "stealer", "node", "--cfg", str(cfg), "--random-weights", "0", "--grid", "3x3",
            "--layers", "9", "--host", "127.0.0.1", "--no-discovery"]
    gw_argv = base + ["--gateway", "--metrics", "127.0.0.1:0"]
    gw_argv += ["--source", "synthetic:0", "--slots", "1"] if busy else ["--slots", "0"]
    procs: list[subprocess.Popen[str]] = []
    try:
        gw = subprocess.Popen(gw_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(gw)
        event = _listening(gw, timeout)
        # its later events (peers joining, ...) must not fill the pipe and stall it
        threading.Thread(target=lambda: gw.stdout.read() if gw.stdout else None, daemon=True).start()
        for _ in range(peers):
            procs.append(subprocess.Popen(base + ["--slots", "0", "--peer", f"127.0.0.1:{event['port']}"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
        conn = http.client.HTTPConnection("127.0.0.1", event["metrics_port"], timeout=30)
        deadline = time.monotonic() + timeout
        while True:  # every peer connected (and, busy, frames being released)
            seen, body = _peers(conn)
            if seen >= peers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway sees {seen:.0f} of {peers} peers after {timeout} s")
            time.sleep(0.1)
        for _ in range(20):  # warm-up: the first scrapes import and format for the first time
            _peers(conn)
        times = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            times.append(time.perf_counter() - t0)
        conn.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    samples = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    return {"peers": peers, "busy": busy, "scrapes": scrapes, "p50_ms": 1e3 * pct(times, 50),
            "p99_ms": 1e3 * pct(times, 99), "max_ms": 1e3 * max(times), "mean_ms": 1e3 * statistics.fmean(times),
            "body_bytes": len(body.encode()), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=8, help="peer nodes besides the gateway [8]")
    ap.add_argument("--scrapes", type=int, default=1000, help="timed scrapes [1000]")
    ap.add_argument("--busy", action="store_true", help="the gateway computes frames while it is scraped")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for the cluster to form [180]")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "metrics_scrape.json"))
    args = ap.parse_args()
    r = measure(args.peers, args.scrapes, args.busy, args.timeout)
    print(f"/metrics scrape at a gateway with {r['peers']} peers ({'computing frames' if r['busy'] else 'idle'}), "
          f"{r['scrapes']} scrapes over one keep-alive connection")
    print(f"{'peers':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>7} {'samples':>7}")
    print(f"{r['peers']:>5} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r['body_bytes']:>7} "
          f"{r['samples']:>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
