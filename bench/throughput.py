"""Throughput of stealer on an emulated shelf of Raspberry Pis, against one Pi and against Dask.

    sudo python bench/throughput.py [--quick] [--scenarios LIST] [--cpu 0.2] [--rate 20mbit]

Every run starts a fresh emulated cluster (``tools/emulate.py``: one network namespace, CPU
cgroup and shaped link per host), runs YOLOv2-608 with random weights (seed 0) on synthetic
frames, follows the gateway's result file, and checks every frame's output digest against
single-device inference (``Network.forward`` in this process; digests cached in
``bench/out/digests.json``). Every node runs with its default limits (nothing is passed to it
beyond the run's grid, policy and in-flight count) unless ``--node-arg`` says otherwise.
Scenarios (``--scenarios``, comma list, default all):

``single``    the best single-node run: ``stealer infer --threads 1`` (whole frame, no tiling) on
              one emulated host, and a one-node stealer cluster with a 1x1 grid;
``scaling``   1, 2, 3, 4, 6, 8 nodes, one source (on host 1; on host 0 when alone), 5x5, reuse;
``latency``   the scaling clusters with one frame in flight (``--max-inflight 1``): single-frame
              latency, FrameStart to release, and its ratio to one node's;
``fused``     the same with the model cut after the fused block (layers 0-15 and a 1x1 max
              pool): the fused block's own throughput, the figure DeepThings reports;
``unshaped``  the same at 6 and 8 nodes with unshaped links: what the 20 Mbit/s links cost;
``grid``      2x2 ... 6x6 at 6 nodes, reuse on and off;
``policy``    work stealing vs work sharing at 6 nodes, with one source and with a source on
              every node (multi-camera);
``hetero``    4 nodes, hosts 0 and 2 at twice the CPU share of hosts 1 and 3;
``dask``      the Dask distributed baseline (``bench/dask_baseline.py``) at the scaling counts;
``codec``     the frame codecs (raw, zstd, jpeg) side by side, 1x1 at the largest node count;
``auto``      ``--grid auto`` at 6 nodes and the largest count: the planner's choice with the
              throughput objective (backlog as in ``scaling``) and with the latency objective (one
              frame in flight), its predicted frames/s and latency (the source's start-up line)
              against what the run measured.

What "frames/s" is. A source starts ``max_inflight`` frames at once and then one more per
result, so a run has three phases: the warm-up burst (the first ``max_inflight`` results: frames
started together before anything came back, with the connections and kernel loading in them),
the steady state (a constant backlog of ``max_inflight`` frames), and the drain (the last
``max_inflight`` results: the source has stopped, the backlog runs down and nodes run dry).
Short runs are mostly warm-up and drain, so a cluster run has at least 60 frames (``--frames-scale``
scales that; ``--quick`` keeps runs small, as a smoke test) and frames/s is measured over the
steady state only: ``steady_fps`` takes the gateway's ``released_at`` stamps, skips the first and
the last ``max_inflight`` (per source, times the sources) and divides the intervals left by their
span. The old figure over all results (first to last) is kept as ``fps_all`` in the JSON, for
comparison; a run too short for a steady window falls back to it (``fps_basis: "all"``, marked
``*`` in the tables). Each configuration runs ``--repeat`` times (2 by default, repeats of a
scenario back to back); the tables give the median frames/s and the spread (min–max) over the
repeats, speed-ups are median over median, and the per-node figures are those of the repeat
closest to the median.

Measured per run: steady-state frames/s, start-up (spawn to first result), latency p50/p99
(FrameStart at the gateway to release, over the steady window's results), per node: tasks,
steals, reuse fallbacks, busy fraction (cgroup CPU seconds over the steady-state window / (CPU
share x window)) and task-busy fraction (the node's ``busy_seconds`` / run span), bytes on the
wire (the emulator's veth counters over the window, per frame), link utilisation, and an
accounting of the speed-up lost to the ideal:
``capacity = speed-up + redundancy + overhead + idle`` in Pi-equivalents, where redundancy is
the CPU the tiling costs beyond one whole-frame pass (executed-FLOP ratio and small-tile kernel
efficiency, measured here on one core, plus reuse fallbacks), overhead is the rest of the CPU the
nodes used (runtime, serialization, TCP), and idle is the CPU share nobody used (waiting for the
link, for dependencies, for the tail).

Outputs: ``bench/out/throughput.json`` (every run and repeat, saved after each one, and
``configs``: the medians and spreads per configuration; ``--resume`` skips runs already there,
a run's key includes its repeat index), ``bench/results/*.png`` and ``bench/RESULTS.md`` (table + the command).
``--report-only`` re-renders the table and plots from the JSON. Needs root (namespaces,
cgroups); ``pip install "dask[distributed]" matplotlib`` for the Dask baseline and the plots.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
RESULTS_DIR = ROOT / "bench" / "results"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
SCENARIOS = ("single", "scaling", "latency", "fused", "unshaped", "grid", "policy", "hetero", "dask", "defaults", "auto",
             "codec")
PI_SHARE = 0.2  # CPU share of a Pi-class node: the unit of "speed-up"
MIN_FRAMES = 60  # per cluster run: enough that the steady window outweighs warm-up and drain
LATENCY_FRAMES = 12  # per latency run (one in flight: warm-up and drain are one result each)

# --------------------------------------------------------------------------------- steady state


class Steady(NamedTuple):
    """A run's steady-state window: frames/s, the window's ends (release stamps), results in it."""

    fps: float
    start: float
    end: float
    results: int


def steady_fps(stamps: Sequence[float], inflight: int) -> Steady | None:
    """Frames/s of the steady state of a run that keeps ``inflight`` frames in flight.

    ``stamps``: the release time of every result of the run (one clock, any order). The source
    starts ``inflight`` frames at once and then one more each time a result comes back, so in
    release order:

    * results ``0 .. inflight-1`` are the warm-up burst: frames started together before anything
      came back (connections, kernel loading and the pipeline filling are in them). They are
      skipped: the window opens at the release of result ``inflight``, the first frame the
      source started in answer to a result, i.e. once the pipeline was full. That is never
      before the first result, so the time before it (start-up) is never in the window.
    * the last ``inflight`` results are the drain: the source has stopped starting frames, the
      backlog runs down and nodes run out of work. They are dropped: the window closes at the
      release of result ``n-1-inflight``, the moment the source started its last frame.

    fps = (results in the window - 1) / (window end - window start): the mean interval between
    releases with a constant backlog. ``None`` when fewer than 2 results are left in the window
    or they were all released at once (no span to divide by).
    """
    skip = max(0, inflight)
    s = sorted(stamps)
    first, last = skip, len(s) - 1 - skip
    if last - first < 1 or s[last] <= s[first]:
        return None
    n = last - first + 1
    return Steady((n - 1) / (s[last] - s[first]), s[first], s[last], n)


# --------------------------------------------------------------------------------- run specs


@dataclass(frozen=True)
class Run:
    """One cluster run. ``sources``: host index of each synthetic feed (feed j has seed j)."""

    scenario: str
    label: str
    kind: str = "stealer"  # stealer | dask | infer
    nodes: int = 1
    cpu: tuple[float | None, ...] = (PI_SHARE,)
    rate: str | None = "20mbit"
    grid: tuple[int, int] = (5, 5)
    scheme: str = "quad"
    policy: str = "steal"
    sources: tuple[int, ...] = (0,)
    frames: int = 8  # per source
    max_inflight: int = 4  # per source
    model: str = "yolov2"
    weights_seed: int = 0
    layers: int | None = None
    fused_only: bool = False
    node_args: tuple[str, ...] = ()  # appended to every node's command line (e.g. --limit ...)
    repeat: int = 0  # index of this repeat of the configuration (part of the key, for --resume)
    frame_codec: str = "raw"  # every node's --frame-codec (and the dask baseline's: same bytes moved)
    jpeg_quality: int = 90  # every node's --jpeg-quality (with jpeg)
    grid_auto: bool = False  # --grid auto (``grid``/``scheme`` then only name the run; the choice is logged)
    objective: str = "throughput"  # --objective of --grid auto

    @property
    def shares(self) -> list[float | None]:
        return [self.cpu[i % len(self.cpu)] for i in range(self.nodes)]

    @property
    def total_frames(self) -> int:
        return self.frames * len(self.sources)

    @property
    def total_inflight(self) -> int:
        """Frames in flight across the run's sources: each source keeps ``max_inflight``."""
        return self.max_inflight * len(self.sources)

    def key(self) -> str:
        d = asdict(self)
        d.pop("scenario")
        d.pop("label")
        if d["frame_codec"] == "raw":  # runs of before the codecs keep their keys (--resume)
            d.pop("frame_codec")
            d.pop("jpeg_quality")
        if not d["grid_auto"]:  # nor do runs of before the auto scenario
            d.pop("grid_auto")
            d.pop("objective")
        return json.dumps(d, sort_keys=True)

    @property
    def frame_kind(self) -> tuple[str, int]:
        """(codec, quality) of the frames computed on, as far as they differ: lossless codecs
        compute on the camera's own frame, so they share raw's reference digests."""
        if self.kind in ("stealer", "dask") and self.frame_codec == "jpeg":
            return "jpeg", self.jpeg_quality
        return "raw", 0


def _sources_for(nodes: int) -> tuple[int, ...]:
    return (1,) if nodes > 1 else (0,)


def _inflight(nodes: int, n_sources: int) -> int:
    # what a node's --max-inflight auto gives (stealer.node.source.Source._inflight_limit):
    # every node a task to run and one to fetch meanwhile, and two more
    return max(2, math.ceil((2 * nodes + 2) / n_sources))


def _grids(text: str) -> list[tuple[tuple[int, int], str]]:
    """``--grids`` words: ``5x5`` (reuse), ``2x2:none`` (no reuse); 1x1 never has reuse."""
    out = []
    for word in text.split(","):
        grid, _, scheme = word.strip().partition(":")
        rows, cols = (int(v) for v in grid.split("x"))
        out.append(((rows, cols), "none" if (rows, cols) == (1, 1) else (scheme or "quad")))
    return out


def plan_runs(args: argparse.Namespace, fused_cfg: str) -> list[Run]:
    quick = args.quick
    cpu = (args.cpu,)
    rate = None if args.rate in (None, "none") else args.rate
    model = dict(model=args.model, weights_seed=args.weights_seed, layers=args.layers,
                 node_args=tuple(a for words in args.node_arg for a in shlex.split(words)),
                 frame_codec=args.frame_codec, jpeg_quality=args.jpeg_quality)
    counts = [int(n) for n in args.nodes.split(",")] if args.nodes else ([1, 4] if quick else [1, 2, 3, 4, 6, 8])
    big = args.big_nodes or (4 if quick else 6)
    scale = args.frames_scale

    def frames(inflight: int, n_sources: int = 1) -> int:
        """Frames per source, ``inflight`` being the run's total: MIN_FRAMES in the steady window
        (what is left after the warm-up burst and the drain, 2 x inflight results) plus those two
        (with 18 frames in flight, 60 frames in all left 24 in the window: 13 s, too short to
        trust). A quick (smoke) run keeps just a few results in it."""
        total = max(8, 2 * inflight + 4) if quick else MIN_FRAMES + 2 * inflight
        return max(3, round(math.ceil(total / n_sources) * scale))

    (default_grid, default_scheme), = _grids(args.grid)

    def cluster(n: int, **kw: Any) -> Run:
        kw.setdefault("grid", default_grid)
        kw.setdefault("scheme", default_scheme)
        srcs = kw.pop("sources", _sources_for(n))
        inflight = kw.pop("max_inflight", _inflight(n, len(srcs)))
        # one node sends nothing over a link: its runs are the same whatever the rate (so a run
        # at another --rate with --resume reuses them, and the baseline stays one measurement)
        link = kw.pop("rate", rate) if n > 1 else None
        return Run(nodes=n, cpu=kw.pop("cpu", cpu), rate=link, sources=srcs,
                   frames=kw.pop("frames", frames(inflight * len(srcs), len(srcs))), max_inflight=inflight,
                   **{**model, **kw})

    want = set(args.scenarios.split(",")) if args.scenarios else set(SCENARIOS)
    if quick and not args.scenarios:
        want -= {"fused", "unshaped", "defaults"}
    unknown = want - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(sorted(unknown))} (have {', '.join(SCENARIOS)})")
    runs: list[Run] = []
    if "single" in want:
        runs.append(Run("single", "infer (whole frame)", kind="infer", cpu=cpu, rate=None,
                        frames=3 if quick else 5, **model))
        runs.append(cluster(1, scenario="single", label="node 1x1", grid=(1, 1), scheme="none"))
    if "scaling" in want:
        for grid, scheme in _grids(args.grids):
            tag = "" if (grid, scheme) == ((5, 5), "quad") else f", {grid[0]}x{grid[1]}" + (
                " no reuse" if scheme == "none" and grid != (1, 1) else "")
            runs += [cluster(n, scenario="scaling", label=f"{n} nodes{tag}", grid=grid, scheme=scheme)
                     for n in counts]
    if "latency" in want:
        # one frame in flight: no queueing, so the latency is one frame's own path through the
        # cluster (what a single camera waiting on each answer sees)
        lat_frames = max(3, round(LATENCY_FRAMES * scale))
        lat_grids = _grids(args.latency_grids)
        for grid, scheme in lat_grids:
            # one node: only its whole frame, when that is in the list (its best latency, the reference)
            one = [1] if grid == (1, 1) or ((1, 1), "none") not in lat_grids else []
            tag = "" if (grid, scheme) == ((5, 5), "quad") else f", {grid[0]}x{grid[1]}" + (
                " no reuse" if scheme == "none" and grid != (1, 1) else "")
            runs += [cluster(n, scenario="latency", label=f"{n} nodes, 1 in flight{tag}", max_inflight=1,
                             frames=lat_frames, grid=grid, scheme=scheme)
                     for n in counts if n > 1 or n in one]
    if "fused" in want:
        runs.append(Run("single", "infer fused block", kind="infer", cpu=cpu, rate=None, frames=3 if quick else 5,
                        model=fused_cfg, weights_seed=args.weights_seed, fused_only=True))
        runs += [replace(cluster(n, scenario="fused", label=f"{n} nodes, fused only"), model=fused_cfg, layers=None,
                         fused_only=True) for n in counts]
    if "unshaped" in want:
        for n in ([big] if quick else [c for c in counts if c > 1]):  # one node sends nothing anyway
            runs.append(cluster(n, scenario="unshaped", label=f"{n} nodes, unshaped links", rate=None))
        for n in ([big] if quick else [c for c in counts if c >= 6] or [big]):
            runs.append(replace(cluster(n, scenario="unshaped", label=f"dask {n} nodes, unshaped links", rate=None),
                                kind="dask"))
    if "defaults" in want and model["node_args"]:
        # the same cluster without the extra node arguments: what the defaults do
        runs.append(replace(cluster(big, scenario="defaults", label=f"{big} nodes, default limits"), node_args=()))
    if "grid" in want:
        grids = [(3, 3), (5, 5)] if quick else [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]
        for g in grids:
            for scheme in ("quad", "none"):
                if quick and g == (3, 3) and scheme == "none":
                    continue
                runs.append(cluster(big, scenario="grid", label=f"{g[0]}x{g[1]} {'reuse' if scheme != 'none' else 'no reuse'}",
                                    grid=g, scheme=scheme))
    if "policy" in want:
        every = tuple(range(big))
        # a source on every node: the MIN_FRAMES are shared out among them
        per_src = frames(_inflight(big, big) * big, big)
        for policy in ("steal", "share"):
            runs.append(cluster(big, scenario="policy", label=f"{policy}, 1 source", policy=policy))
            runs.append(cluster(big, scenario="policy", label=f"{policy}, {big} sources", policy=policy,
                                sources=every, frames=per_src))
    if "codec" in want:
        # the frame codecs side by side at the largest count, 1x1 (where the source's uplink
        # carries every frame's pixels): raw, lossless zstd, and jpeg (computed on the decoded frame)
        n_codec = max(counts)
        for codec in ("raw", "zstd", "jpeg"):
            runs.append(cluster(n_codec, scenario="codec", label=f"{n_codec} nodes 1x1, {codec}", grid=(1, 1),
                                scheme="none", frame_codec=codec))
    if "hetero" in want:
        fast = 2 * args.cpu
        # the run's grid, and whole frames (1x1) too: the scheduling question differs (a slow
        # node holds a whole frame there, one tile of many with a grid)
        for grid, scheme in dict.fromkeys([(default_grid, default_scheme), ((1, 1), "none")]):
            tag = "" if grid == default_grid else f", {grid[0]}x{grid[1]}"
            runs.append(cluster(4, scenario="hetero", label=f"4 nodes, {fast:g}/{args.cpu:g} alternating{tag}",
                                cpu=(fast, args.cpu), grid=grid, scheme=scheme))
    if "dask" in want:
        for n in ([big] if quick else counts):
            runs.append(replace(cluster(n, scenario="dask", label=f"dask {n} nodes"), kind="dask"))
    if "auto" in want:
        lat_frames = max(3, round(LATENCY_FRAMES * scale))
        for n in dict.fromkeys([big, max(counts)]):
            if n < 2:
                continue
            runs.append(cluster(n, scenario="auto", label=f"{n} nodes, grid auto, throughput", grid_auto=True))
            runs.append(cluster(n, scenario="auto", label=f"{n} nodes, grid auto, latency", grid_auto=True,
                                objective="latency", max_inflight=1, frames=lat_frames))
    # the most telling runs first, so that a run cut short still has them; the fused block's
    # single-node baseline goes with the fused runs (nothing else needs it)
    priority = ["single", "scaling", "latency", "unshaped", "dask", "policy", "hetero", "codec", "auto", "grid",
                "defaults", "fused"]

    def group(r: Run) -> str:
        return "fused" if r.scenario == "single" and r.fused_only else r.scenario

    runs.sort(key=lambda r: (priority.index(group(r)), not (r.scenario == "single" and r.fused_only)))
    # each scenario's repeats back to back (all of its configurations once, then again): a run
    # cut short has whole scenarios, and the repeats of a configuration are minutes apart, so
    # the spread also sees the machine's drift
    out: list[Run] = []
    for name in dict.fromkeys(group(r) for r in runs):
        members = [r for r in runs if group(r) == name]
        for k in range(args.repeat):
            out += [replace(r, repeat=k) for r in members]
    return out


# --------------------------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fused_cfg_path() -> Path:
    """YOLOv2 cut after the fused block: layers 0-15 and a 1x1 stride-1 max pool (a free tail)."""
    from stealer.network import builtin_cfg

    lines = builtin_cfg("yolov2").read_text().splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines) if line.startswith("[")]
    text = "".join(lines[:heads[17]]) + "[maxpool]\nsize=1\nstride=1\n"
    path = OUT / "yolov2-fused16.cfg"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


_NETS: dict[tuple[str, int], Any] = {}


def network(model: str, seed: int) -> Any:
    from stealer.network import Network

    key = (model, seed)
    if key not in _NETS:
        _NETS[key] = Network.from_random(model, seed)
    return _NETS[key]


def digest_key(net: Any, frame_kind: tuple[str, int] = ("raw", 0)) -> str:
    """Cache key of a model's reference digests: its hash, the synthetic frames' version and,
    for a jpeg run, the codec and quality the frames were computed on (:attr:`Run.frame_kind`;
    raw's key is the one of before the codecs, so its cache stays valid)."""
    from stealer.images import SYNTHETIC_VERSION

    codec, quality = frame_kind
    key = f"{net.model_hash}/synthetic-v{SYNTHETIC_VERSION}"
    return key if codec == "raw" else f"{key}/{codec}-q{quality}"


def reference_digest(net: Any, seed: int, frame: int, frame_kind: tuple[str, int] = ("raw", 0),
                     **forward: Any) -> str:
    """SHA-256 of single-device inference of synthetic frame ``frame`` of ``seed`` as a node
    with that frame codec computes on it (for jpeg: the frame encoded and decoded)."""
    from stealer.images import synthetic_frame

    codec, quality = frame_kind
    x = synthetic_frame(seed, frame, net.input_shape, codec, quality or 90)  # raw: the quality is unused
    return hashlib.sha256(net.forward(x, **forward).tobytes()).hexdigest()


def expected_digests(runs: list[Run], cache: Path = OUT / "digests.json") -> dict[str, dict[str, str]]:
    """SHA-256 of single-device inference of every (model, seed, frame) the runs need, on the
    frames their codec computes on (cached under :func:`digest_key`)."""
    store: dict[str, dict[str, str]] = json.loads(cache.read_text()) if cache.exists() else {}
    need: dict[tuple[str, int, tuple[str, int]], set[tuple[int, int]]] = {}
    for r in runs:
        if r.kind == "infer":
            continue
        for j, _ in enumerate(r.sources):
            need.setdefault((r.model, r.weights_seed, r.frame_kind), set()).update((j, f) for f in range(r.frames))
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        for (model, wseed, kind), items in need.items():
            net = network(model, wseed)
            have = store.setdefault(digest_key(net, kind), {})
            todo = sorted(i for i in items if f"{i[0]}:{i[1]}" not in have)
            if todo:
                log(f"computing {len(todo)} reference digest(s) of {model} on this machine")
            for seed, f in todo:
                have[f"{seed}:{f}"] = reference_digest(net, seed, f, kind, executor=pool, threads=threads)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(store))
    return store


def model_figures(model: str, seed: int, grid: tuple[int, int], scheme: str, layers: int | None) -> dict[str, Any]:
    """FLOPs of the model and of the plan: the ideal speed-up's terms."""
    from stealer.ftp.plan import make_plan

    net = network(model, seed)
    plan = make_plan(net, grid, layers, scheme=scheme)
    total = sum(l.flops for l in net.layers)
    fused = plan.frame_flops
    reuse = scheme != "none"
    tot = plan.totals(reuse)
    extra = [t.full.flops - t.reuse.flops for t in plan.tasks if t.reuse is not None]
    return {"gflop_total": total / 1e9, "gflop_fused": fused / 1e9, "gflop_tail": (total - fused) / 1e9,
            "flops_ratio": tot.flops_ratio, "plan_mb_per_frame": tot.bytes_per_frame / 1e6,
            "plan_input_mb": tot.input_bytes / 1e6, "plan_fallback_input_mb": tot.fallback_input_bytes / 1e6,
            "plan_overlap_mb": tot.overlap_bytes / 1e6, "plan_output_mb": tot.output_bytes / 1e6,
            "fallback_extra_gflop": (statistics.fmean(extra) / 1e9) if extra else 0.0,
            "n_tasks": len(plan.tasks)}


_TILE_RATIO: dict[tuple[Any, ...], float] = {}


def tile_cpu_ratio(model: str, seed: int, grid: tuple[int, int], scheme: str, layers: int | None) -> float:
    """CPU time of the fused block run tile by tile (as the plan runs it) / run whole, one core.

    Measured once per plan in this process (best of 2), before any cluster starts.
    """
    key = (model, seed, grid, scheme, layers)
    if key not in _TILE_RATIO:
        from stealer.ftp.execute import run_frame
        from stealer.ftp.plan import make_plan
        from stealer.images import synthetic_frame

        net = network(model, seed)
        plan = make_plan(net, grid, layers, scheme=scheme)
        x = synthetic_frame(99, 0, net.input_shape)
        net.forward(x, 0, plan.n_layers)  # compile / load kernels
        whole, tiled = [], []
        for _ in range(2):
            t0 = time.process_time()
            net.forward(x, 0, plan.n_layers)
            whole.append(time.process_time() - t0)
            t0 = time.process_time()
            run_frame(net, plan, x, reuse=scheme != "none", check=False)
            tiled.append(time.process_time() - t0)
        _TILE_RATIO[key] = min(tiled) / min(whole)
    return _TILE_RATIO[key]


def proc_stat() -> dict[str, float]:
    """Machine-wide CPU seconds: busy (user+nice+system+irq+softirq) and steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in fields]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / hz, "steal": steal / hz}


def snapshot(cluster: Any) -> dict[str, Any]:
    return {"t": time.monotonic(), "wall": time.time(), "hosts": [asdict(h) for h in cluster.snapshot()],
            "proc": proc_stat(), "self": _own_cpu()}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _listening(log_path: Path) -> dict[str, Any] | None:
    try:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"listening"' in line:
                return json.loads(line)
    except (OSError, ValueError):
        pass
    return None


def auto_choice(log_path: Path) -> dict[str, Any] | None:
    """The last ``--grid auto`` choice a source made (its ``plan`` event lines, key "RxC:L:scheme"):
    the plan, the computing nodes it was made for, and its predicted frames/s and latency; None
    if it made none."""
    last = None
    for ev in _events(log_path):
        if ev.get("event") == "plan":
            last = ev
    if last is None:
        return None
    grid_word, _, scheme = str(last["plan"]).split(":")
    rows, cols = (int(x) for x in grid_word.split("x"))
    return {"plan": grid_word if (rows, cols) == (1, 1) else f"{grid_word} {scheme}", "grid": (rows, cols),
            "scheme": scheme, "objective": last.get("objective"), "nodes": last["nodes"],
            "inflight": last["inflight"], "predicted_fps": last["fps"], "predicted_latency": last["latency"]}


def _events(log_path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def _stop(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process group still running (nodes drain and write their stats)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))


def _read_new(path: Path, pos: int) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], pos
    with open(path) as fh:
        fh.seek(pos)
        chunk = fh.read()
    lines = chunk.split("\n")
    out = [json.loads(line) for line in lines[:-1] if line.strip()]
    return out, pos + len(chunk) - len(lines[-1])


# --------------------------------------------------------------------------------- runners


_SINGLE_DEVICE = r"""
import json, sys, time
from stealer.images import synthetic_frame
from stealer.network import Network
model, seed, repeat, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
net = Network.from_random(model, seed)
load = time.perf_counter() - t0
x = synthetic_frame(0, 0, net.input_shape)
wall, cpu = [], []
for _ in range(repeat + 1):  # the first pass loads the kernels: not counted
    a, b = time.perf_counter(), time.thread_time()
    net.forward(x)
    wall.append(time.perf_counter() - a)
    cpu.append(time.thread_time() - b)
json.dump({"load_seconds": load, "wall": wall[1:], "cpu": cpu[1:],
           "gflop": sum(l.flops for l in net.layers) / 1e9}, open(out, "w"))
"""


def run_infer(run: Run, work: Path, timeout: float) -> dict[str, Any]:
    """The single-node baseline: whole-frame ``Network.forward`` on one thread (what
    ``stealer infer --threads 1 --repeat R`` runs), on one emulated host; wall and CPU time per
    frame, the first (kernel-loading) pass excluded."""
    from tools.emulate import Cluster

    out = work / "infer.json"
    argv = [sys.executable, "-c", _SINGLE_DEVICE, run.model, str(run.weights_seed), str(run.frames), str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    with Cluster(1, list(run.cpu), None) as cl:
        a = proc_stat()
        r = cl.run(0, argv, timeout=timeout, env=env, substitute=False)
        b = proc_stat()
        cpu = cl.cpu_seconds(0)
    if r.returncode != 0:
        raise RuntimeError(f"single-device run failed ({r.returncode}): {r.stderr[-2000:]}")
    info = json.loads(out.read_text())
    med = statistics.median(info["wall"])
    wall = time.monotonic() - t0
    return {"fps": 1 / med, "forward_seconds": info["wall"], "forward_median": med,
            "cpu_per_frame": statistics.median(info["cpu"]), "load_seconds": info["load_seconds"],
            "gflop": info["gflop"], "wall_seconds": wall, "cpu_seconds_total": cpu, "frames_ok": len(info["wall"]),
            "foreign_cores": round((b["busy"] - a["busy"] - cpu) / max(1e-9, wall), 3), "mismatches": 0,
            "command": "Network.forward(x) on one thread, in host 0 (" + shlex.join(argv[:2]) + " ...)"}


def quiet_machine(max_wait: float, limit: float = 0.35) -> float:
    """Wait (at most ``max_wait`` s) until other processes use less than ``limit`` cores over 3 s;
    returns the last load seen. Other agents share this VM: this keeps their bursts out of runs."""
    deadline = time.monotonic() + max_wait
    while True:
        a, t = proc_stat()["busy"], time.monotonic()
        time.sleep(3)
        load = (proc_stat()["busy"] - a) / (time.monotonic() - t)
        if load < limit or time.monotonic() > deadline:
            if load >= limit:
                log(f"  the machine is still busy ({load:.2f} cores used by others); running anyway")
            return load
        time.sleep(5)


def _seed_of(run: Run, host_ids: dict[int, str]) -> dict[str, int]:
    """Source id ("<node id>/0") -> synthetic seed."""
    out = {}
    for j, host in enumerate(run.sources):
        if host in host_ids:
            out[f"{host_ids[host]}/0"] = j
    return out


def run_stealer(run: Run, work: Path, timeout: float) -> dict[str, Any]:
    results_path = work / "results.jsonl"
    total = run.total_frames
    base = [sys.executable, "-m", "stealer", "node", "--cfg", run.model, "--random-weights", str(run.weights_seed)]
    if run.grid_auto:
        # the planner chooses grid and scheme for the links as they are (unshaped: a gigabit)
        mbit = (_rate_bits(run.rate) or 1_000_000_000) / 1e6
        base += ["--grid", "auto", "--objective", run.objective, "--link-mbit", f"{mbit:g}"]
    else:
        base += ["--grid", f"{run.grid[0]}x{run.grid[1]}", "--scheme", run.scheme]
    base += ["--policy", run.policy, "--max-inflight", str(run.max_inflight)]
    if run.layers:
        base += ["--layers", str(run.layers)]
    if run.frame_codec != "raw":
        base += ["--frame-codec", run.frame_codec, "--jpeg-quality", str(run.jpeg_quality)]
    base += list(run.node_args)
    argvs = []
    for i in range(run.nodes):
        argv = base + ["--stats", str(work / f"node{i}.json")]
        if i == 0:
            argv += ["--gateway", "--out", str(results_path), "--expect", str(total)]
        for j, host in enumerate(run.sources):
            if host == i:
                argv += ["--source", f"synthetic:{j}", "--frames", str(run.frames)]
        argvs.append(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return _drive(run, work, timeout, results_path, total,
                  lambda cl: [cl.spawn(i, a, env=env, stdout=open(work / f"node{i}.log", "wb"),
                                       stderr=subprocess.STDOUT, substitute=False) for i, a in enumerate(argvs)],
                  gateway_index=0, commands=[shlex.join(a) for a in argvs])


def run_dask(run: Run, work: Path, timeout: float) -> dict[str, Any]:
    results_path = work / "results.jsonl"
    if len(run.sources) != 1:
        raise ValueError("the dask baseline has one camera (client)")
    client_host = run.sources[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", STEALER_DASK_CFG=run.model,
               STEALER_DASK_SEED=str(run.weights_seed), STEALER_DASK_GRID=f"{run.grid[0]}x{run.grid[1]}",
               STEALER_DASK_LAYERS=str(run.layers or ""), STEALER_DASK_SCHEME=run.scheme,
               STEALER_DASK_CODEC=run.frame_codec, STEALER_DASK_JPEG_QUALITY=str(run.jpeg_quality))
    commands: list[str] = []

    def spawn(cl: Any) -> list[subprocess.Popen[Any]]:
        ip0 = cl.hosts[0].ip
        addr = f"tcp://{ip0}:8786"
        procs = []
        sched = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", ip0, "--port", "8786",
                 "--no-dashboard"]
        commands.append("host 0: " + shlex.join(sched))
        procs.append(cl.spawn(0, sched, env=env, stdout=open(work / "scheduler.log", "wb"), stderr=subprocess.STDOUT,
                              substitute=False))
        for i in range(run.nodes):
            w = [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1", "--nworkers", "1",
                 "--memory-limit", "0", "--no-dashboard", "--preload", "bench.dask_baseline", "--name", f"host{i}",
                 "--host", cl.hosts[i].ip]
            commands.append(f"host {i}: " + shlex.join(w))
            procs.append(cl.spawn(i, w, env=env, stdout=open(work / f"worker{i}.log", "wb"),
                                  stderr=subprocess.STDOUT, substitute=False))
        c = [sys.executable, str(ROOT / "bench" / "dask_baseline.py"), "--scheduler", addr, "--workers",
             str(run.nodes), "--seed", "0", "--frames", str(run.frames), "--max-inflight", str(run.max_inflight),
             "--out", str(results_path), "--stats", str(work / "dask_stats.json")]
        commands.append(f"host {client_host}: " + shlex.join(c))
        procs.insert(0, cl.spawn(client_host, c, env=env, stdout=open(work / "client.log", "wb"),
                                 stderr=subprocess.STDOUT, substitute=False))
        return procs

    return _drive(run, work, timeout, results_path, run.frames, spawn, gateway_index=0, commands=commands)


def _drive(run: Run, work: Path, timeout: float, results_path: Path, total: int, spawn: Any, *,
           gateway_index: int, commands: list[str]) -> dict[str, Any]:
    """Start the cluster, spawn, follow the results with a snapshot per new result, stop."""
    from tools.emulate import Cluster

    results: list[dict[str, Any]] = []
    marks: list[tuple[int, dict[str, Any]]] = []  # (results seen, snapshot)
    pos = 0
    status = "ok"
    with Cluster(run.nodes, list(run.shares), run.rate) as cl:
        s0 = snapshot(cl)
        procs = spawn(cl)
        lead = procs[gateway_index]
        deadline = time.monotonic() + timeout
        while len(results) < total:
            new, pos = _read_new(results_path, pos)
            if new:
                results += new
                marks.append((len(results), snapshot(cl)))
                continue
            if lead.poll() is not None:
                status = f"lead process exited early ({lead.returncode})"
                break
            if time.monotonic() > deadline:
                status = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.1)
        s_end = snapshot(cl)
        if len(results) >= total:
            # the gateway (dask: the client) exits by itself once it has everything and writes
            # its statistics; the other nodes are then asked to drain and write theirs
            with contextlib.suppress(subprocess.TimeoutExpired):
                lead.wait(60)
        _stop(procs, 45)
        hosts = [asdict(h) for h in cl.hosts]
    return {"status": status, "results": results, "marks": marks, "s0": s0, "s_end": s_end,
            "hosts": hosts, "commands": commands}


# --------------------------------------------------------------------------------- analysis


def analyse(run: Run, raw: dict[str, Any], work: Path, digests: dict[str, dict[str, str]],
            base: dict[str, Any]) -> dict[str, Any]:
    """Turn a run's raw record into the figures of the report (and check the digests)."""
    results = raw["results"]
    n = len(results)
    total = run.total_frames
    shares = [s if s is not None else 1.0 for s in run.shares]
    # --- node statistics and identities
    nodes: list[dict[str, Any]] = []
    host_ids: dict[int, str] = {}
    first_task: list[float] = []
    dstats: dict[str, Any] = {}
    if run.kind == "dask" and (work / "dask_stats.json").exists():
        dstats = json.loads((work / "dask_stats.json").read_text())
    for i in range(run.nodes):
        st: dict[str, Any] = {}
        if run.kind == "stealer":
            f = work / f"node{i}.json"
            st = json.loads(f.read_text()) if f.exists() else {}
            lst = _listening(work / f"node{i}.log")
            if lst:
                host_ids[i] = lst["node_id"]
            for ev in _events(work / f"node{i}.log"):
                if ev.get("event") == "first-task":
                    first_task.append(ev["time"])
        else:
            ip = raw["hosts"][i]["ip"]
            for addr, w in (dstats.get("workers") or {}).items():
                if addr.split("://")[-1].split(":")[0] == ip:
                    st = dict(w, stolen=None)
        nodes.append({"host": i, "cpu": run.shares[i], "role": st.get("role", "dask" if run.kind == "dask" else "?"),
                      **{k: st.get(k) for k in ("tiles_run", "tails_run", "stolen", "steal_failures", "reuse_fallbacks",
                                                "requeued", "duplicates_dropped", "speculative", "busy_seconds",
                                                "input_bytes_raw", "input_bytes_sent", "encoded_grants")},
                      "stats_ok": bool(st)})
    # --- digests
    if run.kind == "stealer":
        seeds = _seed_of(run, host_ids)
    else:
        seeds = {f"dask/{j}": j for j in range(len(run.sources))}
    have = digests.get(digest_key(network(run.model, run.weights_seed), run.frame_kind), {})
    mismatches, unknown = [], 0
    for r in results:
        seed = seeds.get(r["source"])
        want = have.get(f"{seed}:{r['frame']}") if seed is not None else None
        if want is None:
            unknown += 1
        elif want != r["output_sha256"]:
            mismatches.append([r["source"], r["frame"]])
    # --- throughput and latency: over the steady window (see steady_fps); first to last result
    # is kept as fps_all, for comparison with the earlier reports
    inflight = run.total_inflight
    stamps = sorted(r["released_at"] for r in results)
    fps_all = (n - 1) / (stamps[-1] - stamps[0]) if n >= 2 and stamps[-1] > stamps[0] else None
    steady = steady_fps(stamps, inflight)
    fps = steady.fps if steady else fps_all
    in_order = sorted(results, key=lambda r: r["released_at"])
    kept = in_order[inflight:n - inflight] if steady else in_order
    lat = [r["latency"] for r in kept]  # the warm-up burst's frames queue behind each other
    lat_all = [r["latency"] for r in results]
    s0 = raw["s0"]
    startup = (raw["marks"][0][1]["t"] - s0["t"]) if raw["marks"] else None
    # --- the CPU and traffic window: the snapshot taken when the window's first result was seen
    # to the one when its last was (marks are taken as results arrive: (results seen, snapshot));
    # without a steady window (or if both ends fell in one poll), first to last result
    win: dict[str, Any] = {}
    marks = raw["marks"]
    ends = None
    basis = "all"
    if steady:
        ia = next((i for i, (seen, _) in enumerate(marks) if seen >= inflight + 1), None)
        ib = next((i for i, (seen, _) in enumerate(marks) if seen >= n - inflight), None)
        if ia is not None and ib is not None and marks[ib][1]["t"] > marks[ia][1]["t"]:
            ends, basis = (ia, ib), "steady"
    if ends is None and len(marks) >= 2:
        ends = (0, len(marks) - 1)
    if ends is not None:
        a, b = marks[ends[0]][1], marks[ends[1]][1]
        frames_in = marks[ends[1]][0] - marks[ends[0]][0]
        w = b["t"] - a["t"]
        rate_bits = _rate_bits(run.rate)
        cpu_used = 0.0
        for i, node in enumerate(nodes):
            ha, hb = a["hosts"][i], b["hosts"][i]
            cpu = hb["cpu_seconds"] - ha["cpu_seconds"]
            tx, rx = hb["tx_bytes"] - ha["tx_bytes"], hb["rx_bytes"] - ha["rx_bytes"]
            node.update(cpu_seconds=round(cpu, 3), busy=round(cpu / (shares[i] * w), 3),
                        throttled_seconds=round(hb["throttled_seconds"] - ha["throttled_seconds"], 3),
                        tx_mb=round(tx / 1e6, 3), rx_mb=round(rx / 1e6, 3),
                        link_util=round(max(tx, rx) * 8 / (rate_bits * w), 3) if rate_bits else None)
            cpu_used += cpu
        capacity = sum(shares) * w
        machine = b["proc"]["busy"] - a["proc"]["busy"]
        win = {"basis": basis,
               "seconds": round(w, 3), "frames": frames_in, "cpu_used": round(cpu_used, 3),
               "capacity": round(capacity, 3),
               "mb_per_frame": round(sum(nd["tx_mb"] for nd in nodes) / max(1, frames_in), 3),
               # through the gateway's link, both ways (host 0): what direct data paths cut
               "gateway_mb_per_frame": round((nodes[0]["tx_mb"] + nodes[0]["rx_mb"]) / max(1, frames_in), 3),
               "max_link_util": max((nd["link_util"] or 0) for nd in nodes) if rate_bits else None,
               "foreign_cores": round((machine - cpu_used - (b["self"] - a["self"])) / w, 3),
               "vm_steal_cores": round((b["proc"]["steal"] - a["proc"]["steal"]) / w, 3)}
    end = raw["s_end"]
    all_tx = sum(h["tx_bytes"] - h0["tx_bytes"] for h, h0 in zip(end["hosts"], s0["hosts"]))
    span = None
    if first_task and raw["marks"]:
        span = raw["marks"][-1][1]["wall"] - min(first_task)
        for node in nodes:
            if node.get("busy_seconds") is not None:
                node["task_busy"] = round(node["busy_seconds"] / span, 3)
    # --- ideal and accounting (--grid auto: of the plan the source chose last)
    choice = auto_choice(work / f"node{run.sources[0]}.log") if run.grid_auto else None
    grid, scheme = (choice["grid"], choice["scheme"]) if choice else (run.grid, run.scheme)
    fig = model_figures(run.model, run.weights_seed, grid, scheme, run.layers)
    fps1 = base.get("fused_fps" if run.fused_only else "fps")
    # CPU seconds per frame, whole frame on one device (measured by thread CPU time, so other
    # processes on the VM do not inflate it)
    t1_cpu = base.get("fused_cpu_per_frame" if run.fused_only else "cpu_per_frame") or (PI_SHARE / fps1 if fps1 else None)
    cap_units = sum(shares) / PI_SHARE
    flop_factor = (fig["gflop_tail"] + fig["gflop_fused"] * fig["flops_ratio"]) / fig["gflop_total"]
    ideal = cap_units / flop_factor
    out: dict[str, Any] = {
        "run": asdict(run), "status": raw["status"], "frames_ok": n, "frames_expected": total,
        "mismatches": mismatches, "unverified": unknown, "fps": fps, "fps_all": fps_all,
        "fps_basis": "steady" if steady else "all",
        "steady": {"start": steady.start, "end": steady.end, "results": steady.results,
                   "seconds": round(steady.end - steady.start, 3), "skipped_head": inflight,
                   "dropped_tail": inflight} if steady else None,
        "speedup": (fps / fps1) if (fps and fps1) else None, "ideal_speedup": ideal,
        "capacity_units": cap_units, "baseline_fps": fps1,
        "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99),
        "latency_p50_all": pct(lat_all, 50), "latency_p99_all": pct(lat_all, 99), "startup_seconds": startup,
        "mb_per_frame_all": round(all_tx / 1e6 / max(1, n), 3), "window": win, "nodes": nodes, "plan": fig,
        "commands": raw["commands"], "work": str(work),
        "tail_seconds_p50": pct([r["tail_seconds"] for r in results if "tail_seconds" in r], 50),
    }
    if run.grid_auto:
        out["auto_choice"] = choice
    # tile inputs as sent against as raw pixels (--frame-codec): summed over the sources' grants
    raw_in = sum(nd.get("input_bytes_raw") or 0 for nd in nodes)
    if raw_in:
        out["input_bytes_ratio"] = round(sum(nd.get("input_bytes_sent") or 0 for nd in nodes) / raw_in, 4)
    if out["speedup"]:
        out["efficiency"] = out["speedup"] / ideal
        if out["speedup"] > 1.05 * ideal and cap_units > 1:  # (one node is its own baseline)
            # Results leave in frame order: a frame that straggles at start-up holds back every
            # later one, they all come out in one burst, and first-to-last result is no steady
            # state. Not ok, so that --resume runs it again.
            out["status"] = "burst: the frames came out at once behind a start-up straggler; no steady state"
    if run.kind == "dask":
        out["dask_steals"] = (dstats.get("scheduler") or {}).get("steals")
    if win and t1_cpu and fps:
        units = PI_SHARE * win["seconds"]  # CPU seconds of one Pi over the window
        useful = win["frames"] * t1_cpu
        fused_share = fig["gflop_fused"] / fig["gflop_total"]
        ratio = tile_cpu_ratio(run.model, run.weights_seed, grid, scheme, run.layers)
        fallbacks = sum(nd.get("reuse_fallbacks") or 0 for nd in nodes)
        # CPU seconds per GFLOP of the fused block at the baseline's pace
        per_gflop = t1_cpu * fused_share / fig["gflop_fused"] if fig["gflop_fused"] else 0.0
        redundancy = win["frames"] * t1_cpu * fused_share * (ratio - 1) \
            + fallbacks * fig["fallback_extra_gflop"] * per_gflop * win["frames"] / max(1, n)
        overhead = win["cpu_used"] - useful - redundancy
        idle = win["capacity"] - win["cpu_used"]
        out["accounting"] = {
            "capacity": round(win["capacity"] / units, 3), "speedup_window": round(useful / units, 3),
            "redundancy": round(redundancy / units, 3), "overhead": round(overhead / units, 3),
            "idle": round(idle / units, 3), "tile_cpu_ratio": round(ratio, 3), "fallbacks": fallbacks,
        }
    return out


def _check(r: dict[str, Any]) -> str:
    ok = r.get("status") == "ok" and not r["mismatches"] and r["frames_ok"] == r["frames_expected"]
    return "ok" if ok else f"**{len(r['mismatches'])} MISMATCH, {r['frames_ok']}/{r['frames_expected']}**"


def auto_md(report: dict[str, Any]) -> str:
    """``--grid auto`` runs: the plan the source chose and what the planner predicted, beside what
    the run measured (median over the repeats; the prediction of the repeat closest to it)."""
    rows = [r for r in report["runs"] if r["run"].get("grid_auto")]
    if not rows:
        return ""
    lines = ["| run | objective | chosen plan (frames in flight) | fps predicted | fps measured | measured / "
             "predicted | latency predicted s | latency p50 measured s | measured / predicted | p50 / 1 node | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("auto_choice") or {}
        fps, lat = r.get("fps"), r.get("latency_p50")
        pf, pl = c.get("predicted_fps"), c.get("predicted_latency")
        lines.append(f"| {r['run']['label']} | {r['run']['objective']} | {c.get('plan', '–')} ({c.get('inflight', '–')}) "
                     f"| {_f(pf, 3)} | {_f(fps, 3)} | {_f(fps / pf if fps and pf else None)} | {_f(pl)} | {_f(lat)} "
                     f"| {_f(lat / pl if lat and pl else None)} | {_f(r.get('latency_ratio'))} | {_check(r)} |")
    return "\n".join(lines)


def _rate_bits(rate: str | None) -> int | None:
    from tools.emulate import parse_rate

    return parse_rate(rate)


# --------------------------------------------------------------------------------- report

def _f(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def config_key(run: dict[str, Any]) -> str:
    """A configuration: the run without its repeat index (scenario and label included)."""
    # runs of before the auto scenario have no grid_auto/objective: the same configuration
    skip = {"repeat"} | (set() if run.get("grid_auto") else {"grid_auto", "objective"})
    return json.dumps({k: v for k, v in run.items() if k not in skip}, sort_keys=True)


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration, in first-run order: the repeat closest to the median fps
    (its per-node figures, accounting, ...) with ``fps`` replaced by the median over the
    repeats, ``fps_min``/``fps_max``/``fps_values`` their spread, latency percentiles the
    medians of the repeats', frame counts summed and the status the first failure's. Speed-ups
    are not set here (they need the baseline: see ``view``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(config_key(r["run"]), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r["run"].get("repeat", 0))
        good = [r for r in rs if r.get("fps")]
        med = _median([r["fps"] for r in good])
        rep = min(good, key=lambda r: abs(r["fps"] - med)) if good else rs[0]
        c = json.loads(json.dumps(rep))  # a copy: the runs themselves stay as measured
        bad = [r for r in rs if r.get("status") != "ok"]
        c.update(
            repeats=len(rs), fps=med, fps_values=[r.get("fps") for r in rs],
            fps_min=min((r["fps"] for r in good), default=None), fps_max=max((r["fps"] for r in good), default=None),
            fps_all=_median([r.get("fps_all") for r in rs]),
            fps_basis=("forward" if rep["run"]["kind"] == "infer" else
                       "steady" if good and all(r.get("fps_basis") == "steady" for r in good) else "all"),
            latency_p50=_median([r.get("latency_p50") for r in rs]),
            latency_p99=_median([r.get("latency_p99") for r in rs]),
            frames_ok=sum(r.get("frames_ok") or 0 for r in rs),
            frames_expected=sum(r.get("frames_expected") or 0 for r in rs),
            frames_per_run=rs[0]["run"]["frames"] * len(rs[0]["run"]["sources"]),
            mismatches=[m for r in rs for m in r.get("mismatches") or []],
            unverified=sum(r.get("unverified") or 0 for r in rs),
            status=bad[0]["status"] if bad else "ok", representative=rep.get("run_key"))
        if rep["run"]["kind"] == "infer" and good:
            c["forward_median"] = _median([r.get("forward_median") for r in good])
            c["cpu_per_frame"] = _median([r.get("cpu_per_frame") for r in good])
        out.append(c)
    return out


def view(report: dict[str, Any]) -> dict[str, Any]:
    """The report as the tables and plots show it: one record per configuration (``aggregate``),
    speed-ups and efficiencies recomputed as median fps over the median baseline, and for the
    latency scenario the ratio of each p50 to the one-node run's."""
    configs = aggregate(report.get("runs", []))
    base = _baseline(configs)
    for c in configs:
        fps1 = base.get("fused_fps" if c["run"].get("fused_only") else "fps")
        if c["run"]["kind"] == "infer":
            continue
        c["baseline_fps"] = fps1
        c["speedup"] = (c["fps"] / fps1) if (c.get("fps") and fps1) else None
        c["speedup_min"] = (c["fps_min"] / fps1) if (c.get("fps_min") and fps1) else None
        c["speedup_max"] = (c["fps_max"] / fps1) if (c.get("fps_max") and fps1) else None
        c["efficiency"] = (c["speedup"] / c["ideal_speedup"]) if c["speedup"] and c.get("ideal_speedup") else None
    # one node's latency is its best: over every grid the latency scenario ran at one node (a
    # whole frame, 1x1, has no tiling redundancy; a tiled single node would flatter the ratio)
    one = min((c for c in configs if c["run"]["scenario"] == "latency" and c["run"]["nodes"] == 1
               and c.get("latency_p50")), key=lambda c: c["latency_p50"], default=None)
    for c in configs:
        if c["run"]["scenario"] == "latency" or (c["run"].get("grid_auto") and c["run"]["max_inflight"] == 1):
            c["latency_ratio"] = (c["latency_p50"] / one["latency_p50"]) if one and c.get("latency_p50") else None
    return dict(report, runs=configs, baseline=base)


def config_summary(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON's ``configs``: per configuration, median and spread over the repeats."""
    keys = ("repeats", "fps", "fps_min", "fps_max", "fps_values", "fps_all", "fps_basis", "speedup", "speedup_min",
            "speedup_max", "ideal_speedup", "efficiency", "latency_p50", "latency_p99", "latency_ratio",
            "frames_per_run", "frames_ok", "frames_expected", "status", "representative")
    return [{"scenario": c["run"]["scenario"], "label": c["run"]["label"], "kind": c["run"]["kind"],
             "nodes": c["run"]["nodes"], "max_inflight": c["run"]["max_inflight"], "key": config_key(c["run"]),
             **{k: c.get(k) for k in keys}} for c in v["runs"]]


def baseline_of(report: dict[str, Any]) -> dict[str, Any]:
    """The best single-node fps (whole network, and the fused block alone), median over repeats."""
    return _baseline(aggregate(report.get("runs", [])))


def _baseline(configs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in configs:
        run = r["run"]
        if r["run"]["scenario"] != "single" or not r.get("fps"):
            continue
        key = "fused_fps" if run["fused_only"] else "fps"
        if r.get("cpu_per_frame"):
            out[key.replace("fps", "cpu_per_frame")] = r["cpu_per_frame"]
        if r["fps"] > out.get(key, 0):
            out[key] = r["fps"]
            out[key.replace("fps", "how")] = r["run"]["label"]
    return out


def markdown(report: dict[str, Any]) -> str:
    base = report.get("baseline", {})
    lines = [
        "| scenario | run | nodes | grid | reuse | policy | src | frames x runs | fps (median) | fps min–max | "
        "speed-up | ideal | eff. | fused fps | lat p50 s | lat p99 s | busy mean (min–max) | "
        "tiles/tails/steals per node | MB/frame | gw MB/frame | link max | start s | check |",
        "|" + "---|" * 23,
    ]
    fused = {r["run"]["nodes"]: r for r in report["runs"] if r["run"]["scenario"] == "fused"}
    for r in report["runs"]:
        run = r["run"]
        if run["kind"] == "infer":
            lines.append(f"| {run['scenario']} | {run['label']} | 1 | – | – | – | – | "
                         f"{r.get('frames_per_run', r['frames_ok'])} x {r.get('repeats', 1)} | "
                         f"{_f(r['fps'], 3)} | {_spread(r)} | 1.00 | 1.00 | – | – | {_f(r.get('forward_median'))} | "
                         f"{_f(max(r['forward_seconds'])) if r.get('forward_seconds') else '–'} | – | – | – | – | – | "
                         f"{_f(r.get('load_seconds'))} (load) | {'ok' if r.get('status') == 'ok' else r.get('status')} |")
            continue
        nodes = r["nodes"]
        busy = [nd.get("busy") for nd in nodes if nd.get("busy") is not None]
        busy_s = f"{statistics.fmean(busy):.2f} ({min(busy):.2f}–{max(busy):.2f})" if busy else "–"
        if run["kind"] == "dask":
            per = " ".join(f"{nd.get('tiles_run') or 0}/{nd.get('tails_run') or 0}" for nd in nodes)
            per += f" (dask steals {r.get('dask_steals')})"
        else:
            per = " ".join(f"{nd.get('tiles_run', '?')}/{nd.get('tails_run', '?')}/{nd.get('stolen', '?')}" for nd in nodes)
        fz = fused.get(run["nodes"]) if run["scenario"] == "scaling" else None
        check = "ok" if not r["mismatches"] and r["frames_ok"] == r["frames_expected"] and not r["unverified"] else \
            f"**{len(r['mismatches'])} MISMATCH, {r['frames_ok']}/{r['frames_expected']}**"
        win = r.get("window") or {}
        grid, scheme = f"{run['grid'][0]}x{run['grid'][1]}", run["scheme"]
        if run.get("grid_auto"):  # what the planner chose (the run's grid and scheme only name it)
            chosen = r.get("auto_choice") or {}
            grid, scheme = f"auto: {chosen.get('plan', '?')}", chosen.get("scheme", "none")
        lines.append(
            f"| {run['scenario']} | {run['label']} | {run['nodes']} | {grid} | "
            f"{'yes' if scheme != 'none' else 'no'} | {run['policy'] if run['kind'] == 'stealer' else 'dask'} | "
            f"{len(run['sources'])} | {r.get('frames_per_run', r['frames_ok'])} x {r.get('repeats', 1)} | "
            f"{_f(r['fps'], 3)}{'' if r.get('fps_basis') == 'steady' else '*'} | {_spread(r)} | {_f(r.get('speedup'))} | "
            f"{_f(r.get('ideal_speedup'))} | {_f(r.get('efficiency'))} | {_f(fz['fps'], 3) if fz else '–'} | "
            f"{_f(r['latency_p50'])} | {_f(r['latency_p99'])} | {busy_s} | {per} | {_f(win.get('mb_per_frame'))} | "
            f"{_f(win.get('gateway_mb_per_frame'))} | {_f(win.get('max_link_util'))} | {_f(r['startup_seconds'], 1)} | {check} |")
    acc = ["| run | capacity | speed-up | redundancy | overhead | idle | tile CPU ratio | fallbacks | "
           "foreign cores |", "|" + "---|" * 9]
    for r in report["runs"]:
        a = r.get("accounting")
        if not a:
            continue
        acc.append(f"| {r['run']['scenario']}: {r['run']['label']} | {a['capacity']:.2f} | {a['speedup_window']:.2f} | "
                   f"{a['redundancy']:.2f} | {a['overhead']:.2f} | {a['idle']:.2f} | {a['tile_cpu_ratio']:.2f} | "
                   f"{a['fallbacks']} | {_f(r['window'].get('foreign_cores'))} |")
    return "\n".join(lines), "\n".join(acc), base


def _spread(r: dict[str, Any]) -> str:
    lo, hi = r.get("fps_min"), r.get("fps_max")
    return f"{lo:.3f}–{hi:.3f}" if lo is not None and hi is not None else "–"


def latency_md(report: dict[str, Any]) -> str:
    """The latency scenario (one frame in flight) next to the scaling throughput at the same
    node count; ``report`` is a ``view``."""
    lat = sorted((r for r in report["runs"] if r["run"]["scenario"] == "latency"), key=lambda r: r["run"]["nodes"])
    if not lat:
        return ""
    scaling = {r["run"]["nodes"]: r for r in report["runs"] if r["run"]["scenario"] == "scaling"
               and r["run"]["kind"] == "stealer" and tuple(r["run"]["grid"]) == tuple(lat[0]["run"]["grid"])
               and r["run"]["scheme"] == lat[0]["run"]["scheme"]}
    rows = ["| nodes | grid | links | frames x runs | lat p50 s | lat p99 s | p50 / 1 node | fps, 1 in flight | "
            "fps, scaling (median) | scaling in flight | check |", "|" + "---|" * 11]
    for r in lat:
        n = r["run"]["nodes"]
        sc = scaling.get(n)
        g = r["run"]["grid"]
        scheme = "" if tuple(g) == (1, 1) else (" reuse" if r["run"]["scheme"] != "none" else " no reuse")
        check = "ok" if r.get("status") == "ok" and not r["mismatches"] and r["frames_ok"] == r["frames_expected"] \
            else f"**{len(r['mismatches'])} MISMATCH, {r['frames_ok']}/{r['frames_expected']}**"
        rows.append(f"| {n} | {g[0]}x{g[1]}{scheme} | {r['run'].get('rate') or 'unshaped'} | "
                    f"{r.get('frames_per_run')} x {r.get('repeats', 1)} | {_f(r.get('latency_p50'))} | "
                    f"{_f(r.get('latency_p99'))} | {_f(r.get('latency_ratio'))} | {_f(r.get('fps'), 3)} | "
                    f"{_f(sc['fps'], 3) + ' (' + _spread(sc) + ')' if sc else '–'} | "
                    f"{sc['run']['max_inflight'] if sc else '–'} | {check} |")
    return "\n".join(rows)


def per_node_md(report: dict[str, Any], scenario: str = "scaling") -> str:
    out = []
    for r in report["runs"]:
        if r["run"]["scenario"] != scenario or r["run"]["kind"] == "infer":
            continue
        out.append(f"\n**{r['run']['label']}** ({_f(r['fps'], 3)} fps)\n")
        out.append("| host | cpu | role | tiles | tails | stolen | steal fails | fallbacks | busy (CPU) | busy (tasks) | "
                   "sent MB | recv MB | link util |")
        out.append("|" + "---|" * 13)
        for nd in r["nodes"]:
            out.append(f"| {nd['host']} | {nd['cpu']} | {nd['role']} | {nd.get('tiles_run')} | {nd.get('tails_run')} | "
                       f"{nd.get('stolen')} | {nd.get('steal_failures')} | {nd.get('reuse_fallbacks')} | "
                       f"{_f(nd.get('busy'))} | {_f(nd.get('task_busy'))} | {_f(nd.get('tx_mb'), 1)} | "
                       f"{_f(nd.get('rx_mb'), 1)} | {_f(nd.get('link_util'))} |")
    return "\n".join(out)


def plots(report: dict[str, Any], outdir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    made = []

    def series(scenario: str, kind: str = "stealer") -> list[tuple[int, dict[str, Any]]]:
        return sorted(((r["run"]["nodes"], r) for r in runs if r["run"]["scenario"] == scenario
                       and r["run"]["kind"] == kind and r.get("speedup")), key=lambda x: x[0])

    # 1. speed-up vs nodes
    sc = series("scaling")
    if sc:
        fig, ax = plt.subplots(figsize=(7.5, 5.2))
        ns = [n for n, _ in sc]
        xs = list(range(1, max(ns) + 1))
        ideal_per_node = sc[0][1]["ideal_speedup"] / sc[0][1]["capacity_units"]
        ax.plot(xs, [n * ideal_per_node for n in xs], "k--", lw=1, label="ideal (N x FLOP ratio)")
        ax.errorbar(ns, [r["speedup"] for _, r in sc],
                    yerr=[[r["speedup"] - (r.get("speedup_min") or r["speedup"]) for _, r in sc],
                          [(r.get("speedup_max") or r["speedup"]) - r["speedup"] for _, r in sc]],
                    fmt="o-", lw=2.2, capsize=3, color="tab:blue", label="stealer, 20 Mbit/s links (median, min–max)")
        un = [p for p in sc if p[0] == 1] + series("unshaped")  # one node sends nothing either way
        if len(un) > 1:
            ax.plot([n for n, _ in un], [r["speedup"] for _, r in un], "s-", ms=7, color="tab:cyan",
                    label="stealer, unshaped links (compute only)")
        du = series("unshaped", "dask")
        if du:
            ax.plot([n for n, _ in du], [r["speedup"] for _, r in du], "D", ms=8, mfc="none", color="tab:red",
                    label="Dask, unshaped links")
        fz = series("fused")
        if fz:
            ax.plot([n for n, _ in fz], [r["speedup"] for _, r in fz], "^-", color="tab:green", alpha=0.8,
                    label="stealer, fused block only (DeepThings' figure)")
        dk = series("dask", "dask")
        if dk:
            ax.plot([n for n, _ in dk], [r["speedup"] for _, r in dk], "D-", color="tab:red", label="Dask distributed")
        ax.plot([6, 8], [5.0, 6.5], "*", ms=16, color="gold", mec="k", label="targets (5.0x at 6, 6.5x at 8)")
        ax.axhspan(1.7, 3.5, xmin=0, xmax=1, color="grey", alpha=0.08)
        ax.text(1.1, 3.3, "DeepThings 1.7–3.5x (2–6 Pi 3B)", fontsize=8, color="dimgrey")
        for n, r in sc:
            ax.annotate(f"{r['fps']:.2f} fps", (n, r["speedup"]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color="tab:blue")
        ax.set_xlabel("nodes (Pi-class: 0.2 core each)")
        ax.set_ylabel("end-to-end speed-up over one node (whole frame)")
        ax.set_title("YOLOv2-608 frames/s, 5x5 fused tiles with reuse, one camera")
        ax.set_xlim(0.5, max(ns) + 0.5)
        ax.set_ylim(0, max(ns) * ideal_per_node + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        p = outdir / "speedup_vs_nodes.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    # 2. busy fraction per node, one panel per scaling run (and dask beside it)
    panels = [r for _, r in sc if r["run"]["nodes"] > 1]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.5, 3.8), sharey=True, squeeze=False)
        colors = {"gateway": "tab:purple", "worker": "tab:blue"}
        for ax, r in zip(axes[0], panels):
            nodes = r["nodes"]
            src = set(r["run"]["sources"])
            xs = [nd["host"] for nd in nodes]
            cs = ["tab:orange" if nd["host"] in src and nd["role"] != "gateway" else colors.get(nd["role"], "grey")
                  for nd in nodes]
            ax.bar(xs, [nd.get("busy") or 0 for nd in nodes], color=cs)
            ax.plot(xs, [nd.get("task_busy") or 0 for nd in nodes], "k.", ms=8)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_title(f"{r['run']['nodes']} nodes: {r['fps']:.2f} fps", fontsize=9)
            ax.set_xticks(xs)
            ax.set_xlabel("host")
        axes[0][0].set_ylabel("busy fraction of the CPU share\n(bars: cgroup CPU, dots: task time)")
        from matplotlib.patches import Patch

        axes[0][-1].legend(handles=[Patch(color="tab:purple", label="gateway"), Patch(color="tab:orange", label="source"),
                                    Patch(color="tab:blue", label="worker")], fontsize=7, loc="lower right")
        fig.suptitle("Where the CPU went: busy fraction per node (steady state)", fontsize=10)
        fig.tight_layout()
        p = outdir / "busy_per_node.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    # 3. grid sweep: throughput vs latency
    gr = [r for r in runs if r["run"]["scenario"] == "grid" and r.get("fps")]
    if gr:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for scheme, style, name in (("quad", "o-", "reuse"), ("none", "s--", "no reuse")):
            pts = sorted((r["run"]["grid"][0], r) for r in gr if (r["run"]["scheme"] != "none") == (scheme != "none"))
            if not pts:
                continue
            g = [p[0] for p in pts]
            axes[0].plot(g, [p[1]["fps"] for p in pts], style, label=name)
            axes[1].plot(g, [p[1]["latency_p50"] for p in pts], style, label=f"{name} p50")
            axes[1].plot(g, [p[1]["latency_p99"] for p in pts], style, alpha=0.4, label=f"{name} p99")
            axes[2].plot(g, [p[1]["window"].get("mb_per_frame") for p in pts], style, label=name)
        axes[0].set_ylabel("frames/s")
        axes[1].set_ylabel("latency s")
        axes[2].set_ylabel("MB on the wire per frame")
        for ax in axes:
            ax.set_xlabel("grid (N x N)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Grid size at {gr[0]['run']['nodes']} nodes: throughput, latency, traffic", fontsize=10)
        fig.tight_layout()
        p = outdir / "grid_sweep.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    # 4. policy and heterogeneous
    po = [r for r in runs if r["run"]["scenario"] in ("policy", "hetero") and r.get("fps")]
    if po:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [r["run"]["label"] for r in po]
        ax.bar(range(len(po)), [r["fps"] for r in po],
               color=["tab:blue" if r["run"]["policy"] == "steal" else "tab:grey" for r in po])
        ideal = [r["ideal_speedup"] * r["baseline_fps"] for r in po]
        ax.plot(range(len(po)), ideal, "k_", ms=30, mew=2, label="ideal")
        ax.set_xticks(range(len(po)))
        ax.set_xticklabels(labels, rotation=20, fontsize=8, ha="right")
        ax.set_ylabel("frames/s")
        ax.legend(fontsize=8)
        ax.set_title("Work stealing vs work sharing; heterogeneous cluster", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        p = outdir / "policy.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def _find(report: dict[str, Any], scenario: str, nodes: int | None = None, kind: str = "stealer",
          label: str | None = None) -> dict[str, Any] | None:
    for r in report["runs"]:
        run = r["run"]
        if run["scenario"] == scenario and run["kind"] == kind and (nodes is None or run["nodes"] == nodes) \
                and (label is None or label in run["label"]) and r.get("fps"):
            return r
    return None


def _worst_term(r: dict[str, Any] | None) -> str:
    a = (r or {}).get("accounting")
    if not a:
        return "–"
    terms = {k: a[k] for k in ("redundancy", "overhead", "idle")}
    k = max(terms, key=terms.get)
    link = (r.get("window") or {}).get("max_link_util")
    why = f"{k} {terms[k]:.2f} of {a['capacity']:.2f} Pi"
    if k == "idle" and link and link > 0.8:
        why += f" (busiest link {link:.0%} used: transfer-bound)"
    return why


def targets(report: dict[str, Any]) -> str:
    """The issue's targets, met or missed, with the largest measured loss term of each run."""
    rows = ["| target | measured | met | largest loss (Pi-equivalents) |", "|---|---|---|---|"]

    def row(name: str, value: str, ok: bool | None, why: str = "–") -> None:
        rows.append(f"| {name} | {value} | {'yes' if ok else ('no' if ok is not None else '–')} | {why} |")

    # the figures: 7.0x at 8 and 5.4x at 6 on 20 Mbit/s, 7.5x at 8 unshaped; a codec
    # run of 1x1 at 8 nodes with raw frames is the same configuration as scaling's
    for n, want, sc, tag in ((6, 5.4, "scaling", "20 Mbit/s"), (8, 7.0, "scaling", "20 Mbit/s"),
                             (8, 7.5, "unshaped", "unshaped")):
        r = _find(report, sc, n) or (_find(report, "codec", n, label="raw") if sc == "scaling" else None)
        row(f"speed-up >= {want} at {n} nodes ({tag})", f"{_f(r and r.get('speedup'))}x "
            f"(ideal {_f(r and r.get('ideal_speedup'))}, {r['run']['grid'][0]}x{r['run']['grid'][1]})" if r else "not run",
            (r["speedup"] >= want) if r and r.get("speedup") else None, _worst_term(r))
    lat = [r for r in report["runs"] if r["run"]["scenario"] == "latency" and r.get("latency_ratio")]
    for rate in dict.fromkeys(r["run"].get("rate") for r in lat if r["run"]["nodes"] > 1):
        at = [r for r in lat if r["run"].get("rate") == rate and r["run"]["nodes"] == max(x["run"]["nodes"] for x in lat)]
        if at:
            best = min(at, key=lambda r: r["latency_ratio"])
            g = best["run"]["grid"]
            row(f"single-frame latency <= 0.70x one node at {best['run']['nodes']} nodes "
                f"({'unshaped' if rate is None else rate})",
                f"{best['latency_ratio']:.2f}x ({g[0]}x{g[1]}, {best['latency_p50']:.2f} s)",
                best["latency_ratio"] <= 0.70 if rate is None else None, _worst_term(best))
    big = max((r["run"]["nodes"] for r in report["runs"] if r["run"]["scenario"] == "policy"), default=None)
    if big:
        st = _find(report, "policy", label=f"steal, {big} sources")
        sh = _find(report, "policy", label=f"share, {big} sources")
        if st and sh:
            ratio = st["fps"] / sh["fps"]
            row(f"steal >= 2.2x share, a source on each of {big} nodes", f"{ratio:.2f}x "
                f"({st['fps']:.3f} vs {sh['fps']:.3f} fps)", ratio >= 2.2, "share: " + _worst_term(sh))
        st1, sh1 = _find(report, "policy", label="steal, 1 source"), _find(report, "policy", label="share, 1 source")
        if st1 and sh1:
            row(f"(steal vs share, 1 source, {big} nodes)", f"{st1['fps'] / sh1['fps']:.2f}x", None)
    for sc in ("scaling", "unshaped"):
        for r in sorted((r for r in report["runs"] if r["run"]["scenario"] == ("dask" if sc == "scaling" else sc)
                         and r["run"]["kind"] == "dask" and r.get("fps")), key=lambda r: r["run"]["nodes"]):
            n = r["run"]["nodes"]
            mine = _find(report, sc, n) or (_find(report, "scaling", n) if n == 1 else None)
            if mine:
                row(f"ahead of Dask at {n} node(s){' (unshaped)' if sc == 'unshaped' else ''}",
                    f"{mine['fps']:.3f} vs {r['fps']:.3f} fps ({mine['fps'] / r['fps']:.2f}x)",
                    mine["fps"] > r["fps"], "dask: " + _worst_term(r))
    for h in (r for r in report["runs"] if r["run"]["scenario"] == "hetero" and r.get("speedup")):
        g = h["run"]["grid"]
        row(f"heterogeneous within 15% of the ideal weighted speed-up ({g[0]}x{g[1]})",
            f"{h['speedup']:.2f}x of ideal {h['ideal_speedup']:.2f}x ({h['speedup'] / h['ideal_speedup']:.0%})",
            h["speedup"] >= 0.85 * h["ideal_speedup"], _worst_term(h))
    return "\n".join(rows)


def write_markdown(report: dict[str, Any], path: Path, pngs: list[Path]) -> None:
    table, acc, base = markdown(report)
    m = report["meta"]
    text = [
        "# Throughput benchmark results (latest run)",
        "",
        f"Produced by `{m['command']}` on {m['date']} ({m['machine']}), "
        f"{m['seconds'] / 60:.1f} min. YOLOv2-608, random weights (seed 0), synthetic frames; Pi-class node = "
        f"{m['cpu']} core (cgroup quota), links {m['rate'] or 'unshaped'} each way (tbf). "
        "Frames/s are steady-state: the gateway's release stamps with the warm-up burst (the first "
        "`max_inflight` results) and the drain (the last `max_inflight`) left out, median over "
        f"{m.get('repeat', 1)} repeat(s) of each configuration, spread min–max (`*`: too few frames for a "
        "steady window, first to last result). Speed-up is median over median, over the best single-node "
        f"run: **{base.get('how', '?')} at {_f(base.get('fps'), 3)} fps** (fused block alone: "
        f"{_f(base.get('fused_fps'), 3)} fps). Ideal = capacity (Σ CPU share / {PI_SHARE}) × "
        "62.9 / (36.9 + 26.0 × executed-FLOP ratio). Every result is checked against single-device inference "
        "(SHA-256 of the network output).",
        "",
    ]
    text += [f"![{p.stem}](results/{p.name})" for p in pngs]
    lat = latency_md(report)
    text += ["", "## Targets", "", targets(report), "", "## All runs", "", table, "",
             "Columns: *busy* = cgroup CPU seconds / (CPU share × steady-state window) per node; "
             "*tiles/tails/steals per node* in host order (host 0 is the gateway); *MB/frame* = bytes sent by all "
             "hosts in the window / frames; *gw MB/frame* = bytes through the gateway's link (host 0, sent and "
             "received) / frames; *link max* = busiest link's utilisation of its rate; *start* = spawn "
             "to first result.", "",
             "## Where the speed-up goes (Pi-equivalents over the steady-state window)", "",
             "capacity = speed-up + redundancy + overhead + idle. *redundancy*: CPU the tiling costs beyond one "
             "whole-frame pass (tile CPU ratio measured on one core, plus reuse fallbacks); *overhead*: the rest "
             "of the CPU the nodes used (runtime, serialization, TCP); *idle*: CPU share left unused (waiting on "
             "links, dependencies, the tail). *foreign cores*: CPU used on the VM by other processes meanwhile.",
             "", acc, ""]
    if lat:
        text += ["## Single-frame latency (one frame in flight)", "",
                 "FrameStart at the gateway to release, p50/p99 over the steady window's results (the first "
                 "frame, with the connections and kernel loading, left out), median over the repeats; "
                 "*p50 / 1 node*: the ratio to the one-node latency. Beside it the scaling run's throughput "
                 "at the same node count, with its backlog (frames in flight).", "", lat, ""]
    auto = auto_md(report)
    if auto:
        text += ["## Grid auto: the planner's prediction against the measurement", "",
                 "The source's last `--grid auto` line of the run (made once every computing node had "
                 "joined) against the steady-state figures of the same run.", "", auto, ""]
    text += ["## Per node (scaling)", per_node_md(report), ""]
    notes = report.get("notes")
    if notes:
        text += ["## Notes", "", notes, ""]
    path.write_text("\n".join(text))


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer nodes, runs and frames (a few minutes); the steady window then holds "
                         "only a few results")
    ap.add_argument("--scenarios", default=None, help=f"comma list of {','.join(SCENARIOS)} [all]")
    ap.add_argument("--nodes", default=None,
                    help="node counts for scaling/latency/fused/dask [1,2,3,4,6,8; quick: 1,4]")
    ap.add_argument("--grids", default="5x5",
                    help="grids of the scaling scenario, comma list: 5x5 (reuse), 2x2:none (no reuse), 1x1 [5x5]")
    ap.add_argument("--grid", default="5x5",
                    help="grid of the other throughput scenarios (unshaped, policy, hetero, dask, defaults): "
                         "5x5 (reuse), 2x2:none, 1x1 [5x5]")
    ap.add_argument("--latency-grids", default="5x5",
                    help="grids of the latency scenario, comma list as --grids [5x5]")
    ap.add_argument("--big-nodes", type=int, default=None, help="cluster size of grid/policy [6; quick: 4]")
    ap.add_argument("--cpu", type=float, default=PI_SHARE, help=f"CPU share of a node [{PI_SHARE}]")
    ap.add_argument("--rate", default="20mbit", help="link rate each way ['20mbit'; 'none' = unshaped]")
    ap.add_argument("--frames-scale", type=float, default=1.0,
                    help=f"scale every run's frame count [1]: {MIN_FRAMES} per cluster run (shared among the "
                         f"sources), {LATENCY_FRAMES} per latency run; quick: 2 x in flight + 4")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs of each configuration; the report gives the median fps and the min–max [2]")
    ap.add_argument("--model", default="yolov2", help="cfg (built-in name or path) [yolov2]")
    ap.add_argument("--weights-seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fused layers [16]")
    ap.add_argument("--node-arg", action="append", default=[],
                    help="extra words for every stealer node's command line, e.g. "
                         "--node-arg='--limit peer_dead_after=5' (repeatable)")
    ap.add_argument("--frame-codec", choices=["raw", "zstd", "png", "jpeg"], default="raw",
                    help="every stealer node's --frame-codec; with jpeg the reference digests are computed on the "
                         "decoded JPEG frames [raw]")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="every node's --jpeg-quality (with jpeg) [90]")
    ap.add_argument("--timeout", type=float, default=None, help="per run, seconds [from the frame count]")
    ap.add_argument("--out", type=Path, default=OUT / "throughput.json")
    ap.add_argument("--digests", type=Path, default=OUT / "digests.json", help="reference digest cache")
    ap.add_argument("--md", type=Path, default=RESULTS_MD, help="Markdown report [bench/RESULTS.md]; 'none' to skip")
    ap.add_argument("--plots", type=Path, default=RESULTS_DIR, help="PNG directory [bench/results]")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run wait up to this many seconds for other processes to go quiet [120]")
    ap.add_argument("--resume", action="store_true", help="keep runs already in --out, run only the missing ones")
    ap.add_argument("--report-only", action="store_true", help="re-render table and plots from --out")
    ap.add_argument("--notes", type=Path, default=None, help="Markdown file appended to the report as Notes")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    command = "python bench/throughput.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    report: dict[str, Any] = {"runs": []}
    if (args.resume or args.report_only) and args.out.exists():
        report = json.loads(args.out.read_text())
    if args.report_only:
        return _render(report, args)
    if os.geteuid() != 0:
        print("bench/throughput.py needs root (network namespaces, cgroups)", file=sys.stderr)
        return 2
    from tools.emulate import check_environment

    check_environment()
    t_start = time.monotonic()
    fused_cfg = str(fused_cfg_path().relative_to(ROOT))
    runs = plan_runs(args, fused_cfg)
    log(f"{len(runs)} runs planned: " + "; ".join(f"{r.scenario}:{r.label}" for r in runs))
    digests = expected_digests(runs, args.digests)
    for r in runs:  # measure tiling costs now, while no cluster runs
        if r.kind != "infer":
            tile_cpu_ratio(r.model, r.weights_seed, r.grid, r.scheme, r.layers)
    old_runs = [r for r in report.get("runs", []) if "run_key" in r and "same_as" not in r]
    report["meta"] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": args.cpu,
                      "repeat": args.repeat, "node_args": [a for words in args.node_arg for a in shlex.split(words)],
                      "rate": None if args.rate == "none" else args.rate,
                      "machine": f"{os.cpu_count()} CPUs, {platform.platform()}", "seconds": 0.0}
    failures = 0
    fresh: dict[str, dict[str, Any]] = {}  # run key -> result, in this invocation
    by_key = {r["run_key"]: r for r in old_runs} if args.resume else {}
    planned: list[dict[str, Any]] = []
    keys = {r.key() for r in runs}
    kept_others = [r for r in old_runs if r["run_key"] not in keys] if args.resume else []

    def save() -> None:
        report["runs"] = planned + kept_others
        report["meta"]["seconds"] = time.monotonic() - t_start
        report["baseline"] = baseline_of(report)
        report["configs"] = config_summary(view(report))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    for run in runs:
        key = run.key()
        if key in fresh or (key in by_key and by_key[key].get("status") == "ok"):
            # the same cluster run already ran (for another scenario, or in the run resumed)
            src = fresh.get(key) or by_key[key]
            res = json.loads(json.dumps(src))
            if key in fresh:
                res["same_as"] = f"{src['run']['scenario']}: {src['run']['label']}"
                log(f"{run.scenario}: {run.label} [repeat {run.repeat + 1}]: same run as {res['same_as']}")
            else:
                fresh[key] = res
                log(f"{run.scenario}: {run.label} [repeat {run.repeat + 1}]: kept from {args.out}")
            _relabel(res, run)
            planned.append(res)
            save()
            continue
        report["runs"] = planned + kept_others
        work = Path(tempfile.mkdtemp(prefix=f"tp-{run.scenario}-", dir=OUT))
        pre_load = quiet_machine(args.quiet_wait) if args.quiet_wait > 0 else None
        timeout = args.timeout or (240 + 40 * run.total_frames / max(1, min(run.nodes, 4)))
        log(f"{run.scenario}: {run.label} [repeat {run.repeat + 1}/{args.repeat}] ({run.kind}, {run.nodes} node(s), "
            f"cpu {run.cpu}, rate {run.rate}, "
            f"grid {run.grid[0]}x{run.grid[1]} {run.scheme}, {run.policy}, {len(run.sources)} source(s) x "
            f"{run.frames} frames, in flight {run.max_inflight})")
        try:
            if run.kind == "infer":
                res = run_infer(run, work, timeout)
                res.update(run=asdict(run), status="ok", frames_expected=res["frames_ok"], unverified=0,
                           mismatches=[], work=str(work))
            else:
                raw = (run_stealer if run.kind == "stealer" else run_dask)(run, work, timeout)
                (work / "raw.json").write_text(json.dumps(raw))
                res = analyse(run, raw, work, digests, baseline_of(report))
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
            log(f"  FAILED: {exc!r} (logs in {work})")
            res = {"run": asdict(run), "status": f"error: {exc!r}", "work": str(work), "frames_ok": 0,
                   "frames_expected": run.total_frames, "mismatches": [], "unverified": 0, "fps": None}
        res["run_key"] = key
        res["pre_run_foreign_cores"] = pre_load
        fresh[key] = res
        planned.append(res)
        _summary(res)
        if res["mismatches"]:
            log(f"  !!!!! MISMATCH: {len(res['mismatches'])} frame(s) differ from single-device inference: "
                f"{res['mismatches'][:5]}")
        if res["mismatches"] or res.get("status") != "ok" or res["frames_ok"] != res["frames_expected"]:
            failures += 1
        save()
    save()
    _render(report, args)
    log(f"done in {report['meta']['seconds'] / 60:.1f} min; {failures} problem(s); wrote {args.out}")
    return 1 if failures else 0


def _relabel(res: dict[str, Any], run: Run) -> None:
    res["run"]["scenario"], res["run"]["label"] = run.scenario, run.label


def _summary(res: dict[str, Any]) -> None:
    run = res["run"]
    if run["kind"] == "infer":
        log(f"  {_f(res.get('fps'), 3)} fps (forward median {_f(res.get('forward_median'))} s)")
        return
    acc = res.get("accounting") or {}
    win = res.get("window") or {}
    st = res.get("steady") or {}
    log(f"  {res['status']}: {res['frames_ok']}/{res['frames_expected']} frames, {_f(res.get('fps'), 3)} fps "
        f"({res.get('fps_basis', 'all')}: {st.get('results', '–')} results in {_f(st.get('seconds'), 1)} s; "
        f"all results {_f(res.get('fps_all'), 3)}), "
        f"speed-up {_f(res.get('speedup'))} (ideal {_f(res.get('ideal_speedup'))}), lat p50 {_f(res.get('latency_p50'))} "
        f"p99 {_f(res.get('latency_p99'))}, start {_f(res.get('startup_seconds'), 1)} s, "
        f"{_f(win.get('mb_per_frame'))} MB/frame, link max {_f(win.get('max_link_util'))}, "
        f"idle {_f(acc.get('idle'))} overhead {_f(acc.get('overhead'))} redundancy {_f(acc.get('redundancy'))}, "
        f"foreign {_f(win.get('foreign_cores'))} cores, mismatches {len(res['mismatches'])}")


def _render(report: dict[str, Any], args: argparse.Namespace) -> int:
    """Tables and plots of the configurations (medians over the repeats), from the runs."""
    report["baseline"] = baseline_of(report)
    report["configs"] = config_summary(view(report))
    if args.notes and args.notes.exists():
        report["notes"] = args.notes.read_text()
    v = view(report)
    pngs = plots(v, args.plots)
    if str(args.md) != "none" and "meta" in report:
        write_markdown(v, args.md, pngs)
        log(f"wrote {args.md} and {len(pngs)} plot(s) in {args.plots}")
    table, acc, _ = markdown(v)
    print(table)
    print()
    print(acc)
    lat = latency_md(v)
    if lat:
        print()
        print(lat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
