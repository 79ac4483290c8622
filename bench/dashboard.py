"""What the dashboard (``--http``) costs and how it loads.

    sudo python bench/dashboard.py [--nodes 6] [--frames 24] [--repeats 3]     # on the emulator
    python bench/dashboard.py --local [--frames 2]                             # no root: smoke run

Two figures:

* **cost at the gateway**: steady frames/s on the emulated shelf (``tools/emulate.py``, the
  runs of ``bench/throughput.py``: YOLOv2-608, 0.2 core and 20 Mbit/s per node, one source on
  host 1) without and with ``--http :8080``, alternated ``--repeats`` times so that drift on
  the host hits both alike; the ratio's target is within noise (< 2%). ``--http`` is given to
  every node (``Run.node_args``), an upper bound: only the gateway's costs anything beyond a
  Status a second;
* **page load and bytes per update**: a cluster of ``--page-nodes`` nodes in this process (a
  tiny model), the page loaded in headless Chromium (Playwright, the system's chromium):
  time from navigation to the shelf, plots and frames on the page (median of
  ``--page-loads``), and the bytes of each server-sent ``update`` (it names every node, so it
  grows with the shelf) and of each ``frame`` event, read from the stream itself.

``--local`` runs both parts on this machine with no emulator (the first with local
processes, ``--frames`` per run): a smoke test of the script, not a measurement. Writes
``bench/out/dashboard.json`` and prints a table.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: bench/ (this script's folder) has a kernels.py of its own
if str(ROOT / "bench") not in sys.path:  # last: bench/kernels.py must not shadow the kernels package
    sys.path.append(str(ROOT / "bench"))

import throughput as tp  # noqa: E402  (bench/throughput.py: runs on tools/emulate.py)

OUT = ROOT / "bench" / "out"


# ------------------------------------------------------------------ cost: frames/s with and without --http

def emulated_pair(nodes: int, frames: int, repeats: int, timeout: float) -> list[dict[str, Any]]:
    """Alternate runs without and with --http on the emulated shelf; steady fps of each."""
    rows = []
    for rep in range(repeats):
        for http in (False, True):
            run = tp.Run("dashboard", f"{nodes} nodes{' --http' if http else ''}", nodes=nodes, grid=(1, 1),
                         scheme="none", sources=(1,), frames=frames, max_inflight=2 * nodes + 2, repeat=rep,
                         node_args=("--http", ":8080") if http else ())
            with tempfile.TemporaryDirectory(prefix="bench-dash-") as d:
                raw = tp.run_stealer(run, Path(d), timeout)
            rows.append(_fps_row(run.label, http, rep, raw["status"], raw["results"], run.total_inflight))
            tp.log(f"{run.label} #{rep}: {rows[-1]['fps']} fps ({raw['status']})")
    return rows


def local_pair(frames: int, timeout: float) -> list[dict[str, Any]]:
    """The same pair with two local processes (gateway + a source node) and a tiny model."""
    rows = []
    for http in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench-dash-") as d:
            work = Path(d)
            results = work / "results.jsonl"
            base = [sys.executable, "-m", "stealer", "node", "--cfg", "yolov2-tiny", "--random-weights", "0",
                    "--grid", "1x1", "--no-discovery", "--host", "127.0.0.1", "--log-format", "json"]
            extra = ["--http", "127.0.0.1:0"] if http else []
            env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
            gw = subprocess.Popen(base + ["--gateway", "--out", str(results), "--expect", str(frames)] + extra,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
            procs = [gw]
            try:
                port = _listening_port(gw, timeout)
                procs.append(subprocess.Popen(
                    base + ["--peer", f"127.0.0.1:{port}", "--source", "synthetic:0", "--frames", str(frames),
                            "--exit-when-done"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
                gw.wait(timeout)
            finally:
                tp._stop(procs, 30)
            got = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        rows.append(_fps_row("local" + (" --http" if http else ""), http, 0,
                             "ok" if len(got) == frames else f"{len(got)} of {frames} results", got, 0))
    return rows


def _listening_port(proc: subprocess.Popen[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        with_port = json.loads(line) if line.startswith("{") else {}
        if with_port.get("event") == "listening":
            return int(with_port["port"])
    raise RuntimeError("the gateway did not start")


def _fps_row(label: str, http: bool, rep: int, status: str, results: list[dict[str, Any]],
             inflight: int) -> dict[str, Any]:
    stamps = sorted(r["released_at"] for r in results if "released_at" in r)
    steady = tp.steady_fps(stamps, inflight) if stamps else None
    fps_all = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 2 and stamps[-1] > stamps[0] else None
    return {"label": label, "http": http, "repeat": rep, "status": status, "results": len(results),
            "fps": round(steady.fps, 4) if steady else (round(fps_all, 4) if fps_all else None)}


# ------------------------------------------------------------------ page load and bytes per update

async def page_figures(nodes: int, loads: int, updates: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    from tools.dashboard_screenshot import chromium_path, launch_chromium, small_cluster, tiny_net, wait_for_page

    out: dict[str, Any] = {"nodes": nodes}
    async with small_cluster(tiny_net(96), workers=nodes - 1, fps=2.0) as cluster:
        gw = cluster[0]
        assert gw.dashboard is not None
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        await asyncio.sleep(3.0)  # every node reported, a frame of each source drawn
        sizes: dict[str, list[int]] = {"state": [], "update": [], "frame": []}
        async with aiohttp.ClientSession() as session, session.get(base + "/api/events") as resp:
            kind, size = None, 0
            async with asyncio.timeout(timeout):
                async for raw in resp.content:
                    size += len(raw)
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif not line and kind is not None:
                        sizes[kind].append(size)
                        kind, size = None, 0
                        if len(sizes["update"]) >= updates:
                            break
                    elif not line:
                        size = 0
        out["state_bytes"] = sizes["state"][0] if sizes["state"] else None
        out["update_bytes_median"] = statistics.median(sizes["update"]) if sizes["update"] else None
        out["frame_event_bytes_median"] = statistics.median(sizes["frame"]) if sizes["frame"] else None
        frame = gw.dashboard.frames.sources()
        out["frame_jpeg_bytes_median"] = statistics.median(len(f.jpeg) for f in frame) if frame else None
        exe = chromium_path()
        try:
            from playwright.async_api import async_playwright
        except ImportError:
            exe = None
        if exe is None:
            out["page_load_seconds"] = None
            out["page_load_note"] = "no chromium or playwright"
            return out
        times = []
        async with async_playwright() as pw:
            browser = await launch_chromium(pw, exe)
            for _ in range(loads):
                page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                t0 = time.perf_counter()
                await page.goto(base + "/")
                await wait_for_page(page, nodes=nodes, frames=1, points=1, timeout=timeout)
                times.append(time.perf_counter() - t0)
                await page.close()
            await browser.close()
        out["page_load_seconds"] = round(statistics.median(times), 3)
        out["page_load_all"] = [round(t, 3) for t in times]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="no emulator: a smoke run on this machine")
    p.add_argument("--nodes", type=int, default=6, help="emulated nodes [6]")
    p.add_argument("--frames", type=int, default=None, help="frames per run [24; --local: 2]")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs on the emulator [3]")
    p.add_argument("--page-nodes", type=int, default=6, help="nodes of the in-process cluster for the page [6]")
    p.add_argument("--page-loads", type=int, default=5, help="page loads timed [5]")
    p.add_argument("--updates", type=int, default=10, help="update events measured [10]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run [1800]")
    args = p.parse_args(argv)
    if args.local:
        frames = args.frames or 2
        rows = local_pair(frames, min(args.timeout, 300.0))
        page = asyncio.run(page_figures(min(args.page_nodes, 3), min(args.page_loads, 2), min(args.updates, 3), 120))
    else:
        if os.geteuid() != 0:
            print("the emulated shelf needs root (or use --local for a smoke run)", file=sys.stderr)
            return 2
        rows = emulated_pair(args.nodes, args.frames or 24, args.repeats, args.timeout)
        page = asyncio.run(page_figures(args.page_nodes, args.page_loads, args.updates, 120))
    off = [r["fps"] for r in rows if not r["http"] and r["fps"]]
    on = [r["fps"] for r in rows if r["http"] and r["fps"]]
    ratio = statistics.median(on) / statistics.median(off) if off and on else None
    report = {"local": args.local, "runs": rows, "fps_ratio_http_over_plain": round(ratio, 4) if ratio else None,
              "page": page}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / ("dashboard-local.json" if args.local else "dashboard.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"{'run':<24} {'rep':>3} {'results':>7} {'fps':>8}  status")
    for r in rows:
        print(f"{r['label']:<24} {r['repeat']:>3} {r['results']:>7} {r['fps'] if r['fps'] is not None else '-':>8}  "
              f"{r['status']}")
    print(f"frames/s with --http / without: {report['fps_ratio_http_over_plain']}")
    for k, v in page.items():
        print(f"page {k}: {v}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
