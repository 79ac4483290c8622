"""Chaos run: nodes killed and restarted mid-stream, the gateway killed once; nothing may be lost.

    python bench/chaos.py [--frames 200] [--fps 8] [--kill-every 2.5] [--out bench/out/chaos.json]

Real processes on 127.0.0.1 that find each other by mDNS: a gateway, a gateway standby, a source
node (the camera: never killed, since a dead camera's frames exist nowhere else) and workers.
Every ``--kill-every`` seconds a random worker is killed with SIGKILL (every third time it is
frozen with SIGSTOP instead, so only the heartbeat can tell) and restarted a second later; half
way through, the gateway is killed with SIGKILL and the standby must take over. The same stream
runs once more without faults, for the latency comparison.

Reports: frames lost (must be 0), results that differ from single-device inference (must be 0),
duplicates dropped, failure detection time (kill -> a peer reports the loss), takeover time,
restart-to-first-task time of restarted workers (churn), latency p50/p99 with and without faults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stealer.images import synthetic_frame  # noqa: E402
from stealer.network import Network, builtin_cfg  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


class Proc:
    def __init__(self, name: str, argv: list[str], work: Path, cluster=None, host: int = 0) -> None:
        self.name, self.argv, self.work = name, argv, work
        self.cluster, self.host = cluster, host  # emulator host, or None for 127.0.0.1
        self.generation = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.spawn_times: list[float] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.work / f"{self.name}.{self.generation}.log"
        self.logs.append(log)
        self.spawn_times.append(time.time())
        if self.cluster is not None:
            self.popen = self.cluster.spawn(self.host, self.argv, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                            substitute=False)
        else:
            self.popen = subprocess.Popen(self.argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True)
        self.generation += 1

    def events(self) -> list[tuple[Path, dict]]:
        out = []
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        out.append((log, json.loads(line)))
                    except json.JSONDecodeError:
                        pass
        return out

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()


def read_results(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        if p.exists():
            out += [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return out


def run(args: argparse.Namespace, cfg: Path, chaos: bool, expected: dict[int, str]) -> dict:
    if args.emulate:
        sys.path.insert(0, str(ROOT))
        from tools.emulate import Cluster

        with Cluster(nodes=3 + args.workers, cpu=args.cpu, rate=args.rate) as cluster:
            return _run(args, cfg, chaos, expected, cluster)
    return _run(args, cfg, chaos, expected, None)


def _run(args: argparse.Namespace, cfg: Path, chaos: bool, expected: dict[int, str], cluster) -> dict:
    work = Path(tempfile.mkdtemp(prefix="stealer-chaos-"))
    base = [sys.executable, "-m", "stealer", "node", "--cfg", str(cfg), "--random-weights", "3",
            "--grid", args.grid, "--layers", str(args.layers)]
    if cluster is None:
        base += ["--loopback", "--host", "127.0.0.1"]
    gw_out, sb_out = work / "gateway.jsonl", work / "standby.jsonl"
    gateway = Proc("gateway", base + ["--gateway", "--out", str(gw_out)], work, cluster, 0)
    standby = Proc("standby", base + ["--gateway-standby", "--out", str(sb_out)], work, cluster, 1)
    source = Proc("source", base + ["--source", "synthetic:21", "--frames", str(args.frames), "--fps",
                                    str(args.fps), "--max-inflight", "6"], work, cluster, 2)
    workers = [Proc(f"worker{i}", base, work, cluster, 3 + i) for i in range(args.workers)]
    everyone = [gateway, standby, *workers]
    kills: list[dict] = []
    rng = random.Random(args.seed)
    t0 = time.time()
    try:
        for p in everyone:
            p.start()
        time.sleep(args.settle)  # let discovery join everyone before the camera starts
        source.start()
        gateway_killed = False
        streaming_since: float | None = None  # when the camera started its first frame
        worker_faults = 0
        restart: tuple[Proc, float] | None = None  # (worker, when): restarts never block the loop
        next_kill = time.time() + args.kill_every
        while True:
            res = {r["frame"] for r in read_results(gw_out, sb_out) if r.get("source")}
            if len(res) >= args.frames:
                break
            if time.time() - t0 > args.timeout:
                print(f"timed out with {len(res)}/{args.frames} frames", file=sys.stderr)
                break
            now = time.time()
            # A third of the way through the stream, by time since the camera's first frame:
            # results are released in frame order, so after a straggler they can all arrive in
            # one burst at the end, and a trigger waiting for a result could never fire.
            if streaming_since is None:
                streaming_since = next((ev["time"] for _, ev in source.events()
                                        if ev.get("event") == "first-task"), None)
            if (chaos and not gateway_killed and streaming_since is not None
                    and now - streaming_since >= args.frames / args.fps / 3):
                gateway.signal(signal.SIGKILL)
                kills.append({"who": "gateway", "how": "SIGKILL", "time": now})
                gateway_killed = True
            if restart is not None and now >= restart[1]:
                victim = restart[0]
                victim.signal(signal.SIGKILL)
                victim.popen.wait()
                victim.start()
                restart = None
                next_kill = time.time() + args.kill_every
            if chaos and restart is None and now >= next_kill:
                victim = rng.choice(workers)
                worker_faults += 1
                how = signal.SIGSTOP if worker_faults % 3 == 2 else signal.SIGKILL
                victim.signal(how)
                kills.append({"who": victim.name, "how": how.name, "time": now})
                restart = (victim, now + 1.0)
            time.sleep(0.05)
    finally:
        for p in (source, *everyone):
            p.stop()
    results = read_results(gw_out, sb_out)
    first: dict[int, dict] = {}
    duplicates = 0
    for r in results:
        if r["frame"] in first:
            duplicates += 1
        else:
            first[r["frame"]] = r
    lost = [f for f in range(args.frames) if f not in first]
    wrong = [f for f, r in first.items() if r["output_sha256"] != expected[f]]
    lat = [r["latency"] for r in first.values()]
    # failure detection: from each kill to the first peer-lost event naming that process's node
    events = []
    for p in (gateway, standby, source, *workers):
        for log, ev in p.events():
            events.append((p.name, ev))
    detections = []
    for k in kills:
        victim = next(p for p in (gateway, standby, source, *workers) if p.name == k["who"])
        # the generation of the process that was running when the fault was injected
        gen = sum(1 for t in victim.spawn_times if t <= k["time"]) - 1
        evs = [json.loads(l) for l in victim.logs[gen].read_text(errors="replace").splitlines() if l.startswith("{")]
        ids = {e["node_id"] for e in evs if e.get("event") == "starting"}
        if not any(e.get("event") == "peer-joined" and e["time"] < k["time"] for e in evs):
            continue  # faulted before it had connected to anyone: nobody could miss it
        seen = [ev["time"] - k["time"] for _, ev in events
                if ev.get("event") == "peer-lost" and ev.get("peer") in ids and ev["time"] >= k["time"]]
        if seen:
            detections.append({"who": k["who"], "how": k["how"], "seconds": round(min(seen), 3)})
    takeover = [ev["time"] for name, ev in events if ev.get("event") == "takeover"]
    gw_kill = [k["time"] for k in kills if k["who"] == "gateway"]
    restarts = []
    for p in workers:
        for i, log in enumerate(p.logs[1:], start=1):
            evs = [json.loads(l) for l in log.read_text(errors="replace").splitlines() if l.startswith("{")]
            joined = next((e for e in evs if e.get("event") == "peer-joined"), None)
            first_task = next((e for e in evs if e.get("event") == "first-task"), None)
            if joined:
                restarts.append({"joined": round(joined["time"] - p.spawn_times[i], 3),
                                 "first_task": round(first_task["time"] - p.spawn_times[i], 3) if first_task else None})
    return {
        "chaos": chaos, "frames": args.frames, "completed": len(first), "lost": lost, "wrong": wrong,
        "duplicate_results": duplicates, "kills": len(kills),
        "kills_detail": kills, "detection": detections,
        "takeover_seconds": round(takeover[0] - gw_kill[0], 3) if takeover and gw_kill else None,
        "restart_to_first_task_seconds": restarts,
        "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99), "work": str(work),
        "elapsed": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-every", type=float, default=2.5)
    ap.add_argument("--grid", default="3x3")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--size", type=int, default=96, help="input size of the yolov2-tiny model [96]")
    ap.add_argument("--settle", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without faults")
    ap.add_argument("--emulate", action="store_true", help="run in the emulator (root): hosts in network "
                    "namespaces with CPU quotas and rate-limited links, found by mDNS across the bridge")
    ap.add_argument("--cpu", type=float, default=0.25, help="with --emulate: CPU share per host [0.25]")
    ap.add_argument("--rate", default="20mbit", help="with --emulate: link rate per host [20mbit]")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "chaos.json"))
    args = ap.parse_args(argv)
    cfg = Path(tempfile.mkdtemp(prefix="stealer-cfg-")) / "tiny.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", f"width={args.size}")
                   .replace("height=416", f"height={args.size}"))
    net = Network.from_random(cfg, 3)
    expected = {f: hashlib.sha256(net.forward(synthetic_frame(21, f, net.input_shape)).tobytes()).hexdigest()
                for f in range(args.frames)}
    report = {"chaos": run(args, cfg, True, expected)}
    if not args.no_baseline:
        report["baseline"] = run(args, cfg, False, expected)
    c = report["chaos"]
    print(f"chaos run: {c['frames']} frames, {c['kills']} faults injected (SIGKILL/SIGSTOP workers, SIGKILL gateway)")
    print(f"  frames lost: {len(c['lost'])}   results differing from single-device inference: {len(c['wrong'])}")
    print(f"  duplicate results (old and new gateway both released a frame): {c['duplicate_results']}")
    det = [d["seconds"] for d in c["detection"]]
    if det:
        kill9 = [d["seconds"] for d in c["detection"] if d["how"] == "SIGKILL"]
        stop = [d["seconds"] for d in c["detection"] if d["how"] == "SIGSTOP"]
        print(f"  failure detection: SIGKILL max {max(kill9, default=float('nan')):.3f} s, "
              f"SIGSTOP (heartbeat) max {max(stop, default=float('nan')):.3f} s")
    print(f"  gateway takeover: {c['takeover_seconds']} s after the kill")
    if c["restart_to_first_task_seconds"]:
        r = c["restart_to_first_task_seconds"]
        joined = [x["joined"] for x in r]
        first = [x["first_task"] for x in r if x["first_task"] is not None]
        print(f"  restarted workers: connected {min(joined):.2f}..{max(joined):.2f} s and first task "
              f"{min(first, default=float('nan')):.2f}..{max(first, default=float('nan')):.2f} s after the process started")
    if "baseline" in report:
        b = report["baseline"]
        print(f"  latency p50/p99: {c['latency_p50']:.3f}/{c['latency_p99']:.3f} s with faults, "
              f"{b['latency_p50']:.3f}/{b['latency_p99']:.3f} s without (lost {len(b['lost'])})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(0 if not rep["chaos"]["lost"] and not rep["chaos"]["wrong"] else 1)
