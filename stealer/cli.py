"""Command line: ``python -m stealer <command>``.

Commands
--------
infer    single-device inference on an image, a .npy tensor or a synthetic frame
weights  write deterministic random weights in darknet's format
info     per-layer FLOP, parameter and memory table of a cfg
plan     fused tile partition of a frame (see stealer.ftp)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from .errors import StealerError

log = logging.getLogger("stealer")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", default="yolov2",
                   help="darknet cfg path, or a built-in model: yolov2 (608), yolov2-tiny (416) [yolov2]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", help="darknet .weights file for the cfg")
    g.add_argument("--random-weights", type=int, metavar="SEED", default=None,
                   help="use deterministic random weights with this seed (the default when no --weights: 0)")


def _load_network(args: argparse.Namespace):
    from .network import Network

    if args.weights:
        return Network.from_darknet(args.cfg, args.weights)
    return Network.from_random(args.cfg, 0 if args.random_weights is None else args.random_weights)


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import load_input, synthetic_frame
    from .layers import RegionSpec
    from .region import detect

    t0 = time.perf_counter()
    net = _load_network(args)
    t_load = time.perf_counter() - t0
    shape = net.input_shape
    if args.input in (None, "synthetic") or str(args.input).startswith("synthetic:"):
        seed = int(str(args.input).split(":", 1)[1]) if args.input and ":" in args.input else 0
        x, img_w, img_h = synthetic_frame(seed, args.frame, shape), shape[2], shape[1]
        source = f"synthetic:{seed}#{args.frame}"
    else:
        x, img_w, img_h = load_input(args.input, shape)
        source = str(args.input)
    threads = args.threads or os.cpu_count() or 1
    timings = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kernel") as pool:
        for _ in range(max(1, args.repeat)):
            t1 = time.perf_counter()
            out = net.forward(x, executor=pool, threads=threads)
            timings.append(time.perf_counter() - t1)
    last = net.layers[-1]
    dets = []
    if isinstance(last, RegionSpec):
        dets = detect(out, last, img_w=img_w, img_h=img_h, net_w=shape[2], net_h=shape[1],
                      thresh=args.thresh, nms=args.nms)
    gflop = sum(l.flops for l in net.layers) / 1e9
    best = min(timings)
    result = {
        "source": source,
        "model": str(args.cfg),
        "model_hash": net.model_hash,
        "input_shape": list(shape),
        "load_seconds": round(t_load, 4),
        "forward_seconds": [round(t, 4) for t in timings],
        "gflop": round(gflop, 3),
        "gflops_per_second": round(gflop / best, 2),
        "threads": threads,
        "output_shape": list(out.shape),
        "detections": [d.to_dict() for d in dets],
    }
    if args.save_output:
        np.save(args.save_output, out)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"{source}: {len(net.layers)} layers, {gflop:.1f} GFLOP, forward {best * 1e3:.0f} ms "
          f"({gflop / best:.1f} GFLOP/s, {threads} threads), model loaded in {t_load:.2f} s")
    print(f"{len(dets)} detections (thresh {args.thresh}, nms {args.nms})")
    for d in dets[:20]:
        print(f"  class {d.cls:3d}  p={d.prob:.3f}  box=({d.left},{d.top})-({d.right},{d.bottom})")
    if not args.out:
        json.dump(result, sys.stdout)
        print()
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from .darknet import parse_cfg, random_weights, write_weights
    from .network import resolve_cfg

    spec = parse_cfg(resolve_cfg(args.cfg))
    n = write_weights(args.out, spec, random_weights(spec, args.seed))
    print(f"wrote {args.out}: {n} bytes, {spec.n_params()} parameters for {spec.source} (seed {args.seed})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .darknet import parse_cfg
    from .network import format_table, layer_table, resolve_cfg

    spec = parse_cfg(resolve_cfg(args.cfg))
    rows = layer_table(spec)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
    else:
        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stealer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="single-device inference")
    _add_model_args(p)
    p.add_argument("input", nargs="?", default=None,
                   help="image file (letterboxed), .npy (C,H,W) float32 tensor, or synthetic[:SEED] [synthetic]")
    p.add_argument("--frame", type=int, default=0, help="synthetic frame number [0]")
    p.add_argument("--thresh", type=float, default=0.24, help="detection threshold [0.24]")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold [0.45]")
    p.add_argument("--threads", type=int, default=0, help="kernel threads [all cores]")
    p.add_argument("--repeat", type=int, default=1, help="run the forward pass this many times [1]")
    p.add_argument("--out", help="write the result as JSON to this file (else to stdout)")
    p.add_argument("--save-output", metavar="NPY", help="save the last layer's output tensor")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("weights", help="write deterministic random weights in darknet format")
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .weights file")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("info", help="per-layer FLOP, parameter and memory table")
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    try:
        from .ftp import cli as ftp_cli
    except ImportError:  # pragma: no cover - stealer.ftp is part of the package
        ftp_cli = None
    if ftp_cli is not None and hasattr(ftp_cli, "add_parser"):
        ftp_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except StealerError as exc:
        print(f"stealer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
