"""Fused tile partitioning figures for YOLOv2's first 16 layers at 608x608.

For grids 2x2 ... 8x8, without reuse and with the default reuse scheme: executed FLOPs relative to
the full frame, the largest per-task working set, bytes moved per frame, and the measured
single-device time of running all tiles one after the other against one full-frame forward pass
(same kernels, so the ratio shows what tiling costs beyond its FLOPs). A second table compares the
reuse schemes by the planner's numbers (and a greedy 4-device simulation) to back the default.

Usage::

    python bench/ftp.py [--quick] [--repeat N] [--out bench/out/ftp.json]

DeepThings (5x5): 2.47x FLOPs without reuse, 1.49x with; 22.2 MiB per device against about
70 MiB unpartitioned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stealer.ftp.execute import run_frame, run_task  # noqa: E402
from stealer.ftp.geometry import relative  # noqa: E402
from stealer.ftp.plan import (BORROW_MODES, DEFAULT_BORROW, DEFAULT_SCHEME, SCHEMES, Plan, make_plan,  # noqa: E402
                              simulate)
from stealer.network import Network  # noqa: E402

MIB = 1 << 20
DEEPTHINGS: dict[str, Any] = {"flops_no_reuse": {2: 1.30, 3: 1.65, 4: 2.04, 5: 2.47, 6: 2.93},
              "flops_reuse": {2: 1.07, 3: 1.17, 4: 1.31, 5: 1.49}, "mib_per_device_5x5": 22.2}


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired_ratio(tiles, full, repeat: int) -> tuple[float, float, float]:
    """Time ``tiles`` and ``full`` alternately ``repeat`` times: (best tiles s, best full s, median
    of the per-pair ratios). Pairing keeps load from other processes from skewing one side only."""
    t_tiles, t_full, ratios = [], [], []
    for _ in range(repeat):
        tf = best_time(full, 1)
        tt = best_time(tiles, 1)
        t_tiles.append(tt)
        t_full.append(tf)
        ratios.append(tt / tf)
    return min(t_tiles), min(t_full), float(np.median(ratios))


def measured_peak(net: Network, plan: Plan, frame: np.ndarray, reuse: bool) -> int:
    """Largest tracemalloc peak of one task run (its buffers plus the kernels' own scratch, which
    is mostly the conv kernel's packed copy of one layer's weights), given input and strips included."""
    store: dict[int, np.ndarray] = {}
    worst = 0
    for task in plan.tasks:
        v = task.variant(reuse)
        tile_input = np.ascontiguousarray(frame[(slice(None),) + relative(v.input_region, plan.windows[0].in_map())])
        borrowed = {s: store.pop(s) for s in task.consumes} if reuse and task.reuse is not None else None
        given = tile_input.nbytes + sum(a.nbytes for a in (borrowed or {}).values())
        tracemalloc.start()
        try:
            res = run_task(net, plan, task.id, tile_input, borrowed, check=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        worst = max(worst, peak + given)
        if reuse:
            store.update(res.published)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="grids 2x2, 5x5 and 8x8 only, one timing run")
    ap.add_argument("--repeat", type=int, default=None, help="timing runs per figure, best kept [3; quick: 1]")
    ap.add_argument("--cfg", default="yolov2")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "ftp.json"))
    args = ap.parse_args(argv)
    grids = [2, 5, 8] if args.quick else list(range(2, 9))
    repeat = args.repeat or (1 if args.quick else 3)

    net = Network.from_random(args.cfg, seed=0)
    frame = np.random.default_rng(0).standard_normal(net.input_shape).astype(np.float32)
    n = args.layers
    net.forward(frame, 0, n)  # load the compiled kernels before timing
    t_full = best_time(lambda: net.forward(frame, 0, n), repeat)
    c, h, w = net.input_shape

    rows = []
    print(f"{args.cfg} layers 0-{n - 1} at {c}x{h}x{w}; full frame forward {t_full:.3f} s (best of {repeat}); "
          f"reuse scheme {DEFAULT_SCHEME}/{DEFAULT_BORROW}")
    head = (f"{'grid':>4} {'reuse':<6} {'FLOPs':>6} {'DT':>5} {'WS MiB':>6} {'+wts':>6} {'in MB':>6} {'ovl MB':>6} "
            f"{'out MB':>6} {'B/frame':>7} {'meas':>5} {'tiles s':>7} {'t/full':>6} {'sim4':>5}")
    print(head)
    for g in grids:
        for reuse in (False, True):
            plan = make_plan(net, (g, g), n, scheme=DEFAULT_SCHEME if reuse else "none")
            tot = plan.totals(reuse)
            res = run_frame(net, plan, frame, reuse=reuse, check=True)  # once with the coverage checks
            assert np.array_equal(res.output, net.forward(frame, 0, n)), "tiles differ from the full frame"
            peak = measured_peak(net, plan, frame, reuse)
            t_tiles, t_full_here, ratio = paired_ratio(
                lambda: run_frame(net, plan, frame, reuse=reuse, check=False), lambda: net.forward(frame, 0, n), repeat)
            dt = DEEPTHINGS["flops_reuse" if reuse else "flops_no_reuse"].get(g)
            row = {
                "grid": [g, g], "reuse": reuse, "scheme": plan.scheme, "borrow": plan.borrow,
                "flops_ratio": tot.flops_ratio, "deepthings_flops_ratio": dt,
                "max_working_set_mib": tot.max_working_set / MIB, "weights_mib": tot.weight_bytes / MIB,
                "measured_peak_mib": peak / MIB, "fallback_input_mb": tot.fallback_input_bytes / 1e6,
                "input_mb": tot.input_bytes / 1e6, "overlap_mb": tot.overlap_bytes / 1e6,
                "output_mb": tot.output_bytes / 1e6, "bytes_per_frame_mb": tot.bytes_per_frame / 1e6,
                "strips": len(plan.strips) if reuse else 0,
                "tiles_seconds": t_tiles, "full_seconds": t_full_here, "time_ratio": ratio,
                "makespan_4dev_4frames": simulate(plan, 4, reuse, frames=4),
            }
            rows.append(row)
            print(f"{g}x{g:<2} {('yes' if reuse else 'no'):<6} {row['flops_ratio']:>6.3f} "
                  f"{(f'{dt:.2f}' if dt else '-'):>5} {row['max_working_set_mib']:>6.2f} "
                  f"{row['max_working_set_mib'] + row['weights_mib']:>6.2f} {row['input_mb']:>6.2f} "
                  f"{row['overlap_mb']:>6.2f} {row['output_mb']:>6.2f} {row['bytes_per_frame_mb']:>7.2f} "
                  f"{row['measured_peak_mib']:>5.2f} {t_tiles:>7.3f} {row['time_ratio']:>6.2f} {row['makespan_4dev_4frames']:>5.2f}", flush=True)
    plan1 = make_plan(net, (1, 1), n)
    print(f"unpartitioned: {plan1.frame_working_set / MIB:.2f} MiB activations + {plan1.weight_bytes / MIB:.2f} MiB "
          f"weights = {(plan1.frame_working_set + plan1.weight_bytes) / MIB:.2f} MiB (DeepThings: about 70 MiB; "
          f"{DEEPTHINGS['mib_per_device_5x5']} MiB per device at 5x5)")
    print("DT = DeepThings' executed FLOPs; WS = largest per-task activations; +wts = with the fused weights; "
          "t/full = median of paired (tiles, full frame) timings; meas = measured peak MiB of the worst task (tracemalloc: buffers + kernel scratch, weights not counted); "
          "sim4 = makespan of 4 frames on 4 devices / ideal (FLOPs only; see plan.simulate)")

    # -------------------------------------------------------------- scheme comparison (planner numbers)
    print("\nreuse schemes (planner figures; time = measured tiles/full at 5x5 only)")
    print(f"{'grid':>4} {'scheme':<13} {'borrow':<6} {'phases':>6} {'FLOPs':>6} {'WS MiB':>6} {'B/frame':>7} "
          f"{'ovl MB':>6} {'strips':>6} {'maxdep':>6} {'sim2':>5} {'sim4':>5} {'sim6':>5} {'t/full':>6}")
    schemes = []
    for g in grids:
        for scheme in [s for s in SCHEMES if s != "none"]:
            for borrow in BORROW_MODES:
                plan = make_plan(net, (g, g), n, scheme=scheme, borrow=borrow)
                tot = plan.totals(True)
                t_ratio = None
                if g == 5:
                    t_ratio = paired_ratio(lambda: run_frame(net, plan, frame, check=False),
                                           lambda: net.forward(frame, 0, n), repeat)[2]
                row = {
                    "grid": [g, g], "scheme": scheme, "borrow": borrow,
                    "phases": len({t.phase for t in plan.tasks}), "flops_ratio": tot.flops_ratio,
                    "max_working_set_mib": tot.max_working_set / MIB, "bytes_per_frame_mb": tot.bytes_per_frame / 1e6,
                    "overlap_mb": tot.overlap_bytes / 1e6, "strips": len(plan.strips),
                    "max_producers": max(len(t.producers) for t in plan.tasks),
                    "sim": {d: simulate(plan, d, True, frames=4) for d in (2, 4, 6)}, "time_ratio": t_ratio,
                }
                schemes.append(row)
                print(f"{g}x{g:<2} {scheme:<13} {borrow:<6} {row['phases']:>6} {row['flops_ratio']:>6.3f} "
                      f"{row['max_working_set_mib']:>6.2f} {row['bytes_per_frame_mb']:>7.2f} {row['overlap_mb']:>6.2f} "
                      f"{row['strips']:>6} {row['max_producers']:>6} {row['sim'][2]:>5.2f} {row['sim'][4]:>5.2f} "
                      f"{row['sim'][6]:>5.2f} {(f'{t_ratio:.2f}' if t_ratio else '-'):>6}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.cfg, "layers": n, "input_shape": [c, h, w], "repeat": repeat,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "full_seconds": t_full, "default_scheme": DEFAULT_SCHEME, "default_borrow": DEFAULT_BORROW,
        "unpartitioned_mib": (plan1.frame_working_set + plan1.weight_bytes) / MIB,
        "deepthings": DEEPTHINGS, "rows": rows, "schemes": schemes,
    }, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
