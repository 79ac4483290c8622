"""Command line: ``python -m stealer <command>``.

Commands
--------
infer    single-device inference on an image, a .npy tensor or a synthetic frame
weights  write deterministic random weights in darknet's format
info     per-layer FLOP, parameter and memory table of a cfg
plan     fused tile partition of a frame (see stealer.ftp)
place    which node holds which layers, shards and tiles, by memory (see stealer.placement)
status   a table of running nodes, read from their --metrics endpoints
dashboard-url  the URL of a node's --http dashboard, with its token
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Sequence

from .cliargs import add_auto_args, add_codec_args, add_model_args, add_shard_args, load_network, parse_grid_or_auto
from .errors import StealerError
from .launcher import add_run_args, cmd_run

log = logging.getLogger("stealer")


def _inflight_arg(text: str) -> int:
    """``--max-inflight``: a count of frames, or ``auto`` (0)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--max-inflight must be at least 1 (or 'auto')")
    return value


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import load_input, synthetic_frame

    t0 = time.perf_counter()
    net = load_network(args)
    t_load = time.perf_counter() - t0
    shape = net.input_shape
    if args.input in (None, "synthetic") or str(args.input).startswith("synthetic:"):
        seed = int(str(args.input).split(":", 1)[1]) if args.input and ":" in args.input else 0
        x = synthetic_frame(seed, args.frame, shape, args.frame_codec, args.jpeg_quality)
        img_w, img_h = shape[2], shape[1]
        source = f"synthetic:{seed}#{args.frame}"
    elif args.frame_codec == "jpeg" and not str(args.input).lower().endswith(".npy"):
        x, img_w, img_h = _jpeg_input(args.input, shape, args.jpeg_quality)
        source = str(args.input)
    else:
        x, img_w, img_h = load_input(args.input, shape)
        source = str(args.input)
    if args.frame_codec == "jpeg":
        source += f" (as JPEG, quality {args.jpeg_quality})"
    threads = args.threads or os.cpu_count() or 1
    timings = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kernel") as pool:
        for _ in range(max(1, args.repeat)):
            t1 = time.perf_counter()
            outs = net.outputs(x, executor=pool, threads=threads)  # every yolo head, or the last layer
            timings.append(time.perf_counter() - t1)
    out = outs[-1]
    dets = net.detect(outs, img_w=img_w, img_h=img_h, thresh=args.thresh, nms=args.nms)
    gflop = sum(l.flops for l in net.layers) / 1e9
    best = min(timings)
    result = {
        "source": source,
        "model": str(args.model or args.cfg),
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
    top = []
    if out.ndim == 1 and len(outs) == 1:  # a classifier (an ONNX graph's (1, classes) output): its best scores
        top = [(int(i), float(out[i])) for i in np.argsort(-out, kind="stable")[:5]]
        result["top5"] = [list(t) for t in top]
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
    if top:
        print("top-5 classes (score): " + ", ".join(f"{i} ({v:.4g})" for i, v in top))
    if not args.out:
        json.dump(result, sys.stdout)
        print()
    return 0


def _jpeg_input(path: str, shape: tuple[int, int, int], quality: int) -> tuple[Any, int, int]:
    """An image file as a ``--frame-codec jpeg`` source computes on it: the decode of its own
    bytes for a .jpg file, else of its pixels encoded at ``quality``; letterboxed."""
    from pathlib import Path

    from .codec import jpeg_frame
    from .images import letterbox, load_pixels, to_float
    from .sources import JPEG_SUFFIXES

    p = Path(path)
    pixels = load_pixels(p)
    jpeg = p.read_bytes() if p.suffix.lower() in JPEG_SUFFIXES else None
    pixels, _ = jpeg_frame(pixels, quality, jpeg)
    return letterbox(to_float(pixels), shape[2], shape[1]), pixels.shape[2], pixels.shape[1]


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

    if args.model:
        from .onnx_import import load_onnx

        spec = load_onnx(args.model).spec
    else:
        spec = parse_cfg(resolve_cfg(args.cfg))
    rows = layer_table(spec)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
    else:
        print(format_table(rows))
    return 0


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None


def _parse_peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def add_node_args(p: argparse.ArgumentParser) -> None:
    """Options of ``stealer node`` (``stealer run`` passes them through)."""
    add_model_args(p)
    p.add_argument("--gateway", action="store_true", help="this node is the gateway")
    p.add_argument("--gateway-standby", action="store_true",
                   help="take over as gateway if the gateway dies (give it --out too)")
    p.add_argument("--source", action="append", default=[], metavar="FEED",
                   help="a frame feed: synthetic[:SEED], images:DIR, video:PATH, camera:N (repeatable)")
    p.add_argument("--grid", type=parse_grid_or_auto, default=(5, 5),
                   help="tile grid RxC, or auto: chosen for the cluster, again as nodes come and go [5x5]")
    add_auto_args(p)
    p.add_argument("--layers", type=int, default=None,
                   help="fused layers from layer 0, any depth up to the first layer that cannot be fused "
                        "[16 for YOLOv2; DAG models: chosen by cost, see `stealer plan`]")
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument("--reuse", dest="scheme", action="store_const", const="auto",
                       help="data-reuse-aware tiles (default; the scheme 'auto': quad for chains, wave for DAG "
                            "blocks)")
    reuse.add_argument("--no-reuse", dest="scheme", action="store_const", const="none")
    reuse.add_argument("--scheme", dest="scheme", choices=["none", "checkerboard", "quad", "wave", "auto"])
    p.set_defaults(scheme="auto")
    p.add_argument("--frames", type=int, default=None, help="frames per source [unbounded]")
    p.add_argument("--fps", type=float, default=None, help="frame rate per source [as fast as the cluster goes]")
    p.add_argument("--max-inflight", type=_inflight_arg, default=0, metavar="N|auto",
                   help="frames per source in flight [auto: the computing nodes known + 2, shared by this "
                        "node's sources]")
    p.add_argument("--deadline", type=float, default=None, metavar="MS",
                   help="real-time mode: finish each frame's tiles within MS milliseconds (missing tiles are "
                        "marked); under overload drop the oldest unstarted frames. Without it nothing is dropped")
    p.add_argument("--slots", type=int, default=1, help="tasks computed at once [1]")
    p.add_argument("--max-memory", type=_parse_size, default=None,
                   help="memory offered for tasks, e.g. 512M [what the device has]")
    p.add_argument("--policy", choices=["steal", "share"], default="steal")
    add_shard_args(p)
    p.add_argument("--no-speculate", dest="speculate", action="store_false",
                   help="never run copies of straggling tasks")
    p.add_argument("--no-direct-outputs", dest="direct_outputs", action="store_false",
                   help="send every tile's output to the gateway (by default, with several frames in flight, a "
                        "tile's output stays on the node that made it and the tail's runner fetches it: one "
                        "link instead of two)")
    p.add_argument("--out", help="gateway (or standby): append results as JSON lines to this file")
    p.add_argument("--host", default="0.0.0.0", help="listen address [0.0.0.0]")
    p.add_argument("--port", type=int, default=0, help="listen port [any free]")
    p.add_argument("--interface", action="append", default=None, help="mDNS on this interface/IP only")
    p.add_argument("--loopback", action="store_true", help="mDNS on 127.0.0.1 only (several nodes on one host)")
    p.add_argument("--no-discovery", action="store_true", help="no mDNS; use --peer")
    p.add_argument("--peer", action="append", type=_parse_peer, default=[], metavar="HOST:PORT",
                   help="connect to this peer directly (repeatable)")
    p.add_argument("--thresh", type=float, default=0.24)
    p.add_argument("--nms", type=float, default=0.45)
    p.add_argument("--exit-when-done", action="store_true",
                   help="sources: exit once their frames are finished; gateway: after --expect results")
    p.add_argument("--expect", type=int, default=None, help="gateway: exit after this many results")
    p.add_argument("--stats", help="write this node's statistics as JSON here at exit")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish work at SIGTERM [30]")
    add_codec_args(p)
    from .config import add_limit_args, add_security_args

    add_security_args(p)
    add_limit_args(p)
    from .fleet import add_config_arg
    from .logs import add_log_format_arg
    from .metrics import add_metrics_arg

    add_metrics_arg(p)
    from .outputs.mqtt import add_mqtt_args

    add_mqtt_args(p)
    from .dashboard import add_http_arg

    add_http_arg(p)
    from .outputs.mjpeg_args import add_mjpeg_arg
    from .outputs.video import add_video_args

    add_mjpeg_arg(p)
    add_video_args(p)
    add_log_format_arg(p)
    add_config_arg(p)


def cmd_node(args: argparse.Namespace) -> int:
    from ._signals import EARLY_STOP as early_stop, remember_stop_requests

    # A stop request during start-up (model loading, kernel warm-up) must still end cleanly:
    # note it now (python -m stealer node already did, before its imports), act on it once the
    # event loop runs.
    remember_stop_requests()
    from .node import Node, NodeConfig, default_memory, install_signal_handlers
    from .discovery import new_node_id
    from .sources import open_source
    from .wire import run

    from .config import limits_from_args
    from .errors import ConfigError
    from .wire import load_secret

    secret = load_secret(args.secret_file)  # SecretError -> one clear line, exit 2
    if args.authenticate_frames and secret is None:
        raise ConfigError("--authenticate-frames needs a cluster secret (--secret-file or STEALER_SECRET)")
    limits = limits_from_args(args)
    from .outputs.mqtt import mqtt_config_from_args

    mqtt = mqtt_config_from_args(args)  # ConfigError (a bad topic, an unreadable password file): one line, first
    from .outputs.video import video_config_from_args

    video = video_config_from_args(args)  # ConfigError (no OpenCV, not .avi/.mp4): one line, before the model loads
    if args.max_memory is not None:
        from .sysmem import return_large_blocks

        # a promised bound: freed big buffers go back to the system at once (see stealer.sysmem)
        return_large_blocks()
    shard_weights, held = None, 0
    if args.pipeline:  # pipeline stages are shard mode with every layer whole (K = 1)
        if args.shards > 1 or args.coded:
            raise ConfigError("--pipeline places whole layers: not with --shards K > 1 or --coded")
        args.shards = 1
    if args.shards:  # only the fused block's weights now; the gateway assigns the shards
        from .node.shards import load_shard_node

        net, shard_weights, held, computes = load_shard_node(args)
        if args.coded and args.shards < 2:
            raise ConfigError("--coded needs --shards 2 or more (a parity of one shard is a copy)")
    else:
        if args.coded:
            raise ConfigError("--coded needs --shards K")
        net = load_network(args)
    from .ftp.plan import resolve_scheme

    args.scheme = resolve_scheme(args.scheme, net.spec, args.layers)  # every node of one model alike
    sources = [open_source(s) for s in args.source]
    grid_auto = args.grid == "auto"
    cfg = NodeConfig(
        node_id=new_node_id(), host=args.host, port=args.port, gateway=args.gateway,
        standby=args.gateway_standby, sources=sources,
        grid=(1, 1) if grid_auto else args.grid, layers=args.layers, scheme=args.scheme,
        grid_auto=grid_auto, objective=args.objective,
        latency_budget=args.latency_budget / 1000.0 if args.latency_budget else None,
        link_rate=args.link_mbit * 1e6 / 8, frames=args.frames, fps=args.fps,
        max_inflight=args.max_inflight, slots=args.slots,
        deadline=args.deadline / 1000.0 if args.deadline else None,
        max_memory=args.max_memory if args.max_memory is not None else default_memory(),
        policy=args.policy, speculate=args.speculate, direct_outputs=args.direct_outputs, out=args.out,
        discovery=not args.no_discovery, loopback=args.loopback,
        interfaces=args.interface, peers=args.peer, thresh=args.thresh, nms=args.nms,
        limits=limits, secret=secret, authenticate_frames=args.authenticate_frames,
        frame_codec=args.frame_codec, jpeg_quality=args.jpeg_quality,
    )
    if args.shards:
        cfg.shards, cfg.coded, cfg.weights_file = args.shards, args.coded, shard_weights
        cfg.pipeline = args.pipeline
        cfg.slots = cfg.slots if computes else 0
        if not computes:
            log.warning("--max-memory %d B is below what one tile needs: this node holds and computes shards only",
                        cfg.max_memory)
    cfg.metrics = args.metrics
    cfg.mqtt = mqtt
    if cfg.mqtt is not None and not (args.gateway or args.gateway_standby):
        log.warning("--mqtt: only the gateway (or a standby once it takes over) publishes results; ignored here")
    cfg.http = args.http
    cfg.mjpeg = args.mjpeg
    cfg.video = video
    for name, value in (("--mjpeg", cfg.mjpeg), ("--video-out", cfg.video)):
        if value is not None and not (args.gateway or args.gateway_standby):
            log.warning("%s: only the gateway (or a standby once it takes over) has annotated frames; ignored here",
                        name)
    from .logs import set_log_node

    set_log_node(cfg.node_id)  # every JSON log line of this process names its node

    if cfg.max_memory and not args.shards:  # shard mode holds no tail weights to drop
        from .ftp.auto import candidate_plans
        from .ftp.plan import default_layers, make_plan
        from .node import memory_needs

        # the depth the node will use (unset: the same default it resolves in NodeState)
        depth = cfg.layers or default_layers(net.spec, (1, 1) if grid_auto else cfg.grid, cfg.scheme)
        if grid_auto:  # the candidate with the smallest tiles: the planner leaves out what does not fit
            plan = min(candidate_plans(net.spec, depth), key=lambda c: c.tile_memory).plan
        else:
            plan = make_plan(net, cfg.grid, depth, scheme=cfg.scheme)
        tile, tail = memory_needs(net, plan)
        if cfg.max_memory < tile:
            log.warning("--max-memory %d B is below what one tile needs (%d B): this node computes nothing",
                        cfg.max_memory, tile)
            cfg.slots = 0
        elif cfg.max_memory < tile + tail and not (args.gateway or args.gateway_standby):
            freed = net.drop_weights(plan.n_layers)
            log.warning("--max-memory %d B fits tiles (%d B) but not the tail layers (%d B more): serving "
                        "tiles only, %d B of tail weights released", cfg.max_memory, tile, tail, freed)

    async def main() -> int:
        import asyncio

        stop = asyncio.Event()
        install_signal_handlers(stop)
        if early_stop:
            stop.set()
        def emit(event: dict) -> None:
            print(json.dumps(event), flush=True)

        async with Node(net, cfg, on_event=emit) as node:
            if early_stop:
                stop.set()
            print(json.dumps({"event": "listening", "node_id": node.id, "port": node.port,
                              "role": node.role, "model_hash": net.model_hash,
                              **({"metrics_port": node.metrics.port} if node.metrics else {}),
                              **({"http_port": node.dashboard.port} if node.dashboard else {}),
                              **({"mjpeg_port": node.mjpeg.port or (node.dashboard.port if node.dashboard else 0)}
                                 if node.mjpeg else {})}), flush=True)
            # futures of different results (stop.wait() gives True, the others None); only
            # which finishes first matters
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
            if args.exit_when_done and sources:
                waits.append(asyncio.ensure_future(node.wait_sources_done()))
            if (args.gateway or args.gateway_standby) and args.expect is not None:
                async def enough() -> None:
                    while node.stats.frames_done < args.expect:
                        await node.results.get()
                waits.append(asyncio.ensure_future(enough()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            await node.drain(args.drain_timeout)
            stats = dict(node.stats.__dict__, node_id=node.id, role=node.role)
            if args.shards:
                stats["weights_bytes"] = held
        if args.stats:
            with open(args.stats, "w") as fh:
                json.dump(stats, fh)
        return 0

    return run(main())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stealer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="single-device inference")
    add_model_args(p)
    p.add_argument("input", nargs="?", default=None,
                   help="image file (letterboxed), .npy (C,H,W) float32 tensor, or synthetic[:SEED] [synthetic]")
    p.add_argument("--frame", type=int, default=0, help="synthetic frame number [0]")
    p.add_argument("--thresh", type=float, default=0.24, help="detection threshold [0.24]")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold [0.45]")
    p.add_argument("--threads", type=int, default=0, help="kernel threads [all cores]")
    p.add_argument("--repeat", type=int, default=1, help="run the forward pass this many times [1]")
    p.add_argument("--out", help="write the result as JSON to this file (else to stdout)")
    p.add_argument("--save-output", metavar="NPY", help="save the last layer's output tensor")
    add_codec_args(p, what="the frame reaches the cluster (jpeg: infer on the decoded JPEG, the reference of a "
                           "--frame-codec jpeg cluster; the lossless codecs change nothing)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("run", help="a whole cluster on this machine, checked against single-device inference")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("node", help="run a cluster node (the daemon)")
    add_node_args(p)
    p.set_defaults(func=cmd_node)

    from .metrics import add_status_parser

    add_status_parser(sub)
    from .dashboard import add_dashboard_url_parser

    add_dashboard_url_parser(sub)

    p = sub.add_parser("weights", help="write deterministic random weights in darknet format")
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .weights file")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("info", help="per-layer FLOP, parameter and memory table")
    p.add_argument("--cfg", default="yolov2", help="cfg path or built-in model name [yolov2]")
    p.add_argument("--model", metavar="PATH.onnx", default=None, help="an ONNX model instead of --cfg")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from .placement import add_place_parser

    add_place_parser(sub)

    ftp_cli: ModuleType | None  # None only in a broken install: then there is no plan command
    try:
        from .ftp import cli as ftp_cli
    except ImportError:  # pragma: no cover - stealer.ftp is part of the package
        ftp_cli = None
    if ftp_cli is not None and hasattr(ftp_cli, "add_parser"):
        ftp_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .fleet import parse_args
    from .logs import configure_logging

    parser = build_parser()
    try:
        args = parse_args(parser, argv)  # with --config FILE: the file's options under the command line's
    except StealerError as exc:
        print(f"stealer: error: {exc}", file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging(level, getattr(args, "log_format", "auto"))
    try:
        return int(args.func(args) or 0)
    except StealerError as exc:
        print(f"stealer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
