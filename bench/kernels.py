"""Benchmark of the Numba kernels on YOLOv2's first 16 layers, single-threaded.

For each layer it times (best of ``--reps``, implementations interleaved so that noise from
other processes hits them alike):

* ``exact``: ``kernels.conv2d`` default path (tile-invariant blocked GEMM) / ``kernels.maxpool2d``
* ``fast``:  ``kernels.conv2d(..., exact=False)`` (im2col + BLAS sgemm inside Numba)
* ``numpy``: im2col with numpy + ``np.dot`` (BLAS) + bias + leaky in numpy
* ``torch``: ``F.conv2d`` (with bias) + ``F.leaky_relu_`` / ``F.max_pool2d``, if torch imports

All single-threaded: BLAS thread counts are pinned to 1 through this process's own environment
before numpy is imported, and ``torch.set_num_threads(1)``.

Usage::

    python bench/kernels.py [--size 608] [--reps 5] [--out bench/out/kernels.json]
    python bench/kernels.py --model yolov4-tiny [--reps 5]    # per layer against onnxruntime
    python bench/kernels.py --depthwise [--reps 5]            # MobileNetV2's depthwise 3x3 layers
    python bench/kernels.py --new-ops [--reps 5]              # SPP pools, mish/swish convs

``--model NAME`` (a built-in model, seeded random weights) times every conv and maxpool layer
of the model at its own input size: ``net.run_layer(i, x)`` (what the forward pass calls,
argument checks included) against onnxruntime, single-threaded, on a one-layer ONNX graph of
the same shape and weights (Conv + the activation / MaxPool with darknet's padding, as
``tools/export_onnx.py`` writes them), interleaved rep by rep. ``--depthwise`` does the same
for the depthwise 3x3 convolutions of MobileNetV2 at 224x224 (groups = channels, 32..960
channels at 112..7 pixels, relu6), ``--new-ops`` for YOLOv4's stride-1 SPP pools (5, 9, 13 on
512x19x19; YOLOv3-tiny's 2x2/1) and a 3x3 conv with leaky, mish and swish. The ratio column is
onnxruntime's time / ours (> 1: ours faster); absolute times on a shared machine are noise,
ratios of interleaved runs much less so.
"""

from __future__ import annotations

import os

# Must happen before numpy (and its BLAS) is loaded. This is the benchmark's own environment.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# This file is itself named kernels.py and Python puts its folder first on sys.path: drop that
# entry so that ``import kernels`` finds the package, not this script.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))  # the project root, for stealer and tools (--model)
import kernels  # noqa: E402

try:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
except ImportError:  # torch is optional: it only provides the comparison column
    torch = None

# YOLOv2's first 16 layers: ("conv", filters, size) or ("max", size, stride); pad = size//2.
LAYERS = [
    ("conv", 32, 3), ("max", 2, 2),
    ("conv", 64, 3), ("max", 2, 2),
    ("conv", 128, 3), ("conv", 64, 1), ("conv", 128, 3), ("max", 2, 2),
    ("conv", 256, 3), ("conv", 128, 1), ("conv", 256, 3), ("max", 2, 2),
    ("conv", 512, 3), ("conv", 256, 1), ("conv", 512, 3), ("conv", 256, 1),
]


def numpy_conv(x, w, b, pad):
    """Reference-speed baseline: numpy im2col (sliding_window_view copy) + np.dot + bias + leaky."""
    co, c, k, _ = w.shape
    if k == 1:
        col = x.reshape(c, -1)
        oh, ow = x.shape[1:]
    else:
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # C, oh, ow, k, k
        oh, ow = win.shape[1:3]
        col = np.ascontiguousarray(win.transpose(0, 3, 4, 1, 2)).reshape(c * k * k, oh * ow)
    y = np.dot(w.reshape(co, -1), col).reshape(co, oh, ow)
    y += b[:, None, None]
    return np.where(y > 0, y, (y.astype(np.float64) * 0.1).astype(np.float32))


def best_times(fns: dict, reps: int) -> dict:
    """Best wall time of each callable, the callables interleaved rep by rep."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up (JIT compile or load from cache, first-touch of memory)
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# The other new operators (--new-ops): YOLOv4's SPP pools (stride 1, on 512x19x19), and a 3x3
# conv with the AlexeyAB activations mish (YOLOv4) and swish (SiLU: YOLOv8/11) next to leaky.
NEW_OPS = [("max", 512, 19, 5), ("max", 512, 19, 9), ("max", 512, 19, 13), ("max", 512, 13, 2),
           ("conv", 64, 104, "leaky"), ("conv", 64, 104, "mish"), ("conv", 64, 104, "swish")]

# MobileNetV2 (224x224)'s depthwise 3x3 convolutions: (channels, input size, stride), relu6.
DEPTHWISE = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
             (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _one_layer_net(layer, in_shape):
    """A one-layer stealer network (seeded random weights) with ``layer``'s parameters and input."""
    from stealer.layers import ConvSpec
    from stealer.network import Network

    c, h, w = in_shape
    if isinstance(layer, ConvSpec):
        sy, sx = layer.strides
        body = (f"[convolutional]\nbatch_normalize={int(layer.batch_normalize)}\nfilters={layer.filters}\n"
                f"size={layer.size}\nstride_y={sy}\nstride_x={sx}\npadding={layer.pad // layer.dilation}\n"
                f"groups={layer.groups}\ndilation={layer.dilation}\nactivation={layer.activation}\n")
    else:
        body = f"[maxpool]\nsize={layer.size}\nstride={layer.stride}\n"  # AlexeyAB's default padding
    net = Network.from_cfg_text(f"[net]\ndarknet=alexeyab\nwidth={w}\nheight={h}\nchannels={c}\n{body}")
    got = net.layers[0]
    if (got.out_shape, getattr(got, "pad", None)) != (layer.out_shape, getattr(layer, "pad", None)):
        raise SystemExit(f"layer {layer.index}: the one-layer copy has another geometry ({got} vs {layer})")
    return net


def layer_rows(cases, reps: int) -> list:
    """Time ``net.run_layer(0, x)`` of each one-layer network against onnxruntime on its export."""
    from tools.export_onnx import network_to_onnx

    rng = np.random.default_rng(0)
    hdr = (f"{'#':>3} {'layer':<30} {'in':>14} {'MFLOP':>8} {'ours ms':>9} {'ORT ms':>9} {'ours GF/s':>10} "
           f"{'ORT GF/s':>9} {'ORT/ours':>8}")
    print(hdr)
    rows = []
    for label, net in cases:
        from stealer.network import describe

        layer = net.layers[0]
        x = rng.random(net.input_shape, dtype=np.float32)
        sess = _ort_session(network_to_onnx(net))
        feed = {sess.get_inputs()[0].name: x[None]}
        ours = net.run_layer(0, x)
        theirs = sess.run(None, feed)[0][0]
        diff = float(np.abs(ours - theirs).max())
        t = best_times({"ours": lambda: net.run_layer(0, x), "ort": lambda: sess.run(None, feed)}, reps)
        flops = layer.flops
        gf = {n: (flops / t[n] / 1e9 if flops else 0.0) for n in t}
        row = {"layer": label, "desc": describe(layer), "in_shape": list(net.input_shape), "mflop": flops / 1e6,
               "ms": {n: t[n] * 1e3 for n in t}, "ort_over_ours": t["ort"] / t["ours"], "max_abs_diff": diff}
        rows.append(row)
        print(f"{label:>3} {describe(layer):<30} {'x'.join(map(str, net.input_shape)):>14} {flops / 1e6:>8.1f} "
              f"{t['ours'] * 1e3:>9.3f} {t['ort'] * 1e3:>9.3f} {gf['ours']:>10.1f} {gf['ort']:>9.1f} "
              f"{t['ort'] / t['ours']:>8.2f}", flush=True)
    ours = sum(r["ms"]["ours"] for r in rows)
    ort = sum(r["ms"]["ort"] for r in rows)
    print(f"    {'sum':<30} {'':>14} {sum(r['mflop'] for r in rows):>8.0f} {ours:>9.2f} {ort:>9.2f} "
          f"{'':>10} {'':>9} {ort / ours:>8.2f}")
    return rows


def main_layers(args) -> int:
    from stealer.layers import ConvSpec, MaxPoolSpec
    from stealer.network import Network

    cases = []
    if args.model:
        net = Network.from_random(args.model, 0)
        for layer in net.layers:
            if isinstance(layer, (ConvSpec, MaxPoolSpec)):
                cases.append((str(layer.index), _one_layer_net(layer, net.input_shape_of(layer.index))))
        name = args.model
    elif args.depthwise:
        from stealer.darknet import parse_cfg_text

        for c, size, s in DEPTHWISE:
            text = (f"[net]\ndarknet=alexeyab\nwidth={size}\nheight={size}\nchannels={c}\n[convolutional]\n"
                    f"batch_normalize=1\nfilters={c}\nsize=3\nstride={s}\npad=1\ngroups={c}\nactivation=relu6\n")
            parse_cfg_text(text)  # fail early on a bad shape
            cases.append(("dw", Network.from_cfg_text(text)))
        name = "depthwise"
    if args.new_ops:
        for kind, c, size, arg in NEW_OPS:
            body = (f"[maxpool]\nsize={arg}\nstride=1\n" if kind == "max" else
                    f"[convolutional]\nbatch_normalize=1\nfilters={c}\nsize=3\npad=1\nactivation={arg}\n")
            cases.append((kind, Network.from_cfg_text(f"[net]\ndarknet=alexeyab\nwidth={size}\nheight={size}\n"
                                                      f"channels={c}\n{body}")))
        name = "new-ops"
    rows = layer_rows(cases, args.reps)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": {"model": name, "reps": args.reps, "threads": 1}, "layers": rows},
                                   indent=2))
    print(f"wrote {out_path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=608, help="input height and width (default 608)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    ap.add_argument("--out", default="bench/out/kernels.json", help="JSON output path")
    ap.add_argument("--no-fast", action="store_true", help="skip the exact=False (BLAS) path")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy baseline")
    ap.add_argument("--model", help="per layer of this built-in model against onnxruntime (see the docstring)")
    ap.add_argument("--depthwise", action="store_true",
                    help="MobileNetV2's depthwise 3x3 layers against onnxruntime")
    ap.add_argument("--new-ops", action="store_true",
                    help="SPP's stride-1 pools and mish/swish convs against onnxruntime")
    args = ap.parse_args(argv)
    if args.model or args.depthwise or args.new_ops:
        if args.out == "bench/out/kernels.json":
            args.out = f"bench/out/kernels-{args.model or ('depthwise' if args.depthwise else 'new-ops')}.json"
        return main_layers(args)

    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = []
    impls = ["exact"] + ([] if args.no_fast else ["fast"]) + ([] if args.no_numpy else ["numpy"])
    impls += ["torch"] if torch is not None else []
    hdr = f"{'#':>2} {'layer':<22} {'in':>14} {'MFLOP':>8} " + " ".join(f"{n + ' ms':>9}" for n in impls)
    hdr += " " + " ".join(f"{n + ' GF/s':>10}" for n in impls)
    hdr += f" {'exact/torch':>11}" if torch is not None else ""
    print(hdr)
    for i, spec in enumerate(LAYERS):
        c, h, w = x.shape
        fns = {}
        if spec[0] == "conv":
            _, co, k = spec
            pad = k // 2
            wt = (rng.standard_normal((co, c, k, k)) * np.sqrt(2.0 / (c * k * k))).astype(np.float32)
            bs = (rng.standard_normal(co) * 0.1).astype(np.float32)
            out = np.empty((co, h, w), np.float32)
            flops = 2.0 * co * h * w * c * k * k
            name = f"conv {k}x{k}/1 {c}->{co}"
            fns["exact"] = lambda: kernels.conv2d(x, wt, bs, pad_top=pad, pad_left=pad, activation="leaky", out=out)
            if "fast" in impls:
                fns["fast"] = lambda: kernels.conv2d(x, wt, bs, pad_top=pad, pad_left=pad, activation="leaky",
                                                     out=out, exact=False)
            if "numpy" in impls:
                fns["numpy"] = lambda: numpy_conv(x, wt, bs, pad)
            if torch is not None:
                tx, tw, tb = (torch.from_numpy(a) for a in (x[None], wt, bs))

                def tfn():
                    return F.leaky_relu_(F.conv2d(tx, tw, tb, padding=pad), 0.1)

                fns["torch"] = tfn
            y_next = lambda: kernels.conv2d(x, wt, bs, pad_top=pad, pad_left=pad, activation="leaky")
        else:
            _, size, stride = spec
            flops = 0.0
            name = f"max {size}x{size}/{stride}"
            fns["exact"] = lambda: kernels.maxpool2d(x, size=size, stride=stride)
            if torch is not None:
                tx = torch.from_numpy(x[None])
                fns["torch"] = lambda: F.max_pool2d(tx, size, stride)
            y_next = lambda: kernels.maxpool2d(x, size=size, stride=stride)
        t = best_times(fns, args.reps)
        row = {"index": i, "layer": name, "in_shape": [c, h, w], "mflop": flops / 1e6,
               "ms": {n: t[n] * 1e3 for n in t},
               "gflops": {n: (flops / t[n] / 1e9 if flops else None) for n in t}}
        if "torch" in t:
            row["exact_over_torch"] = t["torch"] / t["exact"]  # >1: ours is faster
        rows.append(row)
        line = f"{i:>2} {name:<22} {str((c, h, w)):>14} {flops / 1e6:>8.0f} "
        line += " ".join(f"{t[n] * 1e3:>9.2f}" if n in t else f"{'-':>9}" for n in impls)
        line += " " + " ".join(f"{flops / t[n] / 1e9:>10.1f}" if (n in t and flops) else f"{'-':>10}" for n in impls)
        if "torch" in t:
            line += f" {t['torch'] / t['exact']:>11.2f}"
        print(line, flush=True)
        x = y_next()

    conv_flops = sum(r["mflop"] for r in rows) * 1e6
    conv_rows = [r for r in rows if r["mflop"]]
    summary = {}
    for n in impls:
        conv_ms = sum(r["ms"][n] for r in conv_rows if n in r["ms"])
        entry = {"conv_ms": conv_ms, "conv_gflops": conv_flops / (conv_ms / 1e3) / 1e9}
        if all(n in r["ms"] for r in rows):  # fast/numpy have no maxpool of their own
            entry["block_ms"] = sum(r["ms"][n] for r in rows)
            entry["block_gflops"] = conv_flops / (entry["block_ms"] / 1e3) / 1e9
        summary[n] = entry
    print(f"\n16-layer block at {args.size}x{args.size} ({conv_flops / 1e9:.2f} GFLOP), single thread:")
    print(f"  {'impl':<6} {'conv ms':>9} {'GFLOP/s':>8} {'block ms':>9} {'GFLOP/s':>8}")
    for n, v in summary.items():
        blk = f"{v['block_ms']:9.1f} {v['block_gflops']:8.1f}" if "block_ms" in v else f"{'-':>9} {'-':>8}"
        print(f"  {n:<6} {v['conv_ms']:9.1f} {v['conv_gflops']:8.1f} {blk}")
    if "torch" in summary:
        t, e = summary["torch"], summary["exact"]
        print(f"  exact/torch throughput: conv layers {t['conv_ms'] / e['conv_ms']:.3f}, "
              f"whole block incl. maxpool {t['block_ms'] / e['block_ms']:.3f}")
        if "fast" in summary:
            print(f"  fast/torch throughput: conv layers {t['conv_ms'] / summary['fast']['conv_ms']:.3f}")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"size": args.size, "reps": args.reps, "python": sys.version.split()[0], "numpy": np.__version__,
            "torch": torch.__version__ if torch is not None else None, "machine": platform.machine(),
            "processor": platform.processor(), "threads": 1}
    try:
        import numba

        meta["numba"] = numba.__version__
    except ImportError:
        pass
    out_path.write_text(json.dumps({"meta": meta, "layers": rows, "total": summary}, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
