"""``--mjpeg``'s argument, apart from :mod:`stealer.outputs.mjpeg`: building the command line
must not import aiohttp (about 9 MiB resident), which only a node serving streams needs."""

from __future__ import annotations

from typing import Any

__all__ = ["add_mjpeg_arg"]


def add_mjpeg_arg(parser: Any) -> None:
    """Add ``--mjpeg [HOST]:PORT`` (off by default)."""
    from ..metrics import metrics_address_arg

    parser.add_argument(
        "--mjpeg", type=metrics_address_arg, default=None, metavar="[HOST]:PORT",
        help="gateway: serve each source's annotated frames as a live MJPEG stream at http://HOST:PORT/NODE/INDEX "
             "(/ : the first source; :PORT and the token as --http; the --http address serves them under "
             "/mjpeg/) [off]")
