"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def warm_kernels() -> None:
    """Compile (or load) every kernel variant the test models use, once, in this process.

    Tests that start several node processes at once need this: on a fresh checkout (CI) each of
    them would otherwise compile the same Numba kernels at the same time on 2 cores, and spend
    tens of seconds doing it while the test's clock runs. The compiled code goes to the Numba
    cache, which the child processes then load.
    """
    from stealer.network import Network, builtin_cfg

    for name in ("yolov2-tiny", "yolov2"):
        text = builtin_cfg(name).read_text()
        for size in ("416", "608"):
            text = text.replace(f"width={size}", "width=64").replace(f"height={size}", "height=64")
        Network.from_cfg_text(text, seed=0).warm_up()
