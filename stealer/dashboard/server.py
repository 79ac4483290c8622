"""The dashboard's HTTP server: the page, its JSON API and its server-sent events.

Runs on the node's own event loop (aiohttp), like ``--metrics``; when ``--metrics`` names the
same address, this server serves ``/metrics`` too (one port). Routes:

====================================  =========================================================
``GET /``                             the page (``static/index.html``)
``GET /static/NAME``                  its script and style (no token: they hold no data)
``GET /api/state``                    everything the page shows, with the whole history, JSON
``GET /api/events``                   server-sent events: ``state`` (as /api/state) first, then
                                      an ``update`` every ``dashboard_report_interval`` (nodes,
                                      plan, the newest sample, events since the last update)
                                      and a ``frame`` whenever a source's annotated frame changes
``GET /api/frame/NODE/INDEX.jpg``     the latest annotated frame of source ``NODE/INDEX``
``GET /metrics``                      only when shared with ``--metrics`` (no token, as there)
====================================  =========================================================

With a cluster secret every route but ``/static`` and ``/metrics`` needs ``?token=`` (or an
``X-Stealer-Token`` header); a wrong or missing one gets 403.

Bounded: the history is a ring of ``dashboard_history`` per-second samples, the events a ring
of ``dashboard_events``, the latencies behind p50/p99 those of the last
:data:`LATENCY_WINDOW` seconds (at most :data:`_MAX_LATENCIES`), at most
``dashboard_clients`` event streams, each with a short queue that drops its oldest update
for a reader that does not keep up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from ..annotate import class_names
from ..metrics import serve_app
from ..node.config import memory_needs, parse_plan_key
from . import dashboard_token
from .frames import AnnotatedFrame, FrameStore

if TYPE_CHECKING:
    from ..metrics import NodeMetrics
    from ..node.state import NodeState

__all__ = ["LATENCY_WINDOW", "Dashboard", "start_dashboard"]

log = logging.getLogger("stealer.dashboard")

LATENCY_WINDOW = 10.0
"""Seconds of released frames that each sample's latency p50/p99 is taken over: one second
holds a frame or two on a shelf of Pis, too few for a percentile."""

_MAX_LATENCIES = 4096  # latencies kept for the window (a fast PC releases hundreds per second)
_CLIENT_BACKLOG = 16  # updates an event stream may have unsent before its oldest go
_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream (proxies close idle ones)
_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_warned_open = False


def _read_static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _classes(node: NodeState) -> int:
    for layer in reversed(node.net.spec.layers):
        classes = getattr(layer, "classes", None)
        if isinstance(classes, int):
            return classes
    return 0


class Dashboard:
    """One node's dashboard: what it shows (history, events, frames) and its server.

    Made and started by :func:`start_dashboard`; :meth:`close` is safe twice.
    """

    def __init__(self, node: NodeState, metrics: NodeMetrics | None = None) -> None:
        limits = node.cfg.limits
        self.node = node
        self.metrics = metrics  # served at /metrics here when it shares this port
        self.interval = limits.dashboard_report_interval
        # the node's store (it feeds it results and previews), or, made without one, its own
        self._own_frames = node.frames is None
        self.frames = node.frames if node.frames is not None else FrameStore(
            limits.preview_sources, 4 * limits.preview_side, names=class_names(_classes(node)))
        self.history: deque[dict[str, Any]] = deque(maxlen=limits.dashboard_history)
        self.events: deque[dict[str, Any]] = deque(maxlen=limits.dashboard_events)
        self._event_seq = 0
        self._events_sent = 0  # seq of the last event that went out in an update
        self._latencies: deque[tuple[float, float]] = deque(maxlen=_MAX_LATENCIES)
        self._released = 0  # frames released since the last sample
        self._last_tick = time.monotonic()
        self._rates: dict[str, tuple[float, int, int, float, float]] = {}  # id -> t, in, out, in/s, out/s
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._max_clients = limits.dashboard_clients
        self._key = node._key
        self.token = dashboard_token(node._key) if node._key is not None else None
        self.started = time.monotonic()
        self.updates_sent = 0  # update events written (bench/dashboard.py: bytes per update)
        self.update_bytes = 0
        self.host = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._static = {name: _read_static(name) for name in _STATIC}
        self._closed = False

    # ------------------------------------------------------------------ fed by the node
    def frame_released(self, result: dict[str, Any]) -> None:
        """The gateway released a result line."""
        latency = result.get("latency")
        if isinstance(latency, (int, float)) and math.isfinite(latency):
            self._latencies.append((time.monotonic(), float(latency)))
            self._released += 1
        if self._own_frames:
            self.frames.result(result)

    def event(self, event: dict[str, Any]) -> None:
        """A milestone of the node (peer joined or lost, tasks queued again, takeover, plan)."""
        self._event_seq += 1
        self.events.append({**event, "seq": self._event_seq})

    # ------------------------------------------------------------------ what the page shows
    def state(self, full: bool = True) -> dict[str, Any]:
        """Everything the page shows; ``full``: with the whole history and every kept event,
        else the newest sample and the events since the last update."""
        node = self.node
        if full:
            events = list(self.events)
        else:
            events = [e for e in self.events if e["seq"] > self._events_sent]
        gs = node.gateway.stats
        st = node.stats
        out: dict[str, Any] = {
            "node": {"id": node.id, "role": node.role, "gateway": node.gateway_id or "", "epoch": node.epoch,
                     "model": node.net.model_hash, "uptime": round(time.monotonic() - self.started, 1)},
            "nodes": self._nodes(),
            "plan": self._plan(),
            "totals": {"frames": st.frames_done, "dropped": st.frames_dropped, "partial": st.frames_partial,
                       "failed": gs.frames_failed, "requeued": st.requeued, "takeovers": st.takeovers},
            "sample": self.history[-1] if self.history else None,
            "events": events,
            "sources": [self._source_entry(f) for f in self.frames.sources()],
            "interval": self.interval,
            "history": self.history.maxlen,
        }
        if full:
            out["series"] = list(self.history)
        return out

    def _source_entry(self, f: AnnotatedFrame) -> dict[str, Any]:
        return {"source": f.source, "frame": f.frame, "detections": f.detections, "at": round(f.at, 3),
                "width": f.width, "height": f.height, "url": f"/api/frame/{f.source}.jpg"}

    def _rate(self, node_id: str, at: float, b_in: int, b_out: int) -> tuple[float, float]:
        """Bytes/s in and out of a node, from its byte totals at two reports."""
        prev = self._rates.get(node_id)
        if prev is None:
            self._rates[node_id] = (at, b_in, b_out, 0.0, 0.0)
            return 0.0, 0.0
        t0, in0, out0, rin, rout = prev
        if at - t0 >= 0.5 * self.interval:  # a new report (several Status a second give noise)
            dt = at - t0
            rin, rout = max(0, b_in - in0) / dt, max(0, b_out - out0) / dt
            self._rates[node_id] = (at, b_in, b_out, rin, rout)
        return rin, rout

    def _nodes(self) -> list[dict[str, Any]]:
        node = self.node
        now = time.time()
        b_in, b_out = node._link_bytes()
        rin, rout = self._rate(node.id, now, b_in, b_out)
        st = node.stats
        rows = [{
            "id": node.id, "role": node.role, "self": True, "cores": node.cfg.slots,
            "speed": node._measured_speed(), "memory": node.cfg.max_memory, "busy": round(node._busy_share(), 4),
            "tasks": st.tiles_run + st.tails_run, "stolen": st.stolen, "queued": len(node.queue),
            "in": round(rin), "out": round(rout), "seen": 0.0, "rtt": None,
        }]
        for peer_id in sorted(node.peers):
            peer = node.peers[peer_id]
            s = peer.status
            ident = peer.comm.peer
            row: dict[str, Any] = {
                "id": peer_id, "role": peer.role, "self": False, "cores": ident.cores if ident is not None else 0,
                "speed": peer.load.speed, "memory": peer.max_memory, "busy": None, "tasks": None, "stolen": None,
                "queued": peer.load.queued_tiles + peer.load.queued_tails, "in": None, "out": None,
                "seen": round(now - peer.status_at, 1) if peer.status_at else None,
                "rtt": round(peer.comm.srtt, 4) if peer.comm.srtt is not None else None,
            }
            if s is not None:
                pin, pout = self._rate(peer_id, peer.status_at, s.bytes_in, s.bytes_out)
                # its speed as it last reported it (a failed steal resets the victim's PeerLoad)
                row.update(busy=round(s.busy, 4), tasks=s.tasks_run, stolen=s.stolen, speed=s.speed,
                           **{"in": round(pin), "out": round(pout)})
            rows.append(row)
        for gone in set(self._rates) - {r["id"] for r in rows}:
            del self._rates[gone]
        return rows

    def _plan(self) -> dict[str, Any]:
        node = self.node
        key = node._own_plan_key
        (rows, cols), layers, scheme = parse_plan_key(key)
        plan = node._plans.get(key)
        if (rows, cols) == (1, 1):
            tail = "with its tile, on the node that runs the frame (no map crosses a link)"
        elif plan is not None:
            tile_mem, tail_mem = memory_needs(node.net, plan)
            offers = [node.cfg.max_memory, *(p.max_memory for p in node.peers.values())]
            fits = sum(1 for m in offers if m == 0 or m >= tile_mem + tail_mem)
            tail = f"queued at the gateway, stolen by the nodes that fit the tail layers ({fits} of {len(offers)})"
        else:
            tail = "queued at the gateway"
        out: dict[str, Any] = {"key": key, "grid": f"{rows}x{cols}", "layers": layers,
                               "scheme": "none" if (rows, cols) == (1, 1) else scheme, "tail": tail,
                               "auto": None}
        choice = node._auto_choice
        if node.cfg.grid_auto and choice is not None:
            best = choice.best
            out["auto"] = {"objective": choice.objective, "choice": best.name, "inflight": best.inflight,
                           "fps": round(best.fps, 4), "latency": round(best.latency, 4), "bound": best.bound,
                           "within_budget": choice.within_budget, "note": choice.note}
        return out

    # ------------------------------------------------------------------ the per-second tick
    def _sample(self) -> dict[str, Any]:
        now = time.monotonic()
        dt = max(1e-6, now - self._last_tick)
        self._last_tick = now
        while self._latencies and self._latencies[0][0] < now - LATENCY_WINDOW:
            self._latencies.popleft()
        lat = sorted(v for _, v in self._latencies)
        sample = {"t": round(time.time(), 3), "fps": round(self._released / dt, 4),
                  "p50": _quantile(lat, 0.5), "p99": _quantile(lat, 0.99)}
        self._released = 0
        return sample

    async def _tick(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            self.history.append(self._sample())
            if self._clients:
                update = self.state(full=False)
                self._broadcast(_sse("update", update), update=True)
            if self.events:
                self._events_sent = self.events[-1]["seq"]

    async def _frames(self) -> None:
        async for f in self.frames.subscribe():
            self._broadcast(_sse("frame", self._source_entry(f)))

    def _broadcast(self, data: bytes, update: bool = False) -> None:
        for queue in self._clients:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(data)
            if update:
                self.updates_sent += 1
                self.update_bytes += len(data)

    # ------------------------------------------------------------------ the server
    async def start(self, host: str, port: int, routes: Callable[[web.UrlDispatcher], None] | None = None) -> None:
        """Serve (``routes``: adds more, as ``--mjpeg``'s on the same port, behind the token)."""
        app = web.Application(middlewares=[self._guard])
        if routes is not None:
            routes(app.router)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get(r"/api/frame/{node}/{index:\d+}.jpg", self._api_frame)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics)
        self._runner, self.host, self.port = await serve_app(app, host, port, "--http",
                                                             self.node.cfg.limits.close_timeout)
        for coro, what in ((self._tick(), "dashboard tick"), (self._frames(), "dashboard frames")):
            task = asyncio.get_running_loop().create_task(coro, name=what)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        global _warned_open
        if self.token is None and not _warned_open:
            _warned_open = True
            log.warning("the dashboard at http://%s:%d/ is open: no cluster secret (anyone who can reach it "
                        "sees the cluster and its camera frames)", self.host, self.port)
        log.info("serving the dashboard at http://%s:%d/%s", self.host, self.port,
                 " (its token: `stealer dashboard-url`)" if self.token else "")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for queue in self._clients:  # event streams end now, not at the shutdown timeout
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        await self.frames.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        token = self.token
        if token is not None and not (path.startswith("/static/") or path == "/metrics"):
            given = request.query.get("token") or request.headers.get("X-Stealer-Token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.Response(status=403, text="403: this dashboard needs its token: open the URL that "
                                                     "`stealer dashboard-url` prints\n")
        response: web.StreamResponse = await handler(request)
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=_STATIC[name], charset="utf-8")

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state(full=True), dumps=_dumps)

    async def _api_frame(self, request: web.Request) -> web.Response:
        source = f"{request.match_info['node']}/{request.match_info['index']}"
        f = self.frames.latest(source)
        if f is None:
            raise web.HTTPNotFound(text=f"no frame of source {source} yet\n")
        return web.Response(body=f.jpeg, content_type="image/jpeg",
                            headers={"Cache-Control": "no-store", "X-Frame": str(f.frame)})

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        assert self.metrics is not None
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _api_events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= self._max_clients or self._closed:
            raise web.HTTPServiceUnavailable(text="too many dashboard pages open (dashboard_clients)\n")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_CLIENT_BACKLOG)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        self._clients.add(queue)
        try:
            await resp.prepare(request)
            await resp.write(_sse("state", self.state(full=True)))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), _KEEPALIVE)
                except asyncio.TimeoutError:
                    data = b": keep-alive\n\n"
                if data is None:
                    break
                await resp.write(data)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self._clients.discard(queue)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (linear interpolation, numpy's default); None if empty."""
    if not values:
        return None
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (pos - lo), 4)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {_dumps(payload)}\n\n".encode()


async def start_dashboard(node: NodeState, metrics: NodeMetrics | None = None,
                          routes: Callable[[web.UrlDispatcher], None] | None = None) -> Dashboard:
    """Start ``node``'s dashboard where ``node.cfg.http`` says (``metrics``: serve its /metrics
    on the same port; ``routes``: add these, see :meth:`Dashboard.start`).

    Raises
    ------
    ConfigError
        The address cannot be bound.
    """
    from ..metrics import metrics_host

    assert node.cfg.http is not None
    want_host, port = node.cfg.http
    dash = Dashboard(node, metrics)
    await dash.start(metrics_host(want_host, node.cfg.host, node.cfg.secret is not None), port, routes)
    return dash
