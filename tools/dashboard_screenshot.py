"""A screenshot of the dashboard, taken in headless Chromium from a small real cluster.

    python tools/dashboard_screenshot.py --out docs/dashboard.png [--seconds 40]

Starts, in this process, a gateway with ``--http`` and a source of its own and two workers
with a source each (yolov2-tiny at a reduced size, random weights, synthetic frames at a
steady rate), lets them run, loads the page in Debian's Chromium through Playwright
(``pip install playwright``; never ``playwright install``: the browser is the system's
``/usr/bin/chromium``, or ``--chromium PATH``), waits for the shelf, the plots and a frame of
each source, and saves a PNG. :func:`small_cluster`, :func:`launch_chromium` and
:func:`wait_for_page` are what ``tests/test_dashboard_browser.py`` uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stealer.config import DEFAULT_LIMITS  # noqa: E402
from stealer.discovery import new_node_id  # noqa: E402
from stealer.network import Network, builtin_cfg  # noqa: E402
from stealer.node import Node, NodeConfig, RuntimeLimits  # noqa: E402
from stealer.sources import SyntheticSource  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# no network beyond the page's own 127.0.0.1 (no update checks, no QUIC probes, no sync)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path(given: str | None = None) -> str | None:
    """The Chromium binary to drive: ``given``, ``$STEALER_CHROMIUM``, /usr/bin/chromium, or None."""
    for candidate in (given, os.environ.get("STEALER_CHROMIUM"), CHROMIUM, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def tiny_net(side: int = 160, seed: int = 11) -> Network:
    text = builtin_cfg("yolov2-tiny").read_text()
    return Network.from_cfg_text(text.replace("width=416", f"width={side}").replace("height=416", f"height={side}"),
                                 seed=seed)


@contextlib.asynccontextmanager
async def small_cluster(net: Network, *, workers: int = 1, frames: int | None = None, fps: float | None = None,
                        gateway_source: bool = True, thresh: float = 0.2, grid: tuple[int, int] = (2, 2),
                        secret: bytes | None = None) -> AsyncIterator[list[Node]]:
    """A gateway with ``--http`` on 127.0.0.1 (and a source unless ``gateway_source`` is
    false) and ``workers`` nodes with a source each; the gateway first. A low ``thresh``: the
    random weights' class scores are low, and the page should show a few boxes."""
    limits = DEFAULT_LIMITS.replace(heartbeat_interval=0.1, peer_dead_after=2.0)
    runtime = RuntimeLimits(lease=10.0, steal_timeout=1.0, strips_timeout=1.0, gateway_wait=10.0)

    def cfg(gateway: bool, seed: int | None, peers: list[tuple[str, int]]) -> NodeConfig:
        return NodeConfig(node_id=new_node_id(), host="127.0.0.1", gateway=gateway,
                          sources=[SyntheticSource(seed)] if seed is not None else [], frames=frames, fps=fps,
                          peers=peers, discovery=False, grid=grid, layers=9, limits=limits, runtime=runtime,
                          thresh=thresh, secret=secret, http=("127.0.0.1", 0) if gateway else None,
                          max_memory=(256 << 20) * (1 + (seed or 0) % 3))
    nodes: list[Node] = []
    try:
        gw = Node(net, cfg(True, 1 if gateway_source else None, []))
        nodes.append(gw)
        await gw.start()
        for i in range(workers):
            node = Node(net, cfg(False, 2 + i, [("127.0.0.1", gw.port)]))
            nodes.append(node)
            await node.start()
        yield nodes
    finally:
        for node in reversed(nodes):
            await node.close()


async def launch_chromium(playwright: Any, executable: str) -> Any:
    return await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


PAGE_READY = """(want) => {
    const nodes = document.querySelectorAll('#nodes .node').length;
    const fps = Number(document.getElementById('fps-plot').dataset.points || 0);
    const lat = Number(document.getElementById('latency-plot').dataset.points || 0);
    const imgs = [...document.querySelectorAll('#cameras img')]
        .filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length;
    return nodes >= want.nodes && fps >= want.points && lat >= want.points && imgs >= want.frames;
}"""


async def wait_for_page(page: Any, nodes: int, frames: int, points: int = 2, timeout: float = 60.0) -> None:
    """Until the page shows ``nodes`` node cards, plots with ``points`` samples with data, and
    ``frames`` loaded frames (a visible <img> with a nonzero natural size each)."""
    await page.wait_for_function(PAGE_READY, arg={"nodes": nodes, "frames": frames, "points": points},
                                 timeout=timeout * 1000, polling=250)


async def screenshot(out: Path, seconds: float, executable: str) -> None:
    from playwright.async_api import async_playwright

    from stealer.dashboard import dashboard_url

    async with small_cluster(tiny_net(), workers=2, fps=2.0) as nodes:
        gw = nodes[0]
        await asyncio.sleep(seconds)  # history for the plots
        assert gw.dashboard is not None
        url = dashboard_url("127.0.0.1", gw.dashboard.port, None)
        async with async_playwright() as pw:
            browser = await launch_chromium(pw, executable)
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(url)
            await wait_for_page(page, nodes=len(nodes), frames=len(nodes), points=5)
            await asyncio.sleep(1.5)
            png = await page.screenshot(full_page=True)
            await browser.close()
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    # an 8-bit palette keeps the PNG small (the page is flat colours but for the frames)
    im.convert("RGB").quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {im.width}x{im.height}, {out.stat().st_size // 1024} KB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    p.add_argument("--seconds", type=float, default=40.0, help="run this long before the screenshot [40]")
    p.add_argument("--chromium", default=None, help=f"the browser binary [{CHROMIUM}]")
    args = p.parse_args()
    exe = chromium_path(args.chromium)
    if exe is None:
        print("no chromium binary (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(screenshot(args.out, args.seconds, exe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
