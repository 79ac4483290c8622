"""Peak RSS (VmHWM) of one node serving its placement's weights, against the planner's prediction.

For each (K, node) the child process plans the placement (``stealer.placement``, K nodes offering
``--max-memory``), reads only that node's byte ranges of the weights file (``read_shards``), runs
one frame of its shards of the tail layers on inputs of the layers' shapes, and reports its
VmHWM. The coordinator's gather and the FTP tiles are not run (their working sets are small next
to the weights; the planner counts them).

    python bench/shard_memory.py --cfg yolov2 --weights /tmp/yolov2.weights --k 1 2 4 8

The weights file is written with random weights (``stealer weights``) if it does not exist.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys
import numpy as np
from stealer.darknet import parse_cfg
from stealer.network import resolve_cfg
from stealer.placement import NodeOffer, plan_placement, _fused_prefix
from stealer.shard import read_shards, run_rows

cfg, weights, k, node, mem = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
spec = parse_cfg(resolve_cfg(cfg))
fused, tile = _fused_prefix(spec, "auto", "5x5")
p = plan_placement(spec, [NodeOffer(f"node{i}", mem) for i in range(k)], shards=k, fused=fused, tile_bytes=tile)
reqs = [(i, h.start, h.stop) for i, h in p.held_by(node) if not h.parity]
held, nread = read_shards(weights, spec, reqs)
for sw in held:
    if sw.layer >= fused:
        layer = spec.layers[sw.layer]
        run_rows(layer, np.ones(layer.in_shape, np.float32), sw.weight, sw.bias)
use = next(u for u in p.nodes if u.name == node)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
print(f"K={k} {node}: holds {sum(s.nbytes for s in held) / 1e6:.1f} MB, read {nread / 1e6:.1f} MB, "
      f"predicted peak {use.peak / 1e6:.1f} MB, VmHWM {hwm / 1e6:.1f} MB")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="yolov2")
    ap.add_argument("--weights", default="/tmp/yolov2.weights")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-memory", type=int, default=256, help="MiB every node offers (K=1: 1024) [256]")
    ap.add_argument("--node", action="append", default=None, help="node to measure (repeatable) [node0, node1]")
    args = ap.parse_args()
    if not Path(args.weights).exists():
        subprocess.run([sys.executable, "-m", "stealer", "weights", "--cfg", args.cfg, "--out", args.weights],
                       check=True)
    for k in args.k:
        mem = (1024 if k == 1 else args.max_memory) << 20
        for node in args.node or sorted({"node0", f"node{min(1, k - 1)}"}):
            subprocess.run([sys.executable, "-c", CHILD, args.cfg, args.weights, str(k), node, str(mem)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
