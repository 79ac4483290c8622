"""Per-model figures of issue 13: what FTP can tile, and single-device speed against onnxruntime.

For each model (darknet YOLOv2, YOLOv3-tiny, YOLOv4-tiny, YOLOv4 with seeded random weights,
and, where ``tools/onnx_models.py`` can build them, the YOLOv8n-, YOLO11n-, ResNet-18- and
MobileNetV2-shaped ONNX graphs):

* GFLOP of the whole network;
* the fraction of its FLOPs inside the fused block (the planner's default depth);
* executed-FLOP ratio of the fused block at 3x3 and 5x5, without and with reuse;
* single-device time, **single-threaded**, of stealer against onnxruntime on the *same graph
  with the same weights*, in the same run, alternating (so both see the same machine);
  darknet models are written as ONNX by ``tools/export_onnx.py`` (up to their detection
  layers' inputs), ONNX models are read by stealer's importer;
* max |diff| between the two, and the outputs' largest magnitude.

Targets: at least 80% of YOLOv4-tiny's and of the YOLOv8n graph's FLOPs inside fused tiles;
5x5 executed-FLOP ratio with reuse <= 1.10 for both; single-thread speed against onnxruntime no
worse than YOLOv2's.

Usage::

    python bench/models.py [--models yolov2,yolov4-tiny,...] [--repeat 5] [--plans-only] [--out bench/out/models.json]

``--plans-only`` skips the timing columns (no onnxruntime session, no stealer run): the FTP
figures alone, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Single-threaded, both sides: Numba's kernels (NUMBA_NUM_THREADS) and the BLAS that numpy calls
# for the tail's MatMul/Gemm (OpenBLAS starts a thread per core by default: on a shared 2-core
# machine its threads fight, and a 1280x1000 Gemm took 3.6 ms instead of 0.18). Set before numpy
# is imported, which is when OpenBLAS reads them.
for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stealer.errors import StealerError  # noqa: E402
from stealer.ftp.plan import AUTO_SCHEME, fusable_depth, make_plan  # noqa: E402
from stealer.network import BUILTIN_MODELS, Network  # noqa: E402

DARKNET = ("yolov2", "yolov3-tiny", "yolov4-tiny", "yolov4")
ONNX = ("yolov8n", "yolo11n", "resnet18", "mobilenetv2")
TARGETS = {"fused_fraction": 0.80, "flops_ratio_5x5_reuse": 1.10}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(name: str, seed: int, work: Path) -> tuple[Network, Any, Callable[[Network, np.ndarray], list[np.ndarray]]]:
    """(stealer network, ONNX model, what stealer computes that the graph's outputs are)."""
    import onnx

    if name in BUILTIN_MODELS:
        from tools.export_onnx import network_to_onnx, reference_outputs

        net = Network.from_random(name, seed)
        return net, network_to_onnx(net), reference_outputs
    from tools import onnx_models

    builder = {"yolov8n": "yolov8", "yolo11n": "yolo11"}.get(name, name)  # the n-scale is the default
    model = onnx_models.MODELS[builder](seed=seed)
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    net = Network.from_onnx(path)
    return net, model, lambda n, x: list(n.outputs(x))


def ort_session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def plan_figures(net: Network) -> dict[str, Any]:
    """FTP figures of the block the planner chooses at each grid (``--layers`` unset: DeepThings'
    16 for YOLOv2, the cost model's depth for DAG models; reuse scheme "auto") and of the deepest
    block the model allows (:func:`fusable_depth`), each with and without reuse."""
    total = sum(r.gflop for r in net.table()) * 1e9
    out: dict[str, Any] = {"gflop": round(total / 1e9, 3), "fusable_layers": fusable_depth(net.spec)}
    for grid in ((3, 3), (5, 5)):
        name = f"{grid[0]}x{grid[1]}"
        for tag, layers in (("", None), ("deepest_", out["fusable_layers"])):
            try:
                plan = make_plan(net, grid, layers, scheme=AUTO_SCHEME)
            except StealerError as exc:
                out[f"{tag}plan_{name}"] = f"error: {exc}"
                continue
            out[f"{tag}fused_layers_{name}"] = plan.n_layers
            out[f"{tag}fused_fraction_{name}"] = round(plan.frame_flops / total, 4)
            out["scheme"] = plan.scheme
            out[f"{tag}flops_ratio_{name}"] = round(plan.totals(False).flops_ratio, 4)
            out[f"{tag}flops_ratio_{name}_reuse"] = round(plan.totals(True).flops_ratio, 4)
    return out


def timing(net: Network, model: Any, reference: Callable[[Network, np.ndarray], list[np.ndarray]],
           repeat: int) -> dict[str, Any]:
    x = np.random.default_rng(0).random(net.input_shape, dtype=np.float32)
    sess = ort_session(model)
    feed = {sess.get_inputs()[0].name: x[None]}
    ours = reference(net, x)  # warm (JIT from cache) and the values to compare
    theirs = [o[0] for o in sess.run(None, feed)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    scale = max(float(np.abs(a).max()) for a in ours)
    t_ours: list[float] = []
    t_ort: list[float] = []
    for _ in range(repeat):  # alternate, so both see the same machine
        t = time.perf_counter()
        reference(net, x)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        sess.run(None, feed)
        t_ort.append(time.perf_counter() - t)
    ratios = [b / a for a, b in zip(t_ours, t_ort)]  # > 1: stealer faster
    return {"stealer_s": round(statistics.median(t_ours), 4), "onnxruntime_s": round(statistics.median(t_ort), 4),
            "speed_vs_onnxruntime": round(statistics.median(ratios), 3),
            "speed_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "max_abs_diff": diff, "max_abs_output": scale, "rel_diff": diff / scale if scale else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DARKNET + ONNX))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--plans-only", action="store_true", help="FTP figures only: skip the timing against onnxruntime")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "models.json")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            log(f"{name}: loading")
            try:
                net, model, reference = load(name, args.seed, Path(tmp))
            except (ImportError, AttributeError, StealerError) as exc:
                log(f"{name}: skipped ({type(exc).__name__}: {exc})")
                rows.append({"model": name, "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            row: dict[str, Any] = {"model": name, "input": list(net.input_shape)}
            row.update(plan_figures(net))
            if not args.plans_only:
                log(f"{name}: timing ({args.repeat} runs each)")
                row.update(timing(net, model, reference, args.repeat))
            rows.append(row)
            log(json.dumps(row))
    header = (f"{'model':<12} {'input':>11} {'GFLOP':>6} | {'chosen 5x5':>10} {'in fused':>8} {'3x3':>6} {'3x3 r':>6} "
              f"{'5x5':>6} {'5x5 r':>6} | {'deepest':>7} {'in fused':>8} {'5x5':>6} {'5x5 r':>6} | {'ours s':>7} "
              f"{'ORT s':>7} {'speed':>6} {'spread':>11} {'rel diff':>8}")
    print(header)
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<12} skipped: {r['skipped']}")
            continue

        def f(key: str, fmt: str = "{:.3f}") -> str:
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        spread = "-" if "speed_spread" not in r else f"{r['speed_spread'][0]:.2f}-{r['speed_spread'][1]:.2f}"
        print(f"{r['model']:<12} {'x'.join(map(str, r['input'])):>11} {f('gflop', '{:.1f}'):>6} | "
              f"{f('fused_layers_5x5', '{:d}'):>10} {f('fused_fraction_5x5', '{:.1%}'):>8} "
              f"{f('flops_ratio_3x3'):>6} {f('flops_ratio_3x3_reuse'):>6} {f('flops_ratio_5x5'):>6} "
              f"{f('flops_ratio_5x5_reuse'):>6} | {f('deepest_fused_layers_5x5', '{:d}'):>7} "
              f"{f('deepest_fused_fraction_5x5', '{:.1%}'):>8} {f('deepest_flops_ratio_5x5'):>6} "
              f"{f('deepest_flops_ratio_5x5_reuse'):>6} | {f('stealer_s'):>7} {f('onnxruntime_s'):>7} "
              f"{f('speed_vs_onnxruntime', '{:.2f}x'):>6} {spread:>11} {f('rel_diff', '{:.1e}'):>8}")
    print("chosen: the block the planner picks at 5x5 (YOLOv2: DeepThings' 16; DAG models: the cost model's depth "
          "for 20 Mbit/s); deepest: every layer that can be fused. 3x3/5x5: executed-FLOP ratio of that block, "
          "'r' with reuse (scheme auto: quad for chains, wave for DAG blocks). speed: onnxruntime's time / "
          "stealer's, single thread each, median of alternating runs (> 1: stealer faster), spread min-max; "
          "rel diff: max |stealer - onnxruntime| / max |output|.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                                             "repeat": args.repeat, "seed": args.seed, "targets": TARGETS},
                                    "models": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
