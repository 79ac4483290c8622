"""``python -m stealer run``: a whole cluster on this machine, as separate processes.

Starts a gateway and ``--nodes - 1`` more nodes on 127.0.0.1 (they find each other by mDNS),
puts the synthetic sources on the nodes, shows a live progress line, prints a final table and
checks every frame's result against single-device inference of the same frame (the output's
SHA-256 must match bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .cliargs import (add_auto_args, add_codec_args, add_model_args, add_shard_args, auto_argv, codec_argv,
                      load_network, model_argv, parse_grid_or_auto)
from .errors import StealerError


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _check_layers(args: argparse.Namespace) -> None:
    """Refuse a ``--layers`` that is no block boundary here, with the nodes' own message, rather
    than start processes that all stop at once."""
    if args.layers is None:
        return
    from .darknet import parse_cfg
    from .errors import ConfigError
    from .ftp.plan import max_fused_layers
    from .network import resolve_cfg

    spec = parse_cfg(resolve_cfg(args.cfg))
    most = max_fused_layers(spec)
    if not 1 <= args.layers <= most:
        bad = spec.layers[most] if most < len(spec.layers) else None
        raise ConfigError(f"--layers {args.layers}: a fused block holds 1 to {most} leading layers of this model"
                          + (f" (layer {bad.index} is a {bad.kind}, which cannot be in a fused block)"
                             if bad is not None else ""))


def cmd_run(args: argparse.Namespace) -> int:
    from .outputs.video import video_config_from_args

    video_config_from_args(args)  # no OpenCV, a bad name: one line now, not in the gateway's log
    _check_layers(args)
    nodes = max(1, args.nodes)
    n_sources = max(1, args.sources)
    total = n_sources * args.frames
    work = Path(tempfile.mkdtemp(prefix="stealer-run-"))
    results_path = work / "results.jsonl"
    grid = "auto" if args.grid == "auto" else f"{args.grid[0]}x{args.grid[1]}"
    common = model_argv(args) + ["--grid", grid, "--scheme", args.scheme, "--policy", args.policy,
                                  "--max-inflight", str(args.max_inflight)] + auto_argv(args)
    if args.layers:
        common += ["--layers", str(args.layers)]
    if args.pipeline:  # every node in shard mode, the tail in pipeline stages
        common += ["--pipeline", str(args.pipeline)]
    elif args.shards:  # every node in shard mode: none loads the whole model
        common += ["--shards", str(args.shards)] + (["--coded"] if args.coded else [])
    common += codec_argv(args) + ["--loopback", "--host", "127.0.0.1"]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    # sources go on the non-gateway nodes first (the gateway also runs the tails)
    hosts = list(range(1, nodes)) or [0]
    placement: dict[int, list[int]] = {}
    for s in range(n_sources):
        placement.setdefault(hosts[s % len(hosts)], []).append(s)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    t_start = time.monotonic()
    try:
        for i in range(nodes):
            argv = [sys.executable, "-m", "stealer", "node", *common, "--stats", str(work / f"node{i}.json"),
                    "--slots", str(args.slots)]
            if i == 0:
                argv += ["--gateway", "--out", str(results_path), "--expect", str(total), *gateway_outputs_argv(args)]
            for s in placement.get(i, []):
                argv += ["--source", f"synthetic:{args.seed + s}", "--frames", str(args.frames)]
            log = open(work / f"node{i}.log", "wb")
            procs.append((f"node{i}", subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       start_new_session=True)))
        results = _follow(results_path, total, procs, args.timeout, t_start, quiet=args.quiet)
        elapsed = time.monotonic() - t_start
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    stats = []
    for i in range(nodes):
        f = work / f"node{i}.json"
        stats.append(json.loads(f.read_text()) if f.exists() else {})
    _print_table(results, stats, elapsed, total)
    ok = len(results) == total
    if not ok:
        print(f"only {len(results)} of {total} frames finished; logs in {work}", file=sys.stderr)
    if args.verify and results:
        seeds = _source_seeds(work, nodes, placement, args.seed)
        bad = _verify(args, results, seeds)
        if bad:
            print(f"MISMATCH: {bad} frame(s) differ from single-device inference", file=sys.stderr)
            ok = False
        else:
            print(f"verified: all {len(results)} results equal single-device inference bit for bit")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "nodes": stats, "seconds": elapsed}, indent=1))
    return 0 if ok else 1


def _follow(path: Path, total: int, procs: list[tuple[str, subprocess.Popen[bytes]]], timeout: float,
            t_start: float, *, quiet: bool) -> list[dict[str, Any]]:
    """Read the gateway's result lines as they come, with a live progress line."""
    results: list[dict[str, Any]] = []
    pos = 0
    first_at: float | None = None
    shown = -1
    while len(results) < total:
        if time.monotonic() - t_start > timeout:
            print(f"\ntimed out after {timeout:.0f} s", file=sys.stderr)
            break
        dead = [name for name, p in procs if p.poll() is not None]
        if dead and len(results) < total and "node0" in dead:
            print(f"\nthe gateway exited early (code {procs[0][1].returncode})", file=sys.stderr)
            break
        if path.exists():
            with open(path) as fh:
                fh.seek(pos)
                chunk = fh.read()
            lines = chunk.split("\n")
            for line in lines[:-1]:
                if line.strip():
                    results.append(json.loads(line))
            pos += len(chunk) - len(lines[-1])
            if results and first_at is None:
                first_at = time.monotonic()
        if not quiet and len(results) != shown:
            shown = len(results)
            fps = ""
            if first_at is not None and len(results) > 1:
                fps = f"  {(len(results) - 1) / max(1e-9, time.monotonic() - first_at):.2f} frames/s"
            lat = percentile([r["latency"] for r in results], 50)
            sys.stdout.write(f"\rframes {len(results)}/{total}{fps}  latency p50 {lat:.2f} s   ")
            sys.stdout.flush()
        # the results file is written by another process; a short wait between reads is the
        # cheapest portable way to follow it (this is the launcher, not a node's event loop)
        time.sleep(0.2)
    if not quiet:
        print()
    return results


def _print_table(results: list[dict[str, Any]], stats: list[dict[str, Any]], elapsed: float, total: int) -> None:
    lats = [r["latency"] for r in results]
    print(f"{len(results)}/{total} frames in {elapsed:.1f} s (including start-up)")
    if len(results) > 1:
        print(f"latency p50 {percentile(lats, 50):.3f} s  p99 {percentile(lats, 99):.3f} s")
    print(f"{'node':<6} {'role':<8} {'tiles':>6} {'tails':>6} {'stolen':>7} {'busy s':>8} {'fallbacks':>9} {'requeued':>8}")
    for i, s in enumerate(stats):
        if not s:
            print(f"node{i:<2} (no statistics: the process did not exit cleanly)")
            continue
        print(f"node{i:<2} {s.get('role', '?'):<8} {s['tiles_run']:>6} {s['tails_run']:>6} {s['stolen']:>7} "
              f"{s['busy_seconds']:>8.2f} {s['reuse_fallbacks']:>9} {s['requeued']:>8}")


def _source_seeds(work: Path, nodes: int, placement: dict[int, list[int]], seed: int) -> dict[str, int]:
    """Source id ("<node id>/<k>") -> synthetic seed, from each node's first output line."""
    seeds = {}
    for i in range(nodes):
        try:
            first = (work / f"node{i}.log").read_text().splitlines()
        except OSError:
            continue
        for line in first:
            if line.startswith("{") and '"listening"' in line:
                event = json.loads(line)
                if event.get("event") != "listening":
                    continue  # one of its JSON log lines (its stderr goes to the same file)
                node_id = event["node_id"]
                for k, s in enumerate(placement.get(i, [])):
                    seeds[f"{node_id}/{k}"] = seed + s
                break
    return seeds


def _verify(args: argparse.Namespace, results: list[dict[str, Any]], seeds: dict[str, int]) -> int:
    """Recompute every frame on this device and compare output digests; returns mismatches."""
    from .images import synthetic_frame
    from .network import output_digest

    net = load_network(args)
    bad = 0
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        for r in sorted(results, key=lambda r: (r["source"], r["frame"])):
            if r["source"] not in seeds:
                raise StealerError(f"cannot tell which feed {r['source']} was")
            # with jpeg, the frame the cluster computed on is the decoded JPEG
            frame = synthetic_frame(seeds[r["source"]], r["frame"], net.input_shape, args.frame_codec,
                                    args.jpeg_quality)
            outs = net.outputs(frame, executor=pool, threads=threads)  # every yolo head, or the last layer
            if output_digest(outs) != r["output_sha256"]:
                bad += 1
                print(f"frame {r['frame']} of {r['source']}: output differs", file=sys.stderr)
    return bad


def _address(host: str | None, port: int | None) -> str:
    host = f"[{host}]" if host and ":" in host else host or ""
    return f"{host}:{port}" if port is not None else host


def gateway_outputs_argv(args: argparse.Namespace) -> list[str]:
    """The gateway's outputs given to ``stealer run`` (``--http``, ``--metrics``, ``--mjpeg``,
    ``--video-out``, ``--mqtt*``), as ``stealer node`` takes them."""
    out: list[str] = []
    for flag, value in (("--http", args.http), ("--metrics", args.metrics), ("--mjpeg", args.mjpeg)):
        if value is not None:
            out += [flag, _address(*value)]
    if args.video_out is not None:
        out += ["--video-out", args.video_out, "--video-side", str(args.video_side)]
    if args.mqtt is not None:
        out += ["--mqtt", _address(*args.mqtt), "--mqtt-topic", args.mqtt_topic, "--mqtt-qos", str(args.mqtt_qos)]
        for flag, text in (("--mqtt-client-id", args.mqtt_client_id), ("--mqtt-username", args.mqtt_username),
                           ("--mqtt-password-file", args.mqtt_password_file), ("--mqtt-ca", args.mqtt_ca)):
            if text:
                out += [flag, text]
        if args.mqtt_tls:
            out.append("--mqtt-tls")
    return out


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--nodes", type=int, default=3, help="processes, the gateway included [3]")
    p.add_argument("--sources", type=int, default=1, help="synthetic sources [1]")
    p.add_argument("--frames", type=int, default=8, help="frames per source [8]")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed of the first source [0]")
    p.add_argument("--grid", type=parse_grid_or_auto, default=(5, 5), help="tile grid RxC, or auto [5x5]")
    add_auto_args(p)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--scheme", default="auto", choices=["none", "checkerboard", "quad", "wave", "auto"],
                   help="reuse scheme [auto: quad for chains, wave for DAG blocks]")
    p.add_argument("--policy", default="steal", choices=["steal", "share"])
    p.add_argument("--slots", type=int, default=1)
    add_shard_args(p)
    p.add_argument("--max-inflight", default="auto", help="frames per source in flight [auto]")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds [600]")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the check against single-device inference")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--out", help="write results and node statistics as JSON here")
    add_codec_args(p, what="the sources' frames travel to thieves")
    # the gateway's outputs, passed on to it as they are (see gateway_outputs_argv)
    from .dashboard import add_http_arg
    from .metrics import add_metrics_arg
    from .outputs.mjpeg_args import add_mjpeg_arg
    from .outputs.mqtt import add_mqtt_args
    from .outputs.video import add_video_args

    add_http_arg(p)
    add_metrics_arg(p)
    add_mjpeg_arg(p)
    add_video_args(p)
    add_mqtt_args(p)
