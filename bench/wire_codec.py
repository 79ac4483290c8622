"""Wire codec benchmark: encode + decode round trip per message, two engines side by side.

    python bench/wire_codec.py [--baseline REV] [--number N] [--repeat R] [--out PATH]

Compares the message engine of git revision ``REV`` (default: the last revision with the
hand-written schema engine; its ``stealer/wire/messages.py`` is read with ``git show`` and
loaded as a separate module) with the one in this work tree (``stealer.wire.messages``),
in the same process on the same messages. For each message it times ``encode(msg,
limits)`` followed by ``decode(header, buffers, limits)`` (best of ``R`` repeats of ``N``
round trips, in µs per round trip), plus encode and decode alone, and the header size.
Arrays stay out of band in both engines, so the array messages measure the per-array
bookkeeping, not copies.

Prints a table and writes JSON (default ``bench/results/wire_codec.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import timeit
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from stealer.config import DEFAULT_LIMITS  # noqa: E402
from stealer.wire import messages as new_engine  # noqa: E402

BASELINE = "c2870e0bc5fadc5c620bd0ec0c48380f904be59a"
"""Last revision with the hand-written schema engine (before msgspec)."""

SMALL = ["Status", "StealRequest", "TileAck", "Ping", "Pong", "GatewayClaim", "TilesIn", "FrameStart"]


def load_engine(rev: str) -> types.ModuleType:
    """Load ``stealer/wire/messages.py`` of git revision ``rev`` as its own module.

    Parameters
    ----------
    rev
        A git revision of this repository.

    Returns
    -------
    module
        The old engine, with its own message classes and registry.
    """
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:stealer/wire/messages.py"],
        check=True, capture_output=True, text=True,
    ).stdout
    name = f"_wire_messages_{rev[:12]}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    exec(compile(src, f"{rev[:12]}:stealer/wire/messages.py", "exec"), mod.__dict__)
    return mod


def samples(m: types.ModuleType) -> dict[str, Any]:
    """The benchmarked messages, built from engine ``m``'s classes (same values in both)."""
    rng = np.random.default_rng(0)
    small = rng.random((3, 20, 20), dtype=np.float32)  # a small stolen input region
    out = rng.random((16, 8, 8), dtype=np.float32)  # a small tile output
    return {
        "Status": m.Status(3, 1, 2),
        "StealRequest": m.StealRequest(17, accept_tail=False),
        "TileAck": m.TileAck("n1/0", 12, 5, "b" * 32, [1, 4]),
        "Ping": m.Ping(123456),
        "Pong": m.Pong(123456),
        "GatewayClaim": m.GatewayClaim(3),
        "TilesIn": m.TilesIn("n1/0", 12),
        "FrameStart": m.FrameStart("n1/0", 12, "5x5:16:quad", 608, 608, 0.25),
        "StealReply(array)": m.StealReply(
            17, True, "n1/0", 12, 4, "5x5:16:quad", [0, 20, 10, 30], 608, 608, small
        ),
        "StealReply(none)": m.StealReply(17, False),
        "TileDone": m.TileDone("n1/0", 12, 4, "5x5:16:quad", "full", out, [1, 4], 0.031),
    }


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best of ``repeat`` runs of ``number`` calls, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure(
    engines: dict[str, tuple[types.ModuleType, Any]], number: int, repeat: int
) -> dict[str, dict[str, float]]:
    """Round trip, encode and decode times of one message in each engine.

    The engines take turns within every repeat, so that a noisy neighbour on the machine
    slows both alike (the ratio is what counts); the best repeat of each is kept.
    """
    limits = DEFAULT_LIMITS
    timers: dict[str, dict[str, Callable[[], object]]] = {}
    out: dict[str, dict[str, float]] = {}
    for key, (m, msg) in engines.items():
        enc, dec = m.encode, m.decode
        header, buffers = enc(msg, limits)
        again = dec(header, buffers, limits)
        assert type(again).__name__ == type(msg).__name__
        timers[key] = {
            "roundtrip_us": lambda enc=enc, dec=dec, msg=msg: dec(*enc(msg, limits), limits),
            "encode_us": lambda enc=enc, msg=msg: enc(msg, limits),
            "decode_us": lambda dec=dec, h=header, b=buffers: dec(h, b, limits),
        }
        out[key] = {"roundtrip_us": float("inf"), "encode_us": float("inf"),
                    "decode_us": float("inf"), "header_bytes": len(header)}
    for _ in range(repeat):
        for key, fns in timers.items():
            for what, fn in fns.items():
                out[key][what] = min(out[key][what], best_us(fn, number, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the old engine")
    ap.add_argument("--number", type=int, default=20000, help="round trips per repeat")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wire_codec.json")
    args = ap.parse_args(argv)

    old_engine = load_engine(args.baseline)
    old_msgs, new_msgs = samples(old_engine), samples(new_engine)
    rows = []
    for name in old_msgs:
        both = measure({"old": (old_engine, old_msgs[name]), "new": (new_engine, new_msgs[name])},
                       args.number, args.repeat)
        old, new = both["old"], both["new"]
        rows.append({
            "message": name,
            "small": name in SMALL,
            "old": old,
            "new": new,
            "speedup": old["roundtrip_us"] / new["roundtrip_us"],
        })

    print(f"{'message':20} {'old µs':>8} {'new µs':>8} {'speedup':>8}   "
          f"{'old enc/dec':>13} {'new enc/dec':>13}   {'hdr B old/new':>13}")
    for r in rows:
        o, n = r["old"], r["new"]
        print(
            f"{r['message']:20} {o['roundtrip_us']:8.2f} {n['roundtrip_us']:8.2f} {r['speedup']:7.2f}x   "
            f"{o['encode_us']:6.2f}/{o['decode_us']:<6.2f} {n['encode_us']:6.2f}/{n['decode_us']:<6.2f}   "
            f"{o['header_bytes']:6d}/{n['header_bytes']:<6d}"
        )
    small = [r["speedup"] for r in rows if r["small"]]
    print(f"small control messages: speedup min {min(small):.2f}x, max {max(small):.2f}x")

    import msgpack
    import msgspec

    result = {
        "baseline": args.baseline,
        "work_tree_head": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "number": args.number,
        "repeat": args.repeat,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "msgspec": msgspec.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "numpy": np.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
