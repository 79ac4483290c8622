"""Command-line arguments shared by ``stealer.cli`` and ``stealer.launcher``.

Both ``stealer node`` (cli) and ``stealer run`` (launcher) take the model options and a tile
grid; the helpers live here so that neither module has to import the other for them (cli
imports the launcher for its ``run`` command, and the launcher needs nothing from cli).

The heavy imports (the network and its numba kernels, the tile planner) stay inside the
functions, so that building the parser and ``--help`` stay quick.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .errors import ConfigError, StealerError

if TYPE_CHECKING:
    from .network import Network

__all__ = ["add_auto_args", "add_codec_args", "add_model_args", "add_shard_args", "auto_argv", "codec_argv", "load_network",
           "model_argv", "parse_grid_arg", "parse_grid_or_auto"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--cfg`` and either ``--weights`` or ``--random-weights``; or ``--model x.onnx``."""
    p.add_argument("--cfg", default="yolov2",
                   help="darknet cfg path, or a built-in model: yolov2, yolov3, yolov4 (608), yolov2-tiny, "
                        "yolov3-tiny, yolov4-tiny (416) [yolov2]")
    p.add_argument("--model", metavar="PATH.onnx", default=None,
                   help="an ONNX model (graph and weights, static input size, batch 1) instead of --cfg")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", help="darknet .weights file for the cfg")
    g.add_argument("--random-weights", type=int, metavar="SEED", default=None,
                   help="use deterministic random weights with this seed (the default when no --weights: 0)")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    """``--shards K`` and ``--coded`` (``stealer node``, ``stealer run``)."""
    p.add_argument("--shards", type=_shard_count, default=0, metavar="K",
                   help="model parallelism: the gateway places the tail's weighted layers as K shards each "
                        "(by output channels) on the nodes it knows, by the memory each offers; every node "
                        "then reads only the weights it is given [0: off]")
    p.add_argument("--pipeline", type=_stage_count, default=0, metavar="S",
                   help="model parallelism for throughput: the gateway places the tail's weighted layers whole, "
                        "in S consecutive stages of about equal FLOPs on S nodes, and runs S frames' tails at "
                        "once (shard mode with K = 1; not with --shards K > 1 or --coded) [0: off]")
    p.add_argument("--coded", action="store_true",
                   help="with --shards: a parity shard per sharded layer, so a late or lost shard is "
                        "recovered at once (within a stated tolerance; the result line names it)")


def _stage_count(text: str) -> int:
    try:
        s = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pipeline wants a whole number, got {text!r}") from None
    if s != 0 and not 2 <= s <= 64:
        raise argparse.ArgumentTypeError(f"--pipeline {s}: 0 (off) or 2 to 64 stages")
    return s


def _shard_count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards wants a whole number, got {text!r}") from None
    if not 0 <= k <= 64:
        raise argparse.ArgumentTypeError(f"--shards {k}: 0 (off) to 64")
    return k


def model_argv(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_model_args` again as argv, for the launcher's child nodes."""
    if getattr(args, "model", None):
        return ["--model", str(args.model)]
    out = ["--cfg", str(args.cfg)]
    if args.weights:
        out += ["--weights", str(args.weights)]
    else:
        out += ["--random-weights", str(0 if args.random_weights is None else args.random_weights)]
    return out


def load_network(args: argparse.Namespace) -> Network:
    """The network the options of :func:`add_model_args` name (random weights seed 0 by default)."""
    from .network import Network

    if getattr(args, "model", None):
        if args.weights or args.random_weights is not None:
            raise ConfigError("--model: an ONNX file holds its own weights; drop --weights/--random-weights")
        return Network.from_onnx(args.model)
    if args.weights:
        return Network.from_darknet(args.cfg, args.weights)
    return Network.from_random(args.cfg, 0 if args.random_weights is None else args.random_weights)


def parse_grid_or_auto(text: str) -> tuple[int, int] | str:
    """``--grid RxC`` or ``--grid auto`` (the planner chooses; see :func:`add_auto_args`)."""
    if text.strip().lower() == "auto":
        return "auto"
    return parse_grid_arg(text)


def _budget_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("--latency-budget must be above 0 ms")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def add_auto_args(p: argparse.ArgumentParser) -> None:
    """What ``--grid auto`` optimizes, and what it assumes of the links."""
    p.add_argument("--objective", choices=["throughput", "latency"], default="throughput",
                   help="--grid auto: the most frames/s, or the lowest latency per frame [throughput]")
    p.add_argument("--latency-budget", type=_budget_ms, default=None, metavar="MS",
                   help="--grid auto: the most frames/s among the plans predicted to finish a frame within MS")
    p.add_argument("--link-mbit", type=_positive, default=20.0, metavar="MBIT",
                   help="--grid auto: link rate assumed for every node, Mbit/s [20]")


def auto_argv(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_auto_args` again as argv, for the launcher's child nodes."""
    out = ["--objective", str(args.objective), "--link-mbit", str(args.link_mbit)]
    if args.latency_budget is not None:
        out += ["--latency-budget", str(args.latency_budget)]
    return out


def parse_grid_arg(text: str) -> tuple[int, int]:
    """``--grid RxC`` for argparse: a bad grid is a usage error, not a traceback."""
    from .ftp.plan import parse_grid

    try:
        return parse_grid(text)
    except StealerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _jpeg_quality_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 95:
        raise argparse.ArgumentTypeError(f"JPEG quality {value} out of range (1-95)")
    return value


def add_codec_args(p: argparse.ArgumentParser, what: str = "this node's frames travel to thieves") -> None:
    """``--frame-codec`` and ``--jpeg-quality`` (see :mod:`stealer.codec`; the names are
    repeated here so that ``--help`` imports nothing heavy)."""
    p.add_argument("--frame-codec", choices=["raw", "zstd", "png", "jpeg"], default="raw",
                   help=f"how {what}: raw pixels, zstd or png (lossless), or jpeg (each frame is "
                        "JPEG-encoded once and the decoded frame is what is computed on) [raw]")
    p.add_argument("--jpeg-quality", type=_jpeg_quality_arg, default=90, metavar="Q",
                   help="with --frame-codec jpeg: encoding quality 1-95 [90]")


def codec_argv(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_codec_args` again as argv, for the launcher's child nodes."""
    return ["--frame-codec", str(args.frame_codec), "--jpeg-quality", str(args.jpeg_quality)]
