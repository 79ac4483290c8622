"""The dashboard as a person uses it: a small real cluster, the page loaded in headless
Chromium (Debian's, driven by Playwright), and the nodes, the plots with data and an annotated
frame checked on the page. Skips, with the reason, where no browser or no Playwright is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.dashboard_screenshot import chromium_path, launch_chromium, small_cluster, tiny_net, wait_for_page  # noqa: E402

pytestmark = pytest.mark.timeout(240)

SECRET = b"browser-test-secret-0123456789ab"


@pytest.fixture(scope="module")
def browser_exe() -> str:
    pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install '.[test]')")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set STEALER_CHROMIUM)")
    return exe


async def test_the_page_shows_the_nodes_the_plots_and_an_annotated_frame(browser_exe):
    from playwright.async_api import async_playwright

    from stealer.dashboard import dashboard_url
    from stealer.wire import ClusterKey

    net = tiny_net(96)
    async with small_cluster(net, workers=1, fps=4.0, secret=SECRET) as nodes:
        gw, worker = nodes
        assert gw.dashboard is not None
        url = dashboard_url("127.0.0.1", gw.dashboard.port, ClusterKey(SECRET))
        async with async_playwright() as pw:
            browser = await launch_chromium(pw, browser_exe)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                outside: list[str] = []
                page.on("request", lambda req: None if req.url.startswith(url.split("?")[0]) or
                        req.url.startswith("data:") else outside.append(req.url))
                await page.goto(url)
                await wait_for_page(page, nodes=2, frames=2, points=2, timeout=120)
                cards = await page.eval_on_selector_all("#nodes .node", "els => els.map(e => e.dataset.id)")
                assert sorted(cards) == sorted([gw.id, worker.id])
                assert "gateway" in await page.inner_text(f'#nodes .node[data-id="{gw.id}"]')
                sizes = await page.eval_on_selector_all(
                    "#cameras img", "els => els.map(e => [e.naturalWidth, e.naturalHeight, e.currentSrc])")
                assert len(sizes) == 2 and all(w > 0 and h > 0 and "token=" in src for w, h, src in sizes)
                captions = await page.inner_text("#cameras")
                assert f"{gw.id[:8]}/0" in captions and f"{worker.id[:8]}/0" in captions
                assert "2x2" in await page.inner_text("#plan")
                assert "joined" in await page.inner_text("#events")
                assert await page.inner_text("#live") == "live"
                assert not errors, errors
                assert not outside, outside  # every asset from the node itself

                # without the token the same page is refused
                denied = await browser.new_page()
                response = await denied.goto(url.split("?")[0])
                assert response is not None and response.status == 403
            finally:
                await browser.close()
