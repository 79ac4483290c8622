"""Logging set-up of the command line: human text on a terminal, JSON lines elsewhere.

A node run by systemd (or with its stderr in a file, or piped to a log shipper) writes one
JSON object per line, so that journald, Loki or ``jq`` can filter by level, logger and node
without parsing free text::

    {"ts": "2026-12-02T13:46:15.123Z", "level": "WARNING", "logger": "stealer.node",
     "msg": "drain: 1 frame(s) ...", "node": "3f9c..."}

plus every ``extra=`` field of the call and, for an exception, its traceback as ``exc``.
``--log-format text|json|auto`` chooses; auto (the default) is text when stderr is a
terminal and JSON otherwise. Stdlib :mod:`logging` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "add_log_format_arg", "configure_logging", "set_log_node"]

LOG_FORMATS = ("auto", "text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_node_id: str | None = None

_OURS = "_stealer_handler"  # marks the handler configure_logging installed


def set_log_node(node_id: str | None) -> None:
    """Name the node this process runs in every JSON log line (``node``); ``stealer node``
    calls it once it has its id. A record's own ``extra={"node": ...}`` wins."""
    global _node_id
    _node_id = node_id


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``msg``, ``node`` (when known), the record's ``extra`` fields, and ``exc`` /
    ``stack`` (formatted) when the record carries them. Values JSON cannot hold are written
    as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _node_id is not None:
            out["node"] = _node_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii off: a grep for the message's own text (×, names) still finds it
        return json.dumps(out, ensure_ascii=False, default=str)


def add_log_format_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format text|json|auto``."""
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                        help="log lines on stderr: text, JSON objects, or auto: text on a terminal, "
                             "JSON otherwise [auto]")


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` becomes ``text`` on a terminal and ``json`` elsewhere."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    try:
        return "text" if isatty is not None and isatty() else "json"
    except ValueError:  # a closed stream
        return "json"


def configure_logging(level: int, fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Send the root logger's records to ``stream`` (stderr) as text or JSON lines.

    Parameters
    ----------
    level
        Root level (``logging.WARNING`` ...).
    fmt
        ``text``, ``json`` or ``auto``.
    stream
        Where to write (default ``sys.stderr``).

    Returns
    -------
    str
        The format chosen (``text`` or ``json``).
    """
    stream = sys.stderr if stream is None else stream
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    if any(not getattr(h, _OURS, False) for h in root.handlers):
        # logging is set up already by whoever runs us (pytest, an embedding program):
        # leave it alone, as logging.basicConfig does
        return chosen
    for old in list(root.handlers):  # a second call (main() run twice in one process) replaces ours only
        if getattr(old, _OURS, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return chosen
