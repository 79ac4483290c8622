"""The Dask distributed baseline of ``bench/throughput.py``: the same FTP tasks, run by dask.

What a Python user would reach for instead of stealer: a dask scheduler on the gateway host, one
dask worker per host (``--nthreads 1``, in the host's CPU cgroup like a stealer node) and a
client on the camera's host that submits, per frame, one task per fused tile and a tail task
that depends on all of them. Processes (each inside an emulated host)::

    python -m distributed.cli.dask_scheduler --host IP0 --port 8786 --no-dashboard      # host 0
    python -m distributed.cli.dask_worker tcp://IP0:8786 --nthreads 1 --memory-limit 0 \\
        --no-dashboard --preload bench.dask_baseline --name hostK                     # every host
    python bench/dask_baseline.py --scheduler tcp://IP0:8786 --workers N --seed S \\
        --frames F --max-inflight K --out results.jsonl --stats stats.json           # camera host

Task graph per frame (the reuse variants, with dask dependencies carrying the reuse strips):

* the client cuts each tile's input region out of the frame (the reuse variant's region for a
  tile that borrows strips, the full region otherwise) and scatters the regions straight to the
  workers (``direct=True``, round-robin: dask's own placement);
* ``run_tile(task, region, *strips)`` runs the fused layers of one tile
  (:func:`stealer.ftp.execute.run_task`) and returns its output tile plus the strips it
  publishes, grouped by consumer; a consumer depends on one small ``pick`` task per producer,
  so only its own strips travel (dask moves them worker to worker);
* ``run_tail(*tiles)`` stitches the output tiles, runs the layers after the fused block and the
  region decoding, and returns the output's SHA-256 and the detections.

Because a consumer waits for its producers (a dependency), every reuse tile runs its reuse
variant: there is no fallback in dask. Weights are loaded once per worker, by the preload
(``dask_setup``), into a module global; tasks refer to it and never ship weights. The model is
named by environment variables (``STEALER_DASK_CFG``, ``STEALER_DASK_SEED``,
``STEALER_DASK_GRID``, ``STEALER_DASK_LAYERS``, ``STEALER_DASK_SCHEME``), the same for the client
and the workers. The client keeps ``--max-inflight`` frames in flight and writes one JSON line per
finished frame (``frame``, ``source``, ``latency``, ``released_at`` on the machine's monotonic
clock, ``output_sha256``), like the stealer gateway's ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stealer.ftp.execute import run_task  # noqa: E402
from stealer.ftp.geometry import relative  # noqa: E402
from stealer.ftp.plan import Plan, make_plan  # noqa: E402

_STATE: dict[str, Any] = {}
_LOCK = threading.Lock()


def model_env() -> dict[str, str]:
    """The model settings this process was started with (environment, with defaults)."""
    e = os.environ
    return {"cfg": e.get("STEALER_DASK_CFG", "yolov2"), "seed": e.get("STEALER_DASK_SEED", "0"),
            "grid": e.get("STEALER_DASK_GRID", "5x5"), "layers": e.get("STEALER_DASK_LAYERS", ""),
            "scheme": e.get("STEALER_DASK_SCHEME", "quad"), "codec": e.get("STEALER_DASK_CODEC", "raw"),
            "jpeg_quality": e.get("STEALER_DASK_JPEG_QUALITY", "90")}


def _net():
    """This process's network, loaded once (the preload calls it before the worker joins)."""
    with _LOCK:
        if "net" not in _STATE:
            from stealer.network import Network

            m = model_env()
            net = Network.from_random(m["cfg"], int(m["seed"]))
            net.warm_up()
            _STATE["net"] = net
            _STATE["counters"] = {"tiles_run": 0, "tails_run": 0, "busy_seconds": 0.0, "tile_seconds": 0.0,
                                  "tail_seconds": 0.0}
        return _STATE["net"]


def _plan() -> Plan:
    net = _net()
    with _LOCK:
        if "plan" not in _STATE:
            m = model_env()
            _STATE["plan"] = make_plan(net, m["grid"], int(m["layers"]) if m["layers"] else None, scheme=m["scheme"])
        return _STATE["plan"]


def dask_setup(worker: Any = None) -> None:
    """Worker preload: load the weights and build the plan once, before the worker joins."""
    t0 = time.perf_counter()
    _plan()
    _STATE["load_seconds"] = time.perf_counter() - t0


def _count(key: str, seconds: float) -> None:
    with _LOCK:
        c = _STATE["counters"]
        c[key + "s_run"] += 1
        c["busy_seconds"] += seconds
        c[key + "_seconds"] += seconds


def tile_input(net: Any, payload: dict[str, Any]) -> np.ndarray:
    """A tile's network input from what the client scattered: the camera pixels of its region
    (raw, or encoded as a stealer node's grant would be) made back into the float32 input, the
    way a stealer thief does it (:mod:`stealer.codec`, :func:`stealer.images.letterbox_region`)."""
    from stealer.codec import decode_jpeg, decode_pixels
    from stealer.images import letterbox_region, pixel_rect

    _, h, w = net.input_shape
    img_w, img_h, rect = payload["img_w"], payload["img_h"], payload["rect"]
    codec, data = payload["codec"], payload["data"]
    if codec == "raw":
        pixels = data
    elif codec == "jpeg":  # the whole frame's JPEG: decode, then crop the region's pixels
        py0, py1, px0, px1 = pixel_rect(rect, img_w, img_h, w, h)
        pixels = decode_jpeg(data, (net.input_shape[0], img_h, img_w))[:, py0:py1, px0:px1]
    else:
        pixels = decode_pixels(codec, data, payload["shape"])
    return letterbox_region(pixels, payload["origin"], img_w, img_h, w, h, rect)


def run_tile(task_id: int, payload: dict[str, Any], *strips: dict[int, np.ndarray]) -> dict[Any, Any]:
    """One fused tile: output tile under ``"out"``, published strips under their consumer's id."""
    t0 = time.perf_counter()
    net, plan = _net(), _plan()
    region = tile_input(net, payload)
    task = plan.task(task_id)
    borrowed = None
    if task.reuse is not None and task.consumes:
        merged: dict[int, np.ndarray] = {}
        for d in strips:
            merged.update(d)
        borrowed = {s: merged[s] for s in task.consumes}
    res = run_task(net, plan, task_id, region, borrowed, check=False)
    out: dict[Any, Any] = {"out": res.output}
    for sid, arr in res.published.items():
        out.setdefault(plan.strips[sid].consumer, {})[sid] = arr
    _count("tile", time.perf_counter() - t0)
    return out


def pick(result: dict[Any, Any], key: Any) -> Any:
    """One part of a tile's result (its output, or the strips of one consumer)."""
    return result[key]


def run_tail(img_w: int, img_h: int, *tiles: np.ndarray) -> dict[str, Any]:
    """Stitch the output tiles (in task-id order), run the remaining layers, decode boxes."""
    t0 = time.perf_counter()
    from stealer.layers import RegionSpec
    from stealer.region import detect

    net, plan = _net(), _plan()
    fused = np.empty(plan.output_shape, np.float32)
    out_map = plan.windows[-1].out_map()
    for task, tile in zip(sorted(plan.tasks, key=lambda t: t.id), tiles):
        fused[(slice(None),) + relative(task.output, out_map)] = tile
    y = net.forward(fused, start=plan.n_layers)
    digest = hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest()
    dets: list[dict[str, Any]] = []
    last = net.layers[-1]
    if isinstance(last, RegionSpec):
        shape = net.input_shape
        dets = [d.to_dict() for d in detect(y, last, img_w=img_w, img_h=img_h, net_w=shape[2], net_h=shape[1],
                                            thresh=0.24, nms=0.45)]
    seconds = time.perf_counter() - t0
    _count("tail", seconds)
    return {"output_sha256": digest, "detections": dets, "tail_seconds": round(seconds, 4)}


def worker_stats(dask_worker: Any = None) -> dict[str, Any]:
    """Counters of this worker process (``client.run``)."""
    with _LOCK:
        return dict(_STATE.get("counters", {}), load_seconds=_STATE.get("load_seconds"))


def scheduler_stats(dask_scheduler: Any = None) -> dict[str, Any]:
    stealing = dask_scheduler.extensions.get("stealing") if dask_scheduler is not None else None
    return {"steals": getattr(stealing, "count", None)}


# ----------------------------------------------------------------------------------- client
def tile_payloads(plan: Plan, pixels: np.ndarray, jpeg: bytes | None, codec: str,
                  net_shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Every tile's input as the client scatters it: the camera pixels its region is made from,
    in the run's frame codec, chosen per region exactly as a stealer source chooses for a grant
    (:func:`stealer.codec.grant_codec`), so that the two systems move the same bytes."""
    from stealer.codec import encode_pixels, grant_codec
    from stealer.images import pixel_rect

    _, h, w = net_shape
    img_h, img_w = pixels.shape[1], pixels.shape[2]
    out = []
    for t in plan.tasks:  # execution order
        rect = (t.reuse if t.reuse is not None else t.full).input_region
        py0, py1, px0, px1 = pixel_rect(rect, img_w, img_h, w, h)
        region = pixels[:, py0:py1, px0:px1]
        how = grant_codec(codec, region.nbytes, pixels.nbytes, jpeg is not None)
        data: Any = np.ascontiguousarray(region)
        if how == "jpeg":
            data = jpeg
        elif how != "raw":
            data = encode_pixels(how, region)
        out.append({"codec": how, "data": data, "rect": tuple(rect), "origin": (py0, px0),
                    "shape": tuple(region.shape), "img_w": img_w, "img_h": img_h})
    return out


def _submit_frame(client: Any, plan: Plan, payloads: list[dict[str, Any]], f: int, img_w: int, img_h: int
                  ) -> tuple[Any, list[Any]]:
    """Submit one frame's graph; returns the tail future and every future of the frame."""
    region_futs = client.scatter(payloads, direct=True, hash=False)
    tile: dict[int, Any] = {}
    strips: dict[tuple[int, int], Any] = {}
    outs: dict[int, Any] = {}
    keep: list[Any] = list(region_futs)
    for t, rf in zip(plan.tasks, region_futs):
        deps = []
        if t.reuse is not None:
            for p in sorted({plan.strips[s].producer for s in t.consumes}):
                deps.append(strips[(p, t.id)])
        fut = client.submit(run_tile, t.id, rf, *deps, key=f"tile-{f}-{t.id}", pure=False)
        tile[t.id] = fut
        for c in sorted({plan.strips[s].consumer for s in t.produces}):
            strips[(t.id, c)] = client.submit(pick, fut, c, key=f"strips-{f}-{t.id}-{c}", pure=False)
        outs[t.id] = client.submit(pick, fut, "out", key=f"out-{f}-{t.id}", pure=False)
    tail = client.submit(run_tail, img_w, img_h, *[outs[i] for i in sorted(outs)], key=f"tail-{f}", pure=False)
    keep += list(tile.values()) + list(strips.values()) + list(outs.values()) + [tail]
    return tail, keep


def client_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dask baseline client (see the module docstring)")
    ap.add_argument("--scheduler", required=True)
    ap.add_argument("--workers", type=int, required=True, help="wait for this many workers")
    ap.add_argument("--seed", type=int, default=0, help="synthetic feed seed")
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--max-inflight", type=int, default=4)
    ap.add_argument("--out", required=True, help="results, one JSON line per frame")
    ap.add_argument("--stats", help="per-worker counters and the scheduler's steal count, JSON")
    args = ap.parse_args(argv)

    from distributed import Client, as_completed

    from stealer.darknet import parse_cfg
    from stealer.codec import jpeg_frame
    from stealer.images import synthetic_pixels
    from stealer.network import resolve_cfg

    m = model_env()
    spec = parse_cfg(resolve_cfg(m["cfg"]))
    plan = make_plan(spec, m["grid"], int(m["layers"]) if m["layers"] else None, scheme=m["scheme"])
    shape = spec.input_shape
    client = Client(args.scheduler, timeout=600)
    client.wait_for_workers(args.workers, timeout=900)
    print(json.dumps({"event": "ready", "workers": len(client.scheduler_info()["workers"]),
                      "time": time.time()}), flush=True)
    source = f"dask/{args.seed}"
    started: dict[int, tuple[float, list[Any]]] = {}
    ac = as_completed()
    nxt = 0

    def submit_next() -> None:
        nonlocal nxt
        pixels, jpeg = synthetic_pixels(args.seed, nxt, shape), None
        t0 = time.monotonic()
        if m["codec"] == "jpeg":  # as a jpeg stealer source: encoded once, computed on decoded
            pixels, jpeg = jpeg_frame(pixels, int(m["jpeg_quality"]))
        payloads = tile_payloads(plan, pixels, jpeg, m["codec"], shape)
        tail, keep = _submit_frame(client, plan, payloads, nxt, shape[2], shape[1])
        started[nxt] = (t0, keep)
        ac.add(tail)
        nxt += 1

    with open(args.out, "a", buffering=1) as out:
        while nxt < min(args.frames, args.max_inflight):
            submit_next()
        done = 0
        for fut in ac:
            f = int(fut.key.rsplit("-", 1)[1])
            res = fut.result()
            now = time.monotonic()
            t0, keep = started.pop(f)
            out.write(json.dumps({"source": source, "frame": f, "latency": round(now - t0, 4),
                                  "released_at": round(now, 4), **res}) + "\n")
            del keep, fut
            done += 1
            if nxt < args.frames:
                submit_next()
            if done >= args.frames:
                break
    if args.stats:
        workers = client.run(worker_stats)
        sched = client.run_on_scheduler(scheduler_stats)
        Path(args.stats).write_text(json.dumps({"workers": workers, "scheduler": sched}))
    client.close()
    return 0


if __name__ == "__main__":
    # Run the client from the importable module, so that dask pickles the task functions by
    # reference (``bench.dask_baseline.run_tile``) and the workers use their preloaded globals;
    # functions of ``__main__`` would be pickled by value, each with a fresh copy of _STATE.
    import bench.dask_baseline as _module

    sys.exit(_module.client_main())
