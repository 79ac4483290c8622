"""Stop requests that arrive before a node's event loop runs (imports, model loading, warm-up).

``python -m stealer node`` installs these handlers before importing anything heavy, so a SIGTERM
during start-up is remembered and honoured (the node stops cleanly, exit code 0) instead of
killing the process mid-import.
"""

from __future__ import annotations

import signal

EARLY_STOP: list[int] = []


def _note(signum: int, frame: object) -> None:
    EARLY_STOP.append(signum)


def remember_stop_requests() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)
