"""The event loop stealer runs on: uvloop when it is installed, asyncio's own otherwise.

:func:`install_event_loop_policy` makes uvloop the default for code that creates its own
loops; :func:`run` runs one coroutine on a fresh loop (what the CLI and benchmarks use).
Nothing here knows about connections: it lives apart from :mod:`stealer.wire.comm` so the
comm does not carry process-wide setup, and importing it pulls in nothing else of the wire
layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["install_event_loop_policy", "run"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def install_event_loop_policy() -> bool:
    """Make uvloop the default event loop if it is installed.

    Returns
    -------
    bool
        True if uvloop was installed, False if the stdlib loop stays.
    """
    try:
        import uvloop
    except ImportError:
        logger.debug("uvloop not installed; using the asyncio event loop")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True, debug: bool | None = None) -> T:
    """Run a coroutine to completion on a fresh loop (uvloop when available).

    Parameters
    ----------
    main
        The coroutine to run.
    use_uvloop
        Set False to force the stdlib event loop.
    debug
        asyncio debug mode.

    Returns
    -------
    object
        What ``main`` returned.
    """
    factory = _uvloop_factory() if use_uvloop else None
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
