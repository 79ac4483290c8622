"""The live dashboard of a node (``stealer node --http :8080``) and ``stealer dashboard-url``.

The page (``static/``: HTML, CSS and a small script of our own, every asset served by the
node, nothing from the internet) shows the shelf of nodes, frames/s and latency plots, each
source's latest frame with its detections drawn, the plan and recent faults, kept live with
server-sent events. The server (:mod:`.server`) runs on the node's event loop (aiohttp);
frame previews are kept by :mod:`.frames`.

Protection, as for the cluster: with a cluster secret the dashboard binds 127.0.0.1 unless a
host is named, and the page and its API need ``?token=`` :func:`dashboard_token` (a keyed
BLAKE2b of a fixed label under the key derived from the secret: whoever holds the secret can
make it, nobody else can, and it reveals nothing about the secret or the handshake proofs).
``stealer dashboard-url`` prints the URL with its token. Without a secret the dashboard is
open, and the node warns once.

This module stays light (no aiohttp): ``stealer node --help`` imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import StealerError

if TYPE_CHECKING:
    from ..wire.auth import ClusterKey

__all__ = ["TOKEN_LABEL", "add_dashboard_url_parser", "add_http_arg", "dashboard_token", "dashboard_url"]

TOKEN_LABEL = b"stealer dashboard token v1"
"""What the token is the MAC of; fixed, so the token stays the same across restarts."""

_TOKEN_PERSON = b"stealer-dash"  # BLAKE2b personalization: the token is no handshake proof


def dashboard_token(key: ClusterKey) -> str:
    """The dashboard's access token for a cluster key: 32 hex digits."""
    return key.label_mac(TOKEN_LABEL, _TOKEN_PERSON).hex()


def add_http_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--http [HOST]:PORT`` (off by default)."""
    from ..metrics import metrics_address_arg

    parser.add_argument(
        "--http", type=metrics_address_arg, default=None, metavar="[HOST]:PORT",
        help="serve the live dashboard at http://HOST:PORT/ (:PORT: the --host address, or 127.0.0.1 when "
             "the cluster has a secret, then with ?token=: see `stealer dashboard-url`; the same port as "
             "--metrics serves both) [off]")


def dashboard_url(host: str, port: int, key: ClusterKey | None) -> str:
    """The page's URL, with its token when the cluster has a secret."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"http://{host}:{port}/"
    return f"{url}?token={dashboard_token(key)}" if key is not None else url


def add_dashboard_url_parser(sub: Any) -> None:
    """``stealer dashboard-url [HOST:PORT] [--secret-file PATH]``."""
    from ..config import add_security_args

    p = sub.add_parser("dashboard-url", help="print the URL of a node's --http dashboard, with its token")
    p.add_argument("target", nargs="?", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="the node's --http address [127.0.0.1:8080]")
    add_security_args(p)
    p.set_defaults(func=cmd_dashboard_url)


def cmd_dashboard_url(args: argparse.Namespace) -> int:
    from ..wire import ClusterKey, load_secret

    host, sep, port = str(args.target).rpartition(":")
    if not sep or not port.isdigit():
        raise StealerError(f"{args.target}: expected HOST:PORT")
    secret = load_secret(args.secret_file)
    print(dashboard_url(host.strip("[]") or "127.0.0.1", int(port), ClusterKey.of(secret)))
    if secret is None:
        print("stealer dashboard-url: no cluster secret: the dashboard is open, no token needed", file=sys.stderr)
    return 0
