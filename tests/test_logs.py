"""Structured logs: JSON lines when stderr is not a terminal (or ``--log-format json``)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stealer.logs import JsonFormatter, resolve_format, set_log_node

ROOT = Path(__file__).resolve().parents[1]


def record(msg: str, *args: object, exc_info=None, extra=None) -> logging.LogRecord:
    logger = logging.getLogger("stealer.test")
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)


def test_a_json_line_has_the_fields_the_node_and_the_extras():
    set_log_node("abcdef0123")
    try:
        line = JsonFormatter().format(record("frame %d of %s late ×%d", 7, "cam", 2,
                                             extra={"frame": 7, "peer": "beef", "odd": object()}))
    finally:
        set_log_node(None)
    rec = json.loads(line)
    assert rec["level"] == "WARNING" and rec["logger"] == "stealer.test" and rec["node"] == "abcdef0123"
    assert rec["msg"] == "frame 7 of cam late ×2"  # %-args applied, text not escaped to \\u
    assert rec["frame"] == 7 and rec["peer"] == "beef" and rec["odd"].startswith("<object")
    assert rec["ts"].endswith("Z") and len(rec["ts"]) == len("2026-12-02T13:46:15.123Z")
    assert "\n" not in line


def test_exceptions_go_in_one_line_and_node_is_absent_when_unknown():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info())
    out = json.loads(JsonFormatter().format(rec))
    assert "node" not in out and "ValueError: boom" in out["exc"] and "Traceback" in out["exc"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("fmt, stream, chosen", [
    ("auto", Tty(), "text"), ("auto", io.StringIO(), "json"), ("json", Tty(), "json"), ("text", io.StringIO(), "text"),
])
def test_auto_is_text_on_a_terminal_and_json_elsewhere(fmt, stream, chosen):
    assert resolve_format(fmt, stream) == chosen


@pytest.mark.parametrize("fmt", ["auto", "json", "text"])
def test_a_process_logs_the_chosen_format(fmt):
    code = ("import logging, sys; from stealer.logs import configure_logging; "
            f"print(configure_logging(logging.INFO, {fmt!r})); "
            "logging.getLogger('stealer.x').info('hello %s', 'there', extra={'k': 1})")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    if fmt == "text":
        assert r.stdout.strip() == "text" and r.stderr.strip().endswith("INFO stealer.x: hello there")
    else:  # a pipe is not a terminal
        assert r.stdout.strip() == "json"
        rec = json.loads(r.stderr)
        assert rec["msg"] == "hello there" and rec["k"] == 1 and rec["level"] == "INFO"
