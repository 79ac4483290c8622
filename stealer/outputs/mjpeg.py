"""``--mjpeg [HOST]:PORT``: each source's annotated frames as a live MJPEG stream.

The gateway serves, on its own event loop (aiohttp), one ``multipart/x-mixed-replace`` stream
of JPEGs per source, the format browsers (an ``<img>``), VLC, ffmpeg/ffplay and OpenCV read:

=============================  ============================================================
``GET /``                      the stream of ``?source=NODE/INDEX``, else of the first source
                               (by name; with none yet, of the first to show a frame)
``GET /NODE/INDEX``            the stream of source ``NODE/INDEX`` (404 before its first frame)
``GET /sources``               the sources and their stream paths, JSON
=============================  ============================================================

The frames are the gateway's annotated frames (:class:`~stealer.dashboard.frames.FrameStore`:
already JPEGs, so nothing is encoded here); sources send previews ``mjpeg_side`` px at most
every ``mjpeg_interval`` for it (or bigger and more often, for ``--video-out``). When
``--mjpeg`` names the ``--http`` address, the dashboard's server serves these routes under
``/mjpeg/`` (one port).

Protected as the dashboard: with a cluster secret it binds 127.0.0.1 unless a host is named
and needs ``?token=`` (or ``X-Stealer-Token``), the dashboard's token (``stealer
dashboard-url``); else 403. Bounded: at most ``mjpeg_clients`` streams, each with at most
:data:`CLIENT_BACKLOG` frames waiting; a client that reads slower than frames come loses the
oldest (counted in :attr:`MjpegServer.dropped`), and the socket's buffer is aiohttp's
(a write waits for the client once it holds 64 KiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..metrics import serve_app
from .mjpeg_args import add_mjpeg_arg  # noqa: F401 - re-exported (the CLI imports it from there: no aiohttp)

if TYPE_CHECKING:
    from ..config import Limits
    from ..dashboard.frames import AnnotatedFrame, FrameStore

__all__ = ["BOUNDARY", "CLIENT_BACKLOG", "MjpegServer", "add_mjpeg_arg", "part"]

log = logging.getLogger("stealer.mjpeg")

BOUNDARY = "stealerframe"
"""The multipart boundary between frames."""

CLIENT_BACKLOG = 2
"""Frames a stream may have waiting: the one being written and the next; older ones go."""

_KEEPALIVE = 10.0  # seconds: a quiet source's latest frame again (players and proxies time out idle streams)


def part(frame: AnnotatedFrame) -> bytes:
    """One frame of the stream: the boundary, its headers, the JPEG."""
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
            f"X-Source: {frame.source}\r\nX-Frame: {frame.frame}\r\n\r\n")
    return head.encode() + frame.jpeg + b"\r\n"


@dataclass(eq=False)
class _Client:
    source: str | None  # None: the first source to show a frame
    queue: asyncio.Queue[AnnotatedFrame | None] = field(default_factory=lambda: asyncio.Queue(CLIENT_BACKLOG))


class MjpegServer:
    """The streams (see the module notes). :meth:`start` serves them on their own port, or
    :meth:`add_routes` on another server's (the dashboard's); :meth:`close` is safe twice.

    Parameters
    ----------
    frames : FrameStore
        The gateway's annotated frames.
    limits : Limits
    token : str or None
        Needed by every request when the cluster has a secret.
    """

    def __init__(self, frames: FrameStore, limits: Limits, token: str | None) -> None:
        self.frames = frames
        self.max_clients = limits.mjpeg_clients
        self.close_timeout = limits.close_timeout
        self.token = token
        self.prefix = ""
        self.host = ""
        self.port = 0
        self.sent = 0  # frames written to clients
        self.dropped = 0  # frames a slow client lost
        self._clients: set[_Client] = set()
        self._runner: web.AppRunner | None = None
        self._stop_listening = frames.listen(self._on_frame)
        self._closed = False

    def add_routes(self, router: web.UrlDispatcher, prefix: str = "") -> None:
        """Serve the streams at ``prefix`` (``""`` or ``/mjpeg``) of ``router``'s server."""
        self.prefix = prefix
        router.add_get(prefix + "/", self._default)
        if prefix:
            router.add_get(prefix, self._default)
        router.add_get(prefix + "/sources", self._sources)
        router.add_get(prefix + r"/{node}/{index:\d+}", self._named)

    async def start(self, host: str, port: int) -> None:
        """Serve on a port of its own (with the token check).

        Raises
        ------
        ConfigError
            The address cannot be bound.
        """
        app = web.Application(middlewares=[self._guard])
        self.add_routes(app.router)
        self._runner, self.host, self.port = await serve_app(app, host, port, "--mjpeg", self.close_timeout)
        if self.token is None:
            log.warning("the MJPEG streams at http://%s:%d/ are open: no cluster secret (anyone who can reach "
                        "them sees the camera frames)", self.host, self.port)
        log.info("serving MJPEG streams at http://%s:%d/%s", self.host, self.port,
                 " (the dashboard's token: `stealer dashboard-url`)" if self.token else "")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_listening()
        for client in self._clients:  # streams end now, not at the shutdown timeout
            _put(client.queue, None)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ frames in
    def _on_frame(self, frame: AnnotatedFrame) -> None:
        for client in self._clients:
            if client.source is None:
                client.source = frame.source
            if client.source == frame.source and _put(client.queue, frame):
                self.dropped += 1

    # ------------------------------------------------------------------ requests
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            given = request.query.get("token") or request.headers.get("X-Stealer-Token") or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.Response(status=403, text="403: these streams need the dashboard's token: "
                                                     "see `stealer dashboard-url`\n")
        response: web.StreamResponse = await handler(request)
        return response

    async def _sources(self, request: web.Request) -> web.Response:
        rows = [{"source": f.source, "frame": f.frame, "width": f.width, "height": f.height,
                 "path": f"{self.prefix}/{f.source}"} for f in self.frames.sources()]
        return web.json_response({"sources": rows}, dumps=json.dumps)

    async def _default(self, request: web.Request) -> web.StreamResponse:
        source = request.query.get("source")
        if source is None:
            known = self.frames.sources()
            source = known[0].source if known else None
        elif self.frames.latest(source) is None:
            raise web.HTTPNotFound(text=f"no frame of source {source} yet\n")
        return await self._stream(request, source)

    async def _named(self, request: web.Request) -> web.StreamResponse:
        source = f"{request.match_info['node']}/{request.match_info['index']}"
        if self.frames.latest(source) is None:
            raise web.HTTPNotFound(text=f"no frame of source {source} yet\n")
        return await self._stream(request, source)

    async def _stream(self, request: web.Request, source: str | None) -> web.StreamResponse:
        if len(self._clients) >= self.max_clients or self._closed:
            raise web.HTTPServiceUnavailable(text="too many MJPEG streams open (mjpeg_clients)\n")
        client = _Client(source)
        resp = web.StreamResponse(headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            "Cache-Control": "no-store", "Pragma": "no-cache", "X-Accel-Buffering": "no"})
        self._clients.add(client)
        try:
            await resp.prepare(request)
            latest = self.frames.latest(source) if source is not None else None
            while True:
                if latest is not None:
                    await resp.write(part(latest))
                    self.sent += 1
                try:
                    latest = await asyncio.wait_for(client.queue.get(), _KEEPALIVE)
                except asyncio.TimeoutError:  # the same frame again: tells a dead client from a quiet source
                    latest = self.frames.latest(client.source) if client.source is not None else None
                    continue
                if latest is None:
                    break
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            self._clients.discard(client)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


def _put(queue: asyncio.Queue[Any], item: Any) -> bool:
    """Put without waiting; the oldest goes if full. True if one went."""
    dropped = False
    if queue.full():
        queue.get_nowait()
        dropped = True
    queue.put_nowait(item)
    return dropped


async def start_mjpeg(frames: FrameStore, limits: Limits, token: str | None, host: str, port: int) -> MjpegServer:
    """Serve the streams on their own port (see :meth:`MjpegServer.start`)."""
    server = MjpegServer(frames, limits, token)
    try:
        await server.start(host, port)
    except BaseException:
        await server.close()
        raise
    return server
