"""Soak benchmark: gateway (and worker) memory while thousands of frames stream through.

    python bench/soak.py [--frames 10000] [--every 500] [--grid 3x3] [--size 64] [--timeout 1800]

Starts two real node processes on 127.0.0.1 (``python -m stealer node``, no mDNS: the worker
dials the gateway with ``--peer``): a gateway that writes results to ``--out`` and a worker with
one synthetic source. The model is a tiny darknet cfg written into the run's temp dir (three
conv/maxpool layers fused, a 1x1 conv and a region layer as the tail, random weights seeded as
the other benchmarks do), on a small input, so that thousands of frames take a few minutes.

The gateway runs as a daemon does: no ``--expect`` (so nothing in the process reads
``Node.results``) and default limits; ``--read-results`` gives it a reader (``--expect`` with
a count no run reaches), to see what grows besides that queue. While the frames stream, this script follows the
gateway's results file and samples VmRSS and VmHWM of both processes from ``/proc/PID/status``
every ``--every`` released frames. It prints a table (frames, seconds, RSS per process), the
gateway's growth from frame ``--from-frame`` (2,000) to the end with a PASS/FAIL against the
target (under 5 MB over 2,000..10,000 frames; a report, not an assert), and writes everything
to ``bench/results/soak.json``.

Every run stops itself: after ``--timeout`` seconds, or when a node exits early, whatever has
been sampled is reported and both processes are sent SIGTERM (and killed if they do not leave).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_BYTES = 5_000_000  # the figure: gateway RSS growth under 5 MB from frame 2,000 to 10,000
MIB = 1 << 20

# Small enough that a frame costs a few milliseconds on one core, with the same parts as YOLO:
# a fused conv/maxpool block split into tiles (reuse strips included) and a tail that ends in
# a region layer, so every result carries detections as a real gateway's does.
TINY_CFG = """\
[net]
batch=1
subdivisions=1
width={size}
height={size}
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=125
activation=linear

[region]
anchors = 1.08,1.19,  3.42,4.41,  6.63,11.38,  9.42,5.11,  16.62,10.52
bias_match=1
classes=20
coords=4
num=5
softmax=1
jitter=.2
rescore=1
object_scale=5
noobject_scale=1
class_scale=1
coord_scale=1
absolute=1
thresh = .6
random=1
"""
FUSED_LAYERS = 5  # conv, maxpool, conv, maxpool, conv: the tail is the 1x1 conv and the region layer


def proc_memory(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM of a process in bytes, or None once it is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out or None


class LineCounter:
    """Counts complete lines of a file that another process appends to (the gateway's results),
    reading only what is new and keeping only the last result (its ``released_at``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.count = 0
        self.last: dict[str, Any] | None = None
        self._tail = b""

    def poll(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read()
            self.pos += len(chunk)
            data = self._tail + chunk
            lines = data.split(b"\n")
            self._tail = lines[-1]  # an incomplete line: counted once its newline is written
            complete = [ln for ln in lines[:-1] if ln.strip()]
            self.count += len(complete)
            if complete:
                with contextlib.suppress(ValueError):
                    self.last = json.loads(complete[-1])
        return self.count


def _listening(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The node's ``listening`` event (its port), from its stdout log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"listening"' in line:
                    return json.loads(line)
        if proc.poll() is not None:
            raise RuntimeError(f"node exited ({proc.returncode}) before listening; see {log}")
        time.sleep(0.05)
    raise RuntimeError(f"node not listening after {timeout:.0f} s; see {log}")


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM (nodes drain and write their --stats), then SIGKILL whatever is left."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def growth(samples: list[dict[str, Any]], from_frame: int, role: str = "gateway") -> dict[str, Any] | None:
    """RSS change of one process from the first sample at or past ``from_frame`` to the last one,
    and the least-squares slope in bytes per frame over those samples (less noisy than two points)."""
    pts = [(s["frames"], s[role]["VmRSS"]) for s in samples if s["frames"] >= from_frame and s.get(role)]
    if len(pts) < 2:
        return None
    (f0, r0), (f1, r1) = pts[0], pts[-1]
    n = len(pts)
    mx = sum(f for f, _ in pts) / n
    my = sum(r for _, r in pts) / n
    sxx = sum((f - mx) ** 2 for f, _ in pts)
    slope = sum((f - mx) * (r - my) for f, r in pts) / sxx if sxx else 0.0
    return {"from_frame": f0, "to_frame": f1, "rss_from": r0, "rss_to": r1, "bytes": r1 - r0,
            "bytes_per_frame": (r1 - r0) / (f1 - f0) if f1 > f0 else 0.0, "slope_bytes_per_frame": slope}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="stealer-soak-"))
    cfg = work / f"tiny{args.size}.cfg"
    cfg.write_text(TINY_CFG.format(size=args.size))
    results = work / "results.jsonl"
    base = [sys.executable, "-m", "stealer", "node", "--cfg", str(cfg), "--random-weights", str(args.seed),
            "--grid", args.grid, "--layers", str(FUSED_LAYERS), "--host", "127.0.0.1", "--no-discovery"]
    gw_argv = base + ["--gateway", "--out", str(results), "--stats", str(work / "gateway.json")]
    if args.read_results:
        # a reader of Node.results, as --expect runs one (stealer/cli.py): with a count no run
        # reaches, the gateway still stays a daemon, but its results queue is emptied as it fills
        gw_argv += ["--expect", str(1 << 40)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    samples: list[dict[str, Any]] = []
    status = "ok"
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    commands = [shlex.join(gw_argv)]
    try:
        gw_log = work / "gateway.log"
        gw = subprocess.Popen(gw_argv, cwd=ROOT, env=env, stdout=open(gw_log, "wb"), stderr=subprocess.STDOUT)
        procs.append(gw)
        port = _listening(gw_log, gw, min(120.0, args.timeout))["port"]
        wk_argv = base + ["--peer", f"127.0.0.1:{port}", "--source", f"synthetic:{args.seed}",
                          "--frames", str(args.frames), "--exit-when-done", "--stats", str(work / "worker.json")]
        if args.fps:
            wk_argv += ["--fps", str(args.fps)]
        commands.append(shlex.join(wk_argv))
        wk = subprocess.Popen(wk_argv, cwd=ROOT, env=env, stdout=open(work / "worker.log", "wb"),
                              stderr=subprocess.STDOUT)
        procs.append(wk)
        counter = LineCounter(results)
        t0: float | None = None  # the first released frame: the clock of the table

        def sample() -> None:
            now = time.monotonic()
            samples.append({"frames": counter.count, "seconds": round(now - (t0 or now), 3),
                            "gateway": proc_memory(gw.pid), "worker": proc_memory(wk.pid)})

        next_mark = 0
        while counter.count < args.frames:
            counter.poll()
            if counter.count and t0 is None:
                t0 = time.monotonic()
            if counter.count >= next_mark and counter.count:
                sample()
                if not args.quiet:
                    s = samples[-1]
                    print(f"  {s['frames']:6d} frames  {s['seconds']:7.1f} s  gateway "
                          f"{_mib(s['gateway'], 'VmRSS')} MiB  worker {_mib(s['worker'], 'VmRSS')} MiB",
                          file=sys.stderr, flush=True)
                next_mark = (counter.count // args.every + 1) * args.every
                continue
            if gw.poll() is not None:
                status = f"gateway exited early ({gw.returncode})"
                break
            if wk.poll() is not None and counter.poll() < args.frames:
                # --exit-when-done: it leaves only once every frame is finished, so only a crash
                # (or a lost frame) gets here; a last look at the file decides
                time.sleep(1.0)
                if counter.poll() < args.frames:
                    status = f"worker exited early ({wk.returncode}) at {counter.count} frames"
                    break
            if time.monotonic() > deadline:
                status = f"timed out after {args.timeout:.0f} s at {counter.count} frames"
                break
            time.sleep(0.02)
        if not samples or samples[-1]["frames"] != counter.count:
            sample()  # the end, whatever stopped the run
    finally:
        _stop(procs, 45)
    stats = {}
    for role in ("gateway", "worker"):
        with contextlib.suppress(OSError, ValueError):
            stats[role] = json.loads((work / f"{role}.json").read_text())
    from_frame = min(args.from_frame, args.frames // 5)
    g = growth(samples, from_frame)
    w = growth(samples, from_frame, "worker")
    fps = None
    if len(samples) >= 2 and samples[-1]["seconds"] > 0:
        fps = (samples[-1]["frames"] - samples[0]["frames"]) / (samples[-1]["seconds"] - samples[0]["seconds"])
    verdict = None
    if g is not None:
        # the target is stated for 8,000 frames (2,000..10,000): a shorter run is judged on its
        # slope scaled to that span, and says so
        span = 10_000 - 2_000
        projected = g["slope_bytes_per_frame"] * span
        verdict = {"target_bytes": TARGET_BYTES, "span_frames": span, "measured_span": g["to_frame"] - g["from_frame"],
                   "projected_bytes": round(projected), "pass": projected < TARGET_BYTES}
    return {"status": status, "frames_target": args.frames, "frames": samples[-1]["frames"] if samples else 0,
            "every": args.every, "grid": args.grid, "size": args.size, "seed": args.seed, "fused_layers": FUSED_LAYERS,
            "read_results": args.read_results,
            "fps": fps, "wall_seconds": round(time.monotonic() - t_start, 1), "samples": samples,
            "gateway_growth": g, "worker_growth": w, "verdict": verdict, "stats": stats,
            "commands": commands, "work": str(work), "python": sys.version.split()[0],
            "machine": platform.machine(), "cpus": os.cpu_count()}


def _mib(mem: dict[str, int] | None, key: str) -> str:
    return f"{mem[key] / MIB:7.1f}" if mem and key in mem else "      –"


def table(report: dict[str, Any]) -> str:
    lines = [f"{'frames':>7} {'seconds':>8} {'gw RSS':>8} {'gw HWM':>8} {'wk RSS':>8} {'wk HWM':>8}   (MiB)"]
    for s in report["samples"]:
        lines.append(f"{s['frames']:7d} {s['seconds']:8.1f} {_mib(s['gateway'], 'VmRSS')} "
                     f"{_mib(s['gateway'], 'VmHWM')} {_mib(s['worker'], 'VmRSS')} {_mib(s['worker'], 'VmHWM')}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    out = [f"status: {report['status']}; {report['frames']} frames in {report['wall_seconds']} s"
           + (f" ({report['fps']:.0f} frames/s)" if report["fps"] else "")]
    for role in ("gateway", "worker"):
        g = report[f"{role}_growth"]
        if g is None:
            out.append(f"{role}: too few samples past frame {min(2000, report['frames_target'] // 5)} for a growth figure")
            continue
        out.append(f"{role} RSS frame {g['from_frame']} -> {g['to_frame']}: {g['bytes'] / MIB:+.2f} MiB "
                   f"({g['bytes_per_frame']:.0f} B/frame end to end, slope {g['slope_bytes_per_frame']:.0f} B/frame)")
    v = report["verdict"]
    if v is not None:
        how = ("measured" if v["measured_span"] >= v["span_frames"]
               else f"projected from {v['measured_span']} frames")
        out.append(f"target: gateway growth over {v['span_frames']} frames < {v['target_bytes'] / 1e6:.0f} MB: "
                   f"{v['projected_bytes'] / 1e6:.2f} MB ({how}) -> {'PASS' if v['pass'] else 'FAIL'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10_000, help="frames to stream [10000]")
    ap.add_argument("--every", type=int, default=500, help="sample RSS every this many released frames [500]")
    ap.add_argument("--from-frame", type=int, default=2_000,
                    help="growth is measured from here (start-up, kernel caches and warm-up before it) [2000]")
    ap.add_argument("--grid", default="3x3", help="tile grid [3x3]")
    ap.add_argument("--size", type=int, default=64, help="input width and height of the tiny model [64]")
    ap.add_argument("--seed", type=int, default=0, help="random weights and synthetic source seed [0]")
    ap.add_argument("--fps", type=float, default=None, help="source frame rate [as fast as it goes]")
    ap.add_argument("--timeout", type=float, default=1800.0, help="the run stops itself after this [1800 s]")
    ap.add_argument("--out", default=str(RESULTS / "soak.json"), help="JSON report [bench/results/soak.json]")
    ap.add_argument("--read-results", action="store_true",
                    help="give the gateway a reader of its results queue (--expect beyond reach): the growth "
                         "without the known Node.results leak, for comparison [off: a daemon as deployed]")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    report = run(args)
    print(table(report))
    print(summary(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}; node logs in {report['work']}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
