"""Sharded tails in a real cluster of local processes (``stealer node --shards K [--coded]``).

Measures, for YOLOv2-608 by default:

* per-node peak RSS (VmHWM from ``/proc/PID/status``) of a cluster at K = 1, 2, 4, 8 (K nodes;
  K = 1 is one node holding the whole tail), and of the bare runtime (imports plus the model's
  JIT-cached kernels, no weights);
* single-frame latency (``--max-inflight 1``) with the tail sharded against one node;
* with one shard holder frozen (SIGSTOP) a third of the way through the stream: p99 latency of
  ``--coded`` against the fault-free run, frames lost, and without ``--coded`` what re-executing
  the lost shards costs (the lease, then the new placement).

    python bench/shard_cluster.py                       # the lead's run (minutes, ~2 GB RAM at K=8)
    python bench/shard_cluster.py --smoke               # YOLOv2-tiny at 96, 3 frames: a smoke test

Every process runs on this host (loopback, unshaped). ``--emulate`` is reserved for runs under
``tools/emulate.py`` (a host per node, Pi-class CPU share, 20 Mbit/s links): not wired here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE = r"""
import sys
from stealer.darknet import parse_cfg
from stealer.network import Network, resolve_cfg
spec = parse_cfg(resolve_cfg(sys.argv[1]))
Network(spec, {}, "bare", partial=True).warm_up()  # the kernels this model uses, from the JIT cache
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024)
"""


def hwm(pid: int) -> int:
    """VmHWM of a live process, bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) * 1024
    except (OSError, StopIteration):
        return 0


class Cluster:
    """A gateway and ``n - 1`` nodes on 127.0.0.1; the last node started is the source."""

    def __init__(self, args: argparse.Namespace, work: Path, n: int, flags: list[str], frames: int,
                 inflight: int) -> None:
        self.work, self.out = work, work / "results.jsonl"
        common = ["--cfg", args.cfg, "--random-weights", "0", "--grid", args.grid, "--host", "127.0.0.1",
                  "--no-discovery", "--max-memory", args.max_memory, *flags]
        env = dict(os.environ, PYTHONPATH=str(ROOT), STEALER_CACHE=args.cache)
        self.procs: list[subprocess.Popen[bytes]] = []

        def start(name: str, *extra: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen([sys.executable, "-m", "stealer", "node", *common, *extra],
                                 stdout=open(work / f"{name}.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            self.procs.append(p)
            return p

        gw = start("gw", "--gateway", "--out", str(self.out), *([] if n > 1 else self._source(frames, inflight)))
        port = self._port("gw", gw)
        for i in range(1, n):
            start(f"n{i}", "--peer", f"127.0.0.1:{port}", *(self._source(frames, inflight) if i == n - 1 else ()))

    @staticmethod
    def _source(frames: int, inflight: int) -> list[str]:
        return ["--source", "synthetic:1", "--frames", str(frames), "--max-inflight", str(inflight)]

    def _port(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit((self.work / f"{name}.log").read_text()[-2000:])
            for line in (self.work / f"{name}.log").read_text().splitlines():
                if line.startswith("{") and '"listening"' in line:
                    return int(json.loads(line)["port"])
            time.sleep(0.1)
        raise SystemExit(f"{name} did not start")

    def results(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(l) for l in self.out.read_text().splitlines() if l.strip()]

    def wait(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.results()) < n:
            time.sleep(0.1)
        return self.results()

    def close(self) -> list[int]:
        peaks = [hwm(p.pid) for p in self.procs]
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
        return peaks


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99 + 0.5) - 1)] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="yolov2")
    ap.add_argument("--grid", default="5x5")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--max-memory", default="256M", help="what every node offers [256M]")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take [900]")
    ap.add_argument("--smoke", action="store_true", help="YOLOv2-tiny at 96, K = 1 and 2, 3 frames")
    ap.add_argument("--emulate", action="store_true", help="reserved: under tools/emulate.py (not wired here)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "shard_cluster.json"))
    args = ap.parse_args()
    if args.emulate:
        raise SystemExit("--emulate: run the nodes under tools/emulate.py (root); this script runs local processes")
    work = Path(tempfile.mkdtemp(prefix="shard-cluster-"))
    args.cache = str(work / "cache")
    if args.smoke:
        from stealer.network import builtin_cfg

        cfg = work / "tiny96.cfg"
        cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                       .replace("height=416", "height=96"))
        args.cfg, args.grid, args.k, args.frames, args.max_memory = str(cfg), "2x2", [1, 2], 3, "1G"
    report: dict = {"cfg": args.cfg, "max_memory": args.max_memory, "peaks": {}, "latency": {}, "frozen": {}}

    bare = subprocess.run([sys.executable, "-c", BARE, args.cfg], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    report["bare_runtime"] = int(bare.stdout.split()[-1])
    print(f"bare runtime: VmHWM {report['bare_runtime'] / 2**20:.0f} MiB")

    def run(name: str, n: int, flags: list[str], frames: int, inflight: int, freeze_at: int | None = None
            ) -> tuple[list[dict], list[int], float | None]:
        d = work / name
        d.mkdir()
        c = Cluster(args, d, n, flags, frames, inflight)
        frozen_at = None
        try:
            if freeze_at is not None:
                c.wait(freeze_at, args.timeout)
                c.procs[1].send_signal(signal.SIGSTOP)  # a holder that is not the source
                frozen_at = time.time()
            res = c.wait(frames, args.timeout)
        finally:
            peaks = c.close()
        return res, peaks, frozen_at

    for k in args.k:
        flags = ["--shards", str(k)] if k > 1 else []
        res, peaks, _ = run(f"k{k}", k, flags, args.frames, 1)
        lat = [r["latency"] for r in res if "latency" in r]
        report["peaks"][k] = peaks
        report["latency"][k] = {"median": statistics.median(lat) if lat else None, "frames": len(res)}
        exact = sum("recovered" not in r for r in res)
        print(f"K={k}: peaks MiB {[round(p / 2**20) for p in peaks]}, single-frame latency median "
              f"{report['latency'][k]['median']} s over {len(res)} frames ({exact} without a recovered shard)")
    k = max(kk for kk in args.k if kk > 1) if any(kk > 1 for kk in args.k) else 2
    base = report["latency"].get(k) or {}
    for coded in (True, False):
        flags = ["--shards", str(k)] + (["--coded"] if coded else [])
        n = k + (2 if coded else 1)  # one node more than the shards need: the frozen one is never the source
        fault_free, _, _ = run(f"free-{'coded' if coded else 'plain'}", n, flags, args.frames, 2)
        res, _, _ = run(f"frozen-{'coded' if coded else 'plain'}", n, flags, args.frames, 2,
                        freeze_at=max(1, args.frames // 3))
        ff = [r["latency"] for r in fault_free if "latency" in r]
        fr = [r["latency"] for r in res if "latency" in r]
        key = "coded" if coded else "uncoded"
        report["frozen"][key] = {"p99_fault_free": p99(ff), "p99_frozen": p99(fr), "lost": args.frames - len(res),
                                 "recovered_frames": sum("recovered" in r for r in res)}
        print(f"{key}, one holder frozen at frame {max(1, args.frames // 3)}: p99 {p99(fr):.3f} s vs fault-free "
              f"{p99(ff):.3f} s ({p99(fr) / p99(ff) if ff and fr else float('nan'):.2f}x), frames lost "
              f"{args.frames - len(res)}, recovered {report['frozen'][key]['recovered_frames']}")
    report["single_frame_ratio"] = (base.get("median") or 0) / (report["latency"].get(1, {}).get("median") or 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
