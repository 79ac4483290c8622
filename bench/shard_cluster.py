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
    python bench/shard_cluster.py --memory              # the memory figure only (below)
    python bench/shard_cluster.py --memory --smoke      # the same on YOLOv2-tiny at 96 and a small VGG

``--memory``: the issue's memory figure only (memory is not CPU-timing sensitive, so it runs on
a shared machine): per-node peak RSS (VmHWM, read from ``/proc/PID/status`` just before the
node is killed) of YOLOv2-608 with K = 1, 2, 4, 8 shards of the tail (K node processes: the
gateway and K - 1 more, the last of them the source; K = 1: the gateway alone, ``--shards 1``),
offering no limit below K = 4 (one node cannot hold 190 MB of tail weights in 256 MB) and
``--max-memory`` from K = 4 on; then VGG-16 (the shipped cfg: 256, cropped to 224) on 8 nodes with ``--shards 8 --max-memory``;
and the bare runtime of each model. Every frame is checked exact: the SHA-256 the gateway's
result line carries against that of ``stealer infer --save-output`` on the same frame. Per node
it also lists what it says it holds (its ``shards-held`` events) and the planner's peak for it
(the gateway's ``placement`` event). Writes ``--out`` (JSON) and prints a table.

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
                 inflight: int, max_memory: str | None = None) -> None:
        self.work, self.out = work, work / "results.jsonl"
        self.names = ["gw"] + [f"n{i}" for i in range(1, n)]
        common = ["--cfg", args.cfg, "--random-weights", "0", "--grid", args.grid, "--host", "127.0.0.1",
                  "--no-discovery", "--max-memory", max_memory or args.max_memory, *flags]
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
        out = []
        for line in self.out.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the line the gateway is writing right now
                break
        return out

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


def events(log: Path, kind: str) -> list[dict]:
    """The JSON event lines of ``kind`` a node printed."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{kind}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def reference_digests(cfg: str, frames: int, work: Path) -> list[str]:
    """SHA-256 of single-device inference (``stealer infer``) of synthetic:1 frames 0..frames-1."""
    import hashlib

    import numpy as np

    out = []
    for f in range(frames):
        npy = work / f"ref{f}.npy"
        subprocess.run([sys.executable, "-m", "stealer", "infer", "--cfg", cfg, "--random-weights", "0", "--frame",
                        str(f), "synthetic:1", "--save-output", str(npy), "--out", str(work / f"ref{f}.json")],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True)
        out.append(hashlib.sha256(np.ascontiguousarray(np.load(npy)).tobytes()).hexdigest())
    return out


def bare_runtime(cfg: str) -> int:
    bare = subprocess.run([sys.executable, "-c", BARE, cfg], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    return int(bare.stdout.split()[-1])


def memory_figure(args: argparse.Namespace, work: Path) -> int:
    """``--memory``: see the module docstring."""
    mib = 2**20
    from stealer.network import builtin_cfg

    runs: list[tuple[str, str, str, int, str, list[str]]] = []  # (label, cfg, grid, K, max-memory, flags)
    # VGG-16 as darknet ships it (stealer/models/vgg-16.cfg): a 256x256 input, centre-cropped to
    # 224 by its first layer (x*2 - 1, fused into the tiles like any other layer), then 13 convs
    # and three connected layers. Its first --vgg-layers layers run as tiles, the rest sharded.
    vgg_text = builtin_cfg("vgg-16").read_text()
    yolo = ("yolov2", "5x5", [])
    size = 256
    if args.smoke:
        cfg = work / "tiny96.cfg"
        cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                       .replace("height=416", "height=96"))
        yolo = (str(cfg), "2x2", ["--layers", "9"])
        size = 40
        vgg_text = (vgg_text.replace("height=256", "height=40").replace("width=256", "width=40")
                    .replace("crop_height=224", "crop_height=32").replace("crop_width=224", "crop_width=32"))
    vgg = work / f"vgg-16-{size}.cfg"
    vgg.write_text(vgg_text)
    for k in args.k:
        runs.append((f"yolov2 K={k}", yolo[0], yolo[1], k, args.max_memory if k >= 4 else "0", yolo[2]))
    if not args.no_vgg:
        runs.append((f"vgg-16 K=8", str(vgg), "1x1", 8, args.max_memory, ["--layers", str(args.vgg_layers)]))
    report: dict = {"mode": "memory", "max_memory": args.max_memory, "frames": args.frames, "bare_runtime": {},
                    "runs": []}
    lines = []
    for cfg in sorted({r[1] for r in runs}, key=lambda c: [r[1] for r in runs].index(c)):
        report["bare_runtime"][cfg] = bare_runtime(cfg)
        lines.append(f"bare runtime ({Path(cfg).stem}: imports + JIT-cached kernels, no model): VmHWM "
                     f"{report['bare_runtime'][cfg] / mib:.1f} MiB")
        print(lines[-1], flush=True)
    refs: dict[str, list[str]] = {}
    for label, cfg, grid, k, mem, extra in runs:
        if cfg not in refs:
            refs[cfg] = reference_digests(cfg, args.frames, work)
        d = work / label.replace(" ", "-").replace("=", "")
        d.mkdir()
        args.cfg, args.grid = cfg, grid
        c = Cluster(args, d, k, ["--shards", str(k), *extra], args.frames, 1, max_memory=mem)
        try:
            res = c.wait(args.frames, args.timeout)
        finally:
            peaks = c.close()
        placement = (events(d / "gw.log", "placement") or [{}])[-1]
        planned = placement.get("nodes", {})
        ids = {}
        for name in c.names:
            started = events(d / f"{name}.log", "starting")
            ids[name] = started[0]["node_id"] if started else ""
        exact = [r.get("output_sha256") == refs[cfg][r["frame"]] for r in res if r.get("frame", -1) < args.frames]
        nodes = []
        for name, peak in zip(c.names, peaks):
            held = events(d / f"{name}.log", "shards-held")
            plan = planned.get(ids[name], {})
            nodes.append({"node": name, "vmhwm": peak, "shard_bytes": held[-1]["nbytes"] if held else 0,
                          "shard_bytes_max": max((e["nbytes"] for e in held), default=0),
                          "planned_peak": plan.get("peak"), "source": name == c.names[-1]})
        run = {"label": label, "cfg": cfg, "grid": grid, "shards": k, "max_memory": mem, "flags": extra,
               "frames": len(res),
               "exact": sum(exact), "recovered": sum("recovered" in r for r in res), "nodes": nodes,
               "placement_epoch": placement.get("epoch"), "max_vmhwm": max(peaks),
               "placements": [{"epoch": e["epoch"], "shards": e["shards"], "nodes": len(e["nodes"])}
                              for e in events(d / "gw.log", "placement")],
               "placement_failures": len(events(d / "gw.log", "placement-failed"))}
        report["runs"].append(run)
        placed = " ".join(f"{p['epoch']}:{p['shards']}/{p['nodes']}" for p in run["placements"])
        lines.append("")
        lines.append(f"{label} ({Path(cfg).name}, --shards {k}, --max-memory {mem}, grid {grid} {' '.join(extra)}): "
                     f"{len(res)}/{args.frames} frames, "
                     f"{sum(exact)} exact vs stealer infer, {run['recovered']} recovered; max VmHWM "
                     f"{max(peaks) / mib:.1f} MiB; placements (epoch:K/nodes) "
                     f"{placed}")
        lines.append(f"  {'node':<5} {'VmHWM MiB':>9} {'shards MiB':>10} {'(max held)':>10} {'planned MiB':>11}  role")
        for n in nodes:
            role = ("gateway" if n["node"] == "gw" else "holder") + (" + source" if n["source"] else "")
            pp = "-" if n["planned_peak"] is None else f"{n['planned_peak'] / mib:.1f}"
            lines.append(f"  {n['node']:<5} {n['vmhwm'] / mib:>9.1f} {n['shard_bytes'] / mib:>10.1f} "
                         f"{n['shard_bytes_max'] / mib:>10.1f} {pp:>11}  {role}")
        print("\n".join(lines[-(len(nodes) + 3):]), flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.text:
        Path(args.text).write_text(text)
    print(f"wrote {args.out}")
    return 0


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
    ap.add_argument("--memory", action="store_true", help="the memory figure only (see above); --frames default 3")
    ap.add_argument("--no-vgg", action="store_true", help="--memory: skip VGG-16")
    ap.add_argument("--vgg-layers", type=int, default=5, help="--memory: VGG-16 layers run as tiles (the crop and 4) [5]")
    ap.add_argument("--text", default=None, help="--memory: also write the table to this file")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "shard_cluster.json"))
    args = ap.parse_args()
    if args.emulate:
        raise SystemExit("--emulate: run the nodes under tools/emulate.py (root); this script runs local processes")
    work = Path(tempfile.mkdtemp(prefix="shard-cluster-"))
    args.cache = os.environ.get("STEALER_CACHE") or str(work / "cache")
    if args.memory:
        if "--frames" not in sys.argv:
            args.frames = 3
        if args.smoke and "--k" not in sys.argv:
            args.k = [1, 2]
        if args.smoke and "--max-memory" not in sys.argv:
            args.max_memory = "1G"
        return memory_figure(args, work)
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
