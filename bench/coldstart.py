"""Time from a fresh process start to the first finished frame (warm Numba cache).

    python bench/coldstart.py [--runs 5] [--cfg yolov2]

Runs ``python -m stealer infer`` (model load with random weights, kernel cache load, one
full-network forward pass, region decoding) in new processes and reports wall times; the first
run warms the Numba cache and is not counted. Target: <= 3 s for YOLOv2-608.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cfg", default="yolov2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "coldstart.json"))
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp()) / "r.json"
    cmd = [sys.executable, "-m", "stealer", "infer", "--cfg", args.cfg, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)  # warm the cache
    walls, loads, forwards = [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        r = json.loads(out.read_text())
        loads.append(r["load_seconds"])
        forwards.append(r["forward_seconds"][0])
    report = {"cfg": args.cfg, "runs": args.runs, "wall": walls, "model_load": loads, "forward": forwards}
    print(f"{args.cfg}: process start -> first finished frame, {args.runs} runs (warm Numba cache)")
    print(f"  wall   min {min(walls):.2f} s  median {statistics.median(walls):.2f} s  max {max(walls):.2f} s")
    print(f"  of which model load median {statistics.median(loads):.2f} s, forward median "
          f"{statistics.median(forwards):.2f} s (the rest: interpreter, imports, kernel cache, output)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
