"""Runtime benchmark: steal round trip, per-task runtime overhead, and frames/s with 1..3 nodes.

    python bench/runtime.py [--quick] [--out bench/out/runtime.json]

1. Steal round trip (request sent -> task data in hand) on 127.0.0.1, p50/p99, for a small tile
   and a YOLOv2-608 5x5 tile, against a victim node with a full queue.
2. Runtime overhead per task: a gateway, a source and a thief with null compute (tasks are
   queued, stolen, shipped, handed to a compute thread and back, acknowledged and stitched, but
   no kernel runs), so the time per task is the runtime's own cost. Twice: all three in one
   event loop (one core and one GIL pay for every role), and as three processes (as on three
   devices, sharing this machine's 2 cores): wall time per task and CPU summed over the nodes.
3. End-to-end frames/s of YOLOv2-608 (5x5, reuse) with 1, 2 and 3 nodes under equal CPU quotas
   (the emulator's cgroups when root; else plain processes on loopback, which share 2 cores).

Anchors: Dask distributed ~1 ms scheduler overhead per task; DeepThings opens ~5 TCP connections
per stolen task and polls every 100 ms. Targets: steal p50 <= 1 ms for a 5x5 tile, overhead
<= 0.3 ms per task, 3 nodes >= 2.5x one node's frames/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stealer.discovery import new_node_id  # noqa: E402
from stealer.network import Network, builtin_cfg  # noqa: E402
from stealer.node import Node, NodeConfig  # noqa: E402
from stealer.images import synthetic_pixels, to_float  # noqa: E402
from stealer.sources import Frame, FrameSource, SyntheticSource  # noqa: E402
from stealer.wire import Hello, connect, run  # noqa: E402
from stealer.wire.messages import PROTOCOL_VERSION, StealReply, StealRequest  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def small_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=1)


async def steal_rtt(net: Network, grid: tuple[int, int], n: int) -> dict:
    cfg = NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=True, sources=[SyntheticSource(0)],
                     slots=0, discovery=False, grid=grid, max_inflight=1 << 20,
                     layers=9 if net.input_shape[1] < 200 else None)
    async with Node(net, cfg) as victim:
        while len(victim.queue) < n + 10:  # let the queue fill before timing
            await asyncio.sleep(0.05)
        hello = Hello(PROTOCOL_VERSION, new_node_id(), "worker", 0, 1, net.model_hash, 0)
        comm = await connect("127.0.0.1", victim.port, hello)
        times, nbytes = [], 0
        try:
            for rid in range(1, n + 1):
                t0 = time.perf_counter()
                await comm.send(StealRequest(rid))
                while True:
                    msg = await comm.recv()
                    if isinstance(msg, StealReply) and msg.request_id == rid:
                        break
                times.append(time.perf_counter() - t0)
                assert msg.granted
                # float32, camera pixels, or those encoded (--frame-codec)
                payload = next(a for a in (msg.data, msg.pixels, msg.encoded) if a is not None)
                nbytes = payload.nbytes
        finally:
            await comm.close()
    return {"tile_bytes": nbytes, "p50_ms": 1e3 * pct(times, 50), "p99_ms": 1e3 * pct(times, 99),
            "mean_ms": 1e3 * statistics.fmean(times), "steals": n}


class ReplaySource(FrameSource):
    """One synthetic frame, made once and sent again under new frame numbers: making frames
    is the camera's work (a 96x96 synthetic frame costs about 1 ms here, 0.04 ms per task of
    this benchmark), not the runtime's, so the overhead runs do not count it."""

    spec = "replay"

    def frames(self, shape: tuple[int, int, int]):
        pixels = synthetic_pixels(0, 0, shape)
        data = to_float(pixels)
        n = 0
        while True:
            yield Frame(n, shape[2], shape[1], data, pixels)
            n += 1


def _null_config(**kw: object) -> NodeConfig:
    return NodeConfig(node_id=new_node_id(), host="127.0.0.1", discovery=False, grid=(5, 5), layers=9,
                      null_compute=True, max_inflight=8, **kw)


async def overhead(net: Network, frames: int) -> dict:
    """Runtime overhead with a gateway, a source and a thief in one event loop (one core, one
    GIL for all three): wall seconds per task, each task paying for all three roles."""
    gw = Node(net, _null_config(gateway=True))
    await gw.start()
    thief = Node(net, _null_config(peers=[("127.0.0.1", gw.port)]))
    await thief.start()
    # the source meets both, as mDNS would have it (the thief would otherwise only see tails)
    src = Node(net, _null_config(sources=[ReplaySource()], frames=frames,
                                 peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)]))
    await asyncio.sleep(0.2)
    t0, c0 = time.perf_counter(), time.process_time()
    await src.start()
    for _ in range(frames):
        await gw.results.get()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    tasks = sum(n.stats.tiles_run + n.stats.tails_run for n in (gw, src, thief))
    stolen = sum(n.stats.stolen for n in (gw, src, thief))
    for n in (thief, src, gw):
        await n.close()
    return {"frames": frames, "tasks": tasks, "stolen": stolen, "seconds": elapsed,
            "per_task_ms": 1e3 * elapsed / tasks, "cpu_per_task_ms": 1e3 * cpu / tasks,
            "tasks_by_role": {r: n.stats.tiles_run + n.stats.tails_run for r, n in (("gateway", gw), ("source", src),
                                                                                    ("thief", thief))}}


async def _null_node(role: str, frames: int, peer_ports: list[int]) -> dict:
    """One node of :func:`overhead_processes`, in its own process: prints ``ready`` (with the
    port) once it can take work, and at the end the CPU seconds it spent from then on."""
    net = small_net()
    net.warm_up()  # kernels compiled before the CPU clock starts (Node.start only reloads them)
    joined = asyncio.Event()
    kw: dict = {"gateway": True} if role == "gateway" else {"peers": [("127.0.0.1", p) for p in peer_ports]}
    if role == "source":
        kw.update(sources=[ReplaySource()], frames=frames)
    cfg = _null_config(**kw)
    node = Node(net, cfg, on_event=lambda e: joined.set() if e["event"] == "peer-joined" else None)
    if role != "source":
        await node.start()
        if role == "thief":
            await joined.wait()
        print(json.dumps({"ready": True, "port": node.port}), flush=True)
    t0, c0 = time.time(), time.process_time()
    if role == "source":
        await node.start()
        await node.wait_sources_done()
    elif role == "gateway":
        for _ in range(frames):
            await node.results.get()
    else:  # thief: until the gateway leaves
        gone = asyncio.Event()
        node.on_event = lambda e: gone.set() if e["event"] == "peer-lost" else None
        await gone.wait()
    out = {"role": role, "t0": t0, "t1": time.time(), "cpu": time.process_time() - c0,
           "tasks": node.stats.tiles_run + node.stats.tails_run, "stolen": node.stats.stolen}
    if role == "gateway":  # stay until the source heard that its frames are done (stdin closes)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.close()
    return out


def overhead_processes(frames: int) -> dict:
    """Runtime overhead as deployed: gateway, source and thief in three processes (each with
    its own interpreter and GIL, as on three devices; here they share this machine's 2 cores).
    Per task: wall time from the first frame to the last result, and CPU seconds summed over
    the three nodes (the runtime's whole cost, wherever it is paid)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    me = [sys.executable, str(Path(__file__).resolve()), "--null-node"]

    def spawn(role: str, *ports: int) -> subprocess.Popen:
        return subprocess.Popen(me + [role, "--frames", str(frames), "--peer-ports", *map(str, ports)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    procs = [spawn("gateway")]
    try:
        port = json.loads(procs[0].stdout.readline())["port"]
        procs.append(spawn("thief", port))
        thief_port = json.loads(procs[1].stdout.readline())["port"]  # ready: connected to the gateway
        procs.append(spawn("source", port, thief_port))  # it meets both, as mDNS would have it
        outs = {}
        for p in (procs[2], procs[0], procs[1]):  # the gateway leaves when its stdin closes
            lines = [json.loads(line) for line in p.communicate(timeout=300)[0].splitlines() if line.strip()]
            last = lines[-1]
            outs[last["role"]] = last
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tasks = sum(o["tasks"] for o in outs.values())
    wall = outs["gateway"]["t1"] - outs["source"]["t0"]
    cpu = sum(o["cpu"] for o in outs.values())
    return {"frames": frames, "tasks": tasks, "stolen": sum(o["stolen"] for o in outs.values()),
            "seconds": wall, "per_task_ms": 1e3 * wall / tasks, "cpu_per_task_ms": 1e3 * cpu / tasks,
            "cpu_per_task_ms_by_role": {r: 1e3 * o["cpu"] / tasks for r, o in outs.items()},
            "tasks_by_role": {r: o["tasks"] for r, o in outs.items()}}


def cluster_fps(nodes: int, frames: int, cpu: float | None, grid: str, timeout: float) -> dict:
    """Run YOLOv2 on ``nodes`` processes; frames/s from the first to the last result."""
    from stealer.launcher import _follow

    work = Path(tempfile.mkdtemp(prefix="stealer-bench-"))
    results = work / "results.jsonl"
    # frames in flight: enough that every node has a tile or a tail to run (Little's law, as in
    # bench/throughput.py: the tail alone is about 3/5 of a frame's work)
    base = [sys.executable, "-m", "stealer", "node", "--cfg", "yolov2", "--random-weights", "0",
            "--grid", grid, "--scheme", "quad", "--max-inflight", str(nodes + 2)]
    argvs = []
    for i in range(nodes):
        argv = base + ["--stats", str(work / f"node{i}.json")]
        if i == 0:
            argv += ["--gateway", "--out", str(results), "--expect", str(frames)]
        if i == (1 if nodes > 1 else 0):
            argv += ["--source", "synthetic:0", "--frames", str(frames)]
        argvs.append(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = []
    cluster = None
    t0 = time.monotonic()
    try:
        if cpu is not None and os.geteuid() == 0:
            sys.path.insert(0, str(ROOT / "tools"))
            from tools.emulate import Cluster

            cluster = Cluster(nodes=nodes, cpu=cpu, rate=None)
            cluster.start()
            for i, argv in enumerate(argvs):
                log = open(work / f"node{i}.log", "wb")
                procs.append((f"node{i}", cluster.spawn(i, argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                        substitute=False)))
        else:
            for i, argv in enumerate(argvs):
                log = open(work / f"node{i}.log", "wb")
                procs.append((f"node{i}", subprocess.Popen(argv + ["--loopback", "--host", "127.0.0.1"], env=env,
                                                           stdout=log, stderr=subprocess.STDOUT)))
        res = _follow(results, frames, procs, timeout, t0, quiet=True)
    finally:
        if cluster is not None:
            cluster.close()
        for _, p in procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    lat = [r["latency"] for r in res]
    # steady state: frames/s between the first and the last result (start-up excluded)
    fps = None
    if len(res) >= 2:
        stamps = [r.get("released_at") for r in res]
        if all(s is not None for s in stamps):
            fps = (len(res) - 1) / (max(stamps) - min(stamps))
    return {"nodes": nodes, "cpu": cpu, "frames": len(res), "fps": fps,
            "latency_p50": pct(lat, 50) if lat else None, "latency_p99": pct(lat, 99) if lat else None,
            "wall_seconds": time.monotonic() - t0, "logs": str(work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "runtime.json"))
    ap.add_argument("--cpu", type=float, default=0.5, help="CPU share per node for part 3 (root) [0.5]")
    ap.add_argument("--skip-cluster", action="store_true", help="skip part 3")
    ap.add_argument("--null-node", choices=["gateway", "source", "thief"], help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=40, help=argparse.SUPPRESS)
    ap.add_argument("--peer-ports", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.null_node:  # one process of overhead_processes
        print(json.dumps(run(_null_node(args.null_node, args.frames, args.peer_ports))), flush=True)
        return
    n = 100 if args.quick else 400
    report: dict = {}

    big = Network.from_random("yolov2", 0)
    small = small_net()
    report["steal_rtt"] = {
        "small": run(steal_rtt(small, (3, 3), n)),
        "yolov2_5x5": run(steal_rtt(big, (5, 5), n)),
    }
    frames = 20 if args.quick else 200
    # best of 3 of each (this VM's speed drifts by tens of percent within minutes)
    report["overhead"] = min((run(overhead(small, frames)) for _ in range(3)), key=lambda r: r["per_task_ms"])
    report["overhead_processes"] = min((overhead_processes(frames) for _ in range(3)), key=lambda r: r["per_task_ms"])
    print("steal round trip on 127.0.0.1 (request -> task data in hand)")
    print(f"{'tile':<12} {'bytes':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in report["steal_rtt"].items():
        print(f"{name:<12} {r['tile_bytes']:>9} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}")
    print(f"\nruntime overhead per task: null compute (tasks queued, stolen, sent, acknowledged, "
          f"stitched, not computed), 5x5 reuse, {frames} frames, best of 3")
    print(f"{'gateway + source + thief':<36} {'tasks':>6} {'stolen':>6} {'wall ms':>8} {'CPU ms':>7}")
    for label, key in (("in one process (one core, one GIL)", "overhead"),
                       ("as three processes (2 cores)", "overhead_processes")):
        o = report[key]
        print(f"{label:<36} {o['tasks']:>6} {o['stolen']:>6} {o['per_task_ms']:>8.3f} {o['cpu_per_task_ms']:>7.3f}")
    print("(wall: seconds from the first frame to the last result per task; CPU: summed over the three nodes)")
    if not args.skip_cluster:
        frames = 4 if args.quick else 12
        runs = [cluster_fps(k, frames, args.cpu, "5x5", 900) for k in (1, 2, 3)]
        report["cluster"] = runs
        base = runs[0]["fps"]
        print(f"\nYOLOv2-608 5x5 reuse, {frames} frames, CPU {args.cpu if os.geteuid() == 0 else 'shared'} per node")
        print(f"{'nodes':>5} {'frames/s':>9} {'x 1 node':>9} {'p50 s':>7} {'p99 s':>7}")
        for r in runs:
            ratio = (r["fps"] / base) if (r["fps"] and base) else float("nan")
            print(f"{r['nodes']:>5} {r['fps'] or float('nan'):>9.3f} {ratio:>9.2f} "
                  f"{r['latency_p50'] or float('nan'):>7.2f} {r['latency_p99'] or float('nan'):>7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
