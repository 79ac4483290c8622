"""Stragglers: p50/p99 frame latency with one node slowed down, speculative copies on vs off.

    python bench/stragglers.py [--frames 30] [--fast-cpu 0.4] [--slow-cpu 0.04]   (root: emulator)

Four emulated hosts (network namespaces, CPU cgroups): a gateway+source and two workers at
``--fast-cpu``, one worker at ``--slow-cpu`` (an overheating Pi). The same stream runs twice,
with and without speculative execution; every result is checked against single-device inference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stealer.images import synthetic_frame  # noqa: E402
from stealer.network import Network, builtin_cfg  # noqa: E402
from stealer.launcher import _follow, percentile  # noqa: E402


def run(args: argparse.Namespace, cfg: Path, speculate: bool) -> dict:
    from tools.emulate import Cluster

    work = Path(tempfile.mkdtemp(prefix="stealer-strag-"))
    out = work / "results.jsonl"
    base = [sys.executable, "-m", "stealer", "node", "--cfg", str(cfg), "--random-weights", "3",
            "--grid", args.grid, "--layers", str(args.layers)]
    if not speculate:
        base.append("--no-speculate")
    argvs = [base + ["--gateway", "--out", str(out), "--source", "synthetic:31", "--frames", str(args.frames),
                     "--fps", str(args.fps), "--max-inflight", "3"], base, base, base]
    # every host starts fast (a Pi that later overheats): at a few per cent of a core, start-up
    # alone would take a minute; the slow host is throttled once everyone has joined
    cpus = [args.fast_cpu] * 4
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = []
    with Cluster(nodes=4, cpu=cpus, rate=args.rate) as cluster:
        # the workers first, so that the stream starts with everyone connected
        for i in (1, 2, 3, 0):
            procs.append((f"node{i}", cluster.spawn(i, argvs[i], env=env, stdout=open(work / f"n{i}.log", "wb"),
                                                    stderr=subprocess.STDOUT, substitute=False)))
            if i == 3:
                time.sleep(args.settle)
                quota = cluster.cgroup_dir(3, "cpu") / "cpu.cfs_quota_us"
                period = int((cluster.cgroup_dir(3, "cpu") / "cpu.cfs_period_us").read_text())
                quota.write_text(str(int(args.slow_cpu * period)))
        try:
            res = _follow(out, args.frames, procs, args.timeout, time.monotonic(), quiet=True)
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.terminate()
    lat = [r["latency"] for r in res]
    return {"speculate": speculate, "frames": len(res), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "max": max(lat) if lat else None, "digests": {r["frame"]: r["output_sha256"] for r in res},
            "work": str(work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--fast-cpu", type=float, default=0.4)
    ap.add_argument("--slow-cpu", type=float, default=0.04)
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--grid", default="3x3")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--settle", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "stragglers.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/stragglers.py needs root (network namespaces and CPU cgroups)")
    cfg = Path(tempfile.mkdtemp(prefix="stealer-cfg-")) / "tiny.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", f"width={args.size}")
                   .replace("height=416", f"height={args.size}"))
    net = Network.from_random(cfg, 3)
    expected = {f: hashlib.sha256(net.forward(synthetic_frame(31, f, net.input_shape)).tobytes()).hexdigest()
                for f in range(args.frames)}
    rows = [run(args, cfg, True), run(args, cfg, False)]
    print(f"one node at {args.slow_cpu} CPU, three at {args.fast_cpu}; {args.frames} frames at {args.fps} fps "
          f"(yolov2-tiny {args.size}, {args.grid}, {args.layers} fused layers)")
    print(f"{'speculation':<12} {'frames':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'exact':>6}")
    for r in rows:
        exact = all(expected[f] == d for f, d in r["digests"].items())
        r["exact"] = exact
        print(f"{'on' if r['speculate'] else 'off':<12} {r['frames']:>6} {r['p50']:>7.2f} {r['p99']:>7.2f} "
              f"{(r['max'] or float('nan')):>7.2f} {str(exact):>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
