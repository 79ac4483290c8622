"""``python -m stealer plan``: print the fused tile partition of one frame and what it costs.

Per task: its tile, phase, input region, executed FLOPs (as a share of the full frame), working
set and the overlap data it borrows and publishes; in total: executed FLOPs relative to the full
frame (with and without reuse), the largest per-task working set against the unpartitioned one,
and the bytes moved per frame (input tiles, overlap strips, output tiles). ``--json`` prints the
same figures plus the whole plan (:meth:`stealer.ftp.plan.Plan.to_dict`).

``--grid auto`` prints instead every candidate's predicted frames/s and latency on ``--nodes``
equal nodes (:mod:`stealer.ftp.auto`) and the one ``--objective`` / ``--latency-budget`` choose.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Sequence

from ..errors import PlanError
from .geometry import Rect, is_empty
from .plan import (AUTO_SCHEME, BORROW_MODES, DEFAULT_BORROW, DEFAULT_LINK_RATE, DEFAULT_NODE_SPEED, DEFAULT_SCHEME,
                   SCHEMES, DepthCandidate, Plan, Task, default_layers, depth_candidates, make_plan, parse_grid,
                   resolve_scheme, simulate)

MIB = 1 << 20


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an ``argparse`` subparsers object (sets ``func=run``)."""
    p = subparsers.add_parser("plan", help="fused tile partition of a frame: regions, FLOPs, memory, bytes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--model", metavar="PATH.onnx", default=None, help="an ONNX model instead of --cfg")
    p.add_argument("--grid", default="5x5",
                   help="tiles of the last fused layer's output, ROWSxCOLS, or auto: the candidates' "
                        "predictions for a cluster and the choice [5x5]")
    p.add_argument("--layers", type=int, default=None,
                   help="number of fused layers from layer 0 (any depth up to the first layer that cannot be "
                        "fused) [16 for YOLOv2 (or its conv/maxpool prefix if shorter); DAG models: chosen by cost]")
    p.add_argument("--reuse", action="store_true", help="order tasks for data reuse between neighbouring tiles")
    p.add_argument("--scheme", choices=[s for s in SCHEMES if s != "none"] + [AUTO_SCHEME], default=AUTO_SCHEME,
                   help=f"reuse order with --reuse [{AUTO_SCHEME}: {DEFAULT_SCHEME} for chains, wave for DAG blocks]")
    p.add_argument("--borrow", choices=BORROW_MODES, default=DEFAULT_BORROW,
                   help=f"what a producer lends: anything it computed, or its own share only [{DEFAULT_BORROW}]")
    p.add_argument("--size", metavar="WxH", default=None, help="override the cfg's input width x height")
    p.add_argument("--regions", action="store_true", help="also print every task's regions at every fused layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    auto = p.add_argument_group("--grid auto")
    auto.add_argument("--nodes", type=int, default=8, help="equal computing nodes, the source and gateway among them [8]")
    auto.add_argument("--node-gflops", type=float, default=None,
                      help="speed of each node, GFLOP/s [an emulated Pi's, 15.5]")
    auto.add_argument("--node-memory", type=int, default=0, metavar="BYTES",
                      help="memory each node offers for tasks [unlimited]")
    auto.add_argument("--frame-codec", choices=["raw", "zstd", "png", "jpeg"], default="raw",
                      help="how frames travel: the tile pixels' bytes are scaled by the codec's typical ratio [raw]")
    from ..cliargs import add_auto_args

    add_auto_args(auto)
    p.set_defaults(func=run)
    return p


def _load_spec(cfg: str, size: str | None) -> Any:
    from ..darknet import parse_cfg, parse_cfg_text
    from ..network import resolve_cfg

    path = resolve_cfg(cfg)
    if size is None:
        return parse_cfg(path)
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not m:
        raise PlanError(f"--size must look like 608x608 (width x height), got {size!r}")
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^\s*width\s*=.*$", f"width={m.group(1)}", text)
    text = re.sub(r"(?m)^\s*height\s*=.*$", f"height={m.group(2)}", text)
    return parse_cfg_text(text, str(path))


def _fmt_rect(r: Rect) -> str:
    return "-" if is_empty(r) else f"{r[0]}:{r[1]},{r[2]}:{r[3]}"


def summary(plan: Plan, reuse: bool, spec: Any = None, depth: list[DepthCandidate] | None = None,
            chosen_by: str = "") -> dict[str, Any]:
    """The figures ``plan`` prints, as plain data (also the top of ``--json``). ``spec``: the
    model (for the share of its FLOPs inside the block); ``depth``: the candidates the depth was
    chosen from, when it was chosen by cost."""
    t = plan.totals(reuse)
    plain = plan.totals(False)
    tasks = []
    for task in plan.tasks:
        v = task.variant(reuse)
        tasks.append({
            "id": task.id, "tile": list(task.tile), "phase": task.phase, "variant": v.kind,
            "output": list(task.output), "input_region": list(v.input_region),
            "flops": v.flops, "flops_share": v.flops / plan.frame_flops,
            "full_flops": task.full.flops, "full_input_region": list(task.full.input_region),
            "working_set": v.working_set, "full_working_set": task.full.working_set,
            "input_bytes": v.input_bytes, "full_input_bytes": task.full.input_bytes,
            "borrowed_bytes": v.borrowed_bytes if reuse else 0,
            "published_bytes": v.published_bytes if reuse else 0,
            "producers": list(task.producers) if reuse else [],
            "output_bytes": sum(plan.windows[o].out_bytes(r) for o, r in zip(plan.outputs, task.outputs)),
        })
    model_flops = sum(l.flops for l in spec.layers) if spec is not None else plan.frame_flops
    kinds: dict[str, int] = {}
    for w in plan.windows:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
    return {
        "source": plan.source, "input_shape": list(plan.input_shape),
        "layers": [plan.windows[0].index, plan.windows[-1].index], "output_shape": list(plan.output_shape),
        "outputs": [{"layer": o, "shape": list(plan.windows[o].out_shape)} for o in plan.outputs],
        "kinds": kinds, "model_flops": model_flops, "block_flops_fraction": plan.frame_flops / model_flops,
        "depth_chosen_by": chosen_by or ("cost" if depth else "--layers"),
        "depth_candidates": [{"layers": c.layers, "outputs": list(c.outputs), "block_flops": c.block_flops,
                              "executed_flops": c.executed_flops, "tail_flops": c.tail_flops,
                              "transfer_bytes": c.transfer_bytes, "seconds": c.seconds,
                              "block_seconds": c.block_seconds, "link_seconds": c.link_seconds,
                              "tail_seconds": c.tail_seconds} for c in depth or ()],
        "reuse_note": _REUSE_NOTE if reuse and not plan.is_chain else "",
        "grid": list(plan.grid), "reuse": reuse, "scheme": plan.scheme if reuse else "none",
        "borrow": plan.borrow, "phases": len({t.phase for t in plan.tasks}) if reuse else 1,
        "frame_flops": plan.frame_flops, "flops": t.flops, "flops_ratio": t.flops_ratio,
        "flops_ratio_without_reuse": plain.flops_ratio,
        "max_working_set": t.max_working_set, "weight_bytes": t.weight_bytes,
        "frame_working_set": plan.frame_working_set,
        "input_bytes": t.input_bytes, "fallback_input_bytes": t.fallback_input_bytes, "overlap_bytes": t.overlap_bytes, "output_bytes": t.output_bytes,
        "bytes_per_frame": t.bytes_per_frame, "strips": len(plan.strips) if reuse else 0,
        "makespan_4_devices": simulate(plan, 4, reuse, frames=4),
        "tasks": tasks,
    }


_REUSE_NOTE = ("reuse borrows conv and maxpool maps only; route, shortcut, upsample and yolo outputs are "
               "copies or pixel-wise maps of those, so a task rebuilds them from what it borrowed and computed "
               "(no reuse strips across them, and none are needed: the geometry of every kind is exact)")


def format_plan(plan: Plan, reuse: bool, regions: bool = False, spec: Any = None,
                depth: list[DepthCandidate] | None = None, chosen_by: str = "") -> str:
    """Human-readable tables of :func:`summary`."""
    s = summary(plan, reuse, spec, depth, chosen_by)
    c, h, w = plan.input_shape
    kinds = ", ".join(f"{n} {k}" for k, n in s["kinds"].items())
    outs = ", ".join(f"L{o['layer']} {'x'.join(map(str, o['shape']))}" for o in s["outputs"])
    lines = [
        f"{plan.source}: input {c}x{h}x{w}, fused layers {s['layers'][0]}-{s['layers'][1]} "
        f"({kinds}; {plan.frame_flops / 1e9:.2f} GFLOP, {100 * s['block_flops_fraction']:.1f}% of the model's "
        f"{s['model_flops'] / 1e9:.2f}), depth chosen by {s['depth_chosen_by']}",
        f"fused output{'s' if len(s['outputs']) > 1 else ''} {outs} (the grid cuts L{plan.grid_output}); "
        f"grid {plan.grid[0]}x{plan.grid[1]}, "
        + (f"reuse {plan.scheme}/{plan.borrow} ({s['phases']} phases, {s['strips']} strips)" if reuse else "no reuse"),
        f"{'task':>4} {'tile':>5} {'ph':>2} {'var':<5} {'output':<13} {'input region':<17} {'GFLOP':>6} "
        f"{'%frame':>6} {'full%':>6} {'WS MiB':>6} {'in KB':>7} {'borrow KB':>9} {'pub KB':>7}  producers",
    ]
    for task, d in zip(plan.tasks, s["tasks"]):
        lines.append(
            f"{task.id:>4} {task.tile[0]:>2},{task.tile[1]:<2} {task.phase:>2} {d['variant']:<5} "
            f"{_fmt_rect(task.output):<13} {_fmt_rect(tuple(d['input_region'])):<17} {d['flops'] / 1e9:>6.3f} "
            f"{100 * d['flops_share']:>6.2f} {100 * d['full_flops'] / plan.frame_flops:>6.2f} "
            f"{d['working_set'] / MIB:>6.2f} {d['input_bytes'] / 1e3:>7.1f} {d['borrowed_bytes'] / 1e3:>9.1f} "
            f"{d['published_bytes'] / 1e3:>7.1f}  {','.join(map(str, d['producers'])) or '-'}")
        if regions:
            lines.extend(_task_regions(plan, task, reuse))
    lines += [
        f"executed FLOPs: {s['flops'] / 1e9:.2f} GFLOP = {s['flops_ratio']:.3f}x the full frame"
        + (f" (without reuse {s['flops_ratio_without_reuse']:.3f}x)" if reuse else ""),
        f"largest per-task working set: {s['max_working_set'] / MIB:.2f} MiB activations + "
        f"{s['weight_bytes'] / MIB:.2f} MiB fused weights = {(s['max_working_set'] + s['weight_bytes']) / MIB:.2f} MiB "
        f"(unpartitioned: {s['frame_working_set'] / MIB:.2f} + {s['weight_bytes'] / MIB:.2f} = "
        f"{(s['frame_working_set'] + s['weight_bytes']) / MIB:.2f} MiB)",
        f"bytes per frame: input tiles {s['input_bytes'] / 1e6:.2f} MB + overlap {s['overlap_bytes'] / 1e6:.2f} MB + "
        f"output tiles {s['output_bytes'] / 1e6:.2f} MB = {s['bytes_per_frame'] / 1e6:.2f} MB"
        + (f" (input {s['fallback_input_bytes'] / 1e6:.2f} MB if every task ships its full region "
           "for the fallback)" if reuse else ""),
        f"simulated makespan, 4 devices, 4 frames: {s['makespan_4_devices']:.2f}x the ideal (FLOPs only)",
    ]
    if s["reuse_note"]:
        lines.append(s["reuse_note"])
    if depth:
        lines.append("depth candidates (predicted frame time: the tiles' makespan on a node each (node 0 the source "
                     "and the gateway) at "
                     f"{DEFAULT_NODE_SPEED / 1e9:.1f} GFLOP/s, reuse phases, pixels on the source's uplink, strips on "
                     f"each consumer's downlink and outputs on the gateway's, {DEFAULT_LINK_RATE / 1e6:g} MB/s each; "
                     "then the tail on the gateway), best first:")
        lines.append(f"  {'layers':>6} {'block%':>6} {'exec GFLOP':>10} {'tail GFLOP':>10} {'MB moved':>8} "
                     f"{'block s':>7} {'links s':>7} {'tail s':>7} {'s':>7}  outputs")
        for cand in depth[:8]:
            lines.append(f"  {cand.layers:>6} {100 * cand.block_flops / s['model_flops']:>6.1f} "
                         f"{cand.executed_flops / 1e9:>10.2f} {cand.tail_flops / 1e9:>10.2f} "
                         f"{cand.transfer_bytes / 1e6:>8.2f} {cand.block_seconds:>7.3f} {cand.link_seconds:>7.3f} "
                         f"{cand.tail_seconds:>7.3f} {cand.seconds:>7.3f}  {','.join(map(str, cand.outputs))}")
        deepest = max(depth, key=lambda c: c.layers)
        if deepest is not depth[0]:
            best = depth[0]
            lines.append(f"  why not deeper: the deepest block ({deepest.layers} layers, "
                         f"{100 * deepest.block_flops / s['model_flops']:.1f}%) takes {deepest.seconds:.3f} s, "
                         f"{deepest.block_seconds:.3f} s for its tiles ({deepest.link_seconds:.3f} s of it on links, "
                         f"{deepest.transfer_bytes / 1e6:.2f} MB moved) + {deepest.tail_seconds:.3f} s of tail; "
                         f"{best.layers} layers: {best.block_seconds:.3f} s + {best.tail_seconds:.3f} s")
    return "\n".join(lines)


def _task_regions(plan: Plan, task: Task, reuse: bool) -> list[str]:
    v = task.variant(reuse)
    out = [f"{'':>9} input {_fmt_rect(v.input_region)}"]
    for w, st in zip(plan.windows, v.steps):
        comp = " ".join(_fmt_rect(r) for r in st.computed) or "-"
        borrowed = " ".join(f"{plan.strips[i].producer}:{_fmt_rect(plan.strips[i].region)}" for i in st.borrowed)
        band = f" band {st.band}" if st.band else ""
        out.append(f"{'':>9} L{w.index:<2} {w.kind:<7} buffer {_fmt_rect(st.buffer):<17} compute {comp}"
                   + (f"  borrow {borrowed}" if borrowed else "") + band)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the ``plan`` subcommand; :class:`PlanError` (exit 2 in the main CLI) for bad arguments."""
    if args.model:
        if args.size is not None:
            raise PlanError("--size applies to a cfg; an ONNX model's input size is fixed in the file")
        from ..onnx_import import load_onnx

        spec = load_onnx(args.model).spec
    else:
        spec = _load_spec(args.cfg, args.size)
    if str(args.grid).strip().lower() == "auto":
        return _run_auto(args, spec)
    grid = parse_grid(args.grid)
    scheme = resolve_scheme(args.scheme, spec, args.layers) if args.reuse else "none"
    depth = None
    if args.layers is None and spec.flavour != "2017":  # DAG models: the cost model's choice, shown
        depth = depth_candidates(spec, grid, scheme)
    plan = make_plan(spec, grid, args.layers, scheme=scheme, borrow=args.borrow)
    chosen_by = "--layers" if args.layers is not None else ("cost" if depth else "DeepThings' default (16)")
    if args.json:
        out = summary(plan, args.reuse, spec, depth, chosen_by)
        out["plan"] = plan.to_dict()
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan, args.reuse, args.regions, spec, depth, chosen_by))
    return 0


def _run_auto(args: argparse.Namespace, spec: Any) -> int:
    from ..codec import TYPICAL_RATIO
    from .auto import DEFAULT_NODE_SPEED, Cluster, candidate_plans, choose, format_choice

    if args.nodes < 1:
        raise PlanError(f"--nodes must be at least 1, got {args.nodes}")
    speed = args.node_gflops * 1e9 if args.node_gflops else DEFAULT_NODE_SPEED
    # the source and the gateway on different nodes when there are two or more, as `stealer run` places them
    cluster = Cluster.equal(args.nodes, speed, args.link_mbit * 1e6 / 8, args.node_memory,
                            source=1 if args.nodes > 1 else 0, gateway=0,
                            pixel_ratio=TYPICAL_RATIO[args.frame_codec])
    budget = args.latency_budget / 1000.0 if args.latency_budget else None
    # the depth a grid-auto node uses (NodeState): --layers, else the default for a lone node's 1x1
    depth = args.layers or default_layers(spec, (1, 1))
    choice = choose(candidate_plans(spec, depth), cluster, args.objective, budget)
    if args.json:
        rows = [{"grid": list(p.grid), "scheme": p.scheme, "inflight": p.inflight, "fps": p.fps,
                 "latency": p.latency if p.feasible else None, "single_latency": p.single_latency if p.feasible else None,
                 "bound": p.bound, "why": p.why} for p in choice.predictions]
        b = choice.best
        json.dump({"objective": choice.objective, "latency_budget": budget, "within_budget": choice.within_budget,
                   "note": choice.note, "choice": {"grid": list(b.grid), "scheme": b.scheme, "inflight": b.inflight,
                                                   "fps": b.fps, "latency": b.latency},
                   "predictions": rows}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{spec.source}: {args.nodes} node(s) at {speed / 1e9:.1f} GFLOP/s, links {args.link_mbit:g} Mbit/s")
        print(format_choice(choice))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m stealer.ftp.cli``), same arguments as ``stealer plan``."""
    parser = argparse.ArgumentParser(prog="stealer-plan")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except PlanError as exc:
        print(f"stealer plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
