"""Find peers on the LAN with mDNS/DNS-SD (python-zeroconf, asyncio API).

Each node advertises one ``_stealer._tcp.local.`` service named after its node id
(``stealer-<uuid4 hex>``, never its IP, so several nodes can share a host) whose TXT
record carries the node id, protocol version, role, listening port, core count and model
hash. Each node browses the same type and reports :class:`PeerEvent` s (added / updated /
removed) through a callback and/or the async iterator :meth:`Discovery.events`.

Discovery only says who exists. Whether a peer is alive is decided by the TCP heartbeat
of :class:`stealer.wire.Comm` (mDNS goodbyes are optional and its TTLs last minutes).

Records from the network are untrusted: every TXT value is length-bounded and matched
against a strict pattern, the instance name must match the node id, the SRV and TXT ports
must agree; a bad record is logged once and ignored, and never stops the browser. The
peer table and the resolve work are capped (``Limits.max_peers``).

Zeroconf browser callbacks only schedule work (a tracked task per resolve); every task
is kept in a set until done. Timeouts are seconds here and converted to zeroconf's
milliseconds at the call site.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self

import ifaddr  # python-zeroconf's own dependency, used to list interface addresses
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from stealer.config import DEFAULT_LIMITS, Limits
from stealer.errors import DiscoveryError
from stealer.wire.messages import PROTOCOL_VERSION

__all__ = [
    "SERVICE_TYPE",
    "Discovery",
    "PeerEvent",
    "PeerInfo",
    "new_node_id",
    "parse_txt",
    "service_name",
    "txt_record",
]

logger = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_stealer._tcp.local."
_PREFIX: Final = "stealer-"

_NODE_ID = re.compile(r"[0-9a-f]{32}")
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_MODEL_HASH = re.compile(r"[0-9A-Za-z:._-]{0,128}")
_UINT = re.compile(r"[0-9]{1,5}")
_MAX_CORES: Final = 4096

EventKind = Literal["added", "updated", "removed"]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer as advertised over mDNS (validated, but not proof that it is alive)."""

    node_id: str
    host: str
    port: int
    role: str
    cores: int
    model_hash: str
    version: int


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A change in the set of known peers."""

    kind: EventKind
    peer: PeerInfo


def new_node_id() -> str:
    """Return a fresh node id (uuid4 as 32 lowercase hex digits).

    Returns
    -------
    str
    """
    return uuid.uuid4().hex


def service_name(node_id: str) -> str:
    """Return the mDNS service instance name of a node.

    Parameters
    ----------
    node_id
        32 hex digits.

    Returns
    -------
    str
        ``stealer-<node_id>._stealer._tcp.local.``
    """
    return f"{_PREFIX}{node_id}.{SERVICE_TYPE}"


def txt_record(
    node_id: str, *, version: int, role: str, port: int, cores: int, model_hash: str
) -> dict[str, str]:
    """Build (and validate) the TXT properties a node advertises.

    Parameters
    ----------
    node_id, version, role, port, cores, model_hash
        The node's identity; see :class:`PeerInfo`.

    Returns
    -------
    dict
        TXT key/value strings.

    Raises
    ------
    ValueError
        If a value would be rejected by peers' :func:`parse_txt`.
    """
    txt = {
        "id": node_id,
        "v": str(version),
        "role": role,
        "port": str(port),
        "cores": str(cores),
        "model": model_hash,
    }
    raw = {k.encode(): v.encode() for k, v in txt.items()}
    parse_txt(service_name(node_id), raw, host="127.0.0.1", srv_port=port)
    return txt


def _text(
    props: Mapping[bytes, bytes | None], key: str, pattern: re.Pattern[str], limit: int
) -> str:
    value = props.get(key.encode())
    if value is None:
        raise ValueError(f"TXT key {key!r} missing or without value")
    if not isinstance(value, bytes) or len(value) > limit:
        raise ValueError(f"TXT {key!r} longer than {limit} bytes")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"TXT {key!r} is not ASCII") from None
    if not pattern.fullmatch(text):
        raise ValueError(f"TXT {key}={text!r} does not match {pattern.pattern}")
    return text


def parse_txt(
    name: str,
    props: Mapping[bytes, bytes | None],
    *,
    host: str,
    srv_port: int | None,
    limits: Limits = DEFAULT_LIMITS,
) -> PeerInfo:
    """Validate an advertised service and turn it into a :class:`PeerInfo`.

    Parameters
    ----------
    name
        The service instance name (must be ``service_name(node_id)``).
    props
        TXT properties as parsed by zeroconf (untrusted bytes).
    host
        The address chosen from the A records.
    srv_port
        The port of the SRV record (must equal the TXT port).
    limits
        ``max_txt_value_bytes`` bounds each value.

    Returns
    -------
    PeerInfo

    Raises
    ------
    ValueError
        With the reason, if anything is missing, malformed or inconsistent.
    """
    lim = limits.max_txt_value_bytes
    node_id = _text(props, "id", _NODE_ID, lim)
    if name.lower() != service_name(node_id):
        raise ValueError(f"instance name does not match node id {node_id}")
    version = int(_text(props, "v", _UINT, lim))
    role = _text(props, "role", _ROLE, lim)
    port = int(_text(props, "port", _UINT, lim))
    if not 1 <= port <= 65535 or (srv_port is not None and srv_port != port):
        raise ValueError(f"bad port {port} (SRV says {srv_port})")
    cores = int(_text(props, "cores", _UINT, lim))
    if not 1 <= cores <= _MAX_CORES:
        raise ValueError(f"cores {cores} out of range")
    model_hash = _text(props, "model", _MODEL_HASH, lim)
    return PeerInfo(node_id, host, port, role, cores, model_hash, version)


def _ipv4_of_interfaces(items: Sequence[str]) -> list[str]:
    """Map IPv4 addresses (kept) and interface names (looked up) to IPv4 addresses."""
    out: list[str] = []
    adapters: list[ifaddr.Adapter] | None = None
    for item in items:
        try:
            out.append(str(ipaddress.IPv4Address(item)))
            continue
        except ValueError:
            pass
        if adapters is None:
            adapters = list(ifaddr.get_adapters())
        ips = [ip.ip for a in adapters if a.name == item for ip in a.ips if isinstance(ip.ip, str)]
        if not ips:
            raise DiscoveryError(f"interface {item!r} is not an IPv4 address or has none")
        out.extend(ips)
    return out


def _all_ipv4() -> list[str]:
    """Every non-loopback IPv4 address of this host."""
    return [
        ip.ip
        for a in ifaddr.get_adapters()
        for ip in a.ips
        if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback
    ]


class Discovery:
    """Advertise this node and browse for peers (an async context manager).

    Parameters
    ----------
    node_id
        This node's id (:func:`new_node_id`); our own advertisement is ignored.
    port
        Our listening TCP port (advertised).
    role
        Free-form lowercase role, e.g. ``"worker"`` or ``"source"``.
    cores
        Cores offered (default: ``os.cpu_count()``).
    model_hash
        Hash of the model this node runs.
    version
        Protocol version advertised.
    on_event
        Optional callback, called on the event loop for each :class:`PeerEvent`; it
        must not block.
    interfaces
        IPv4 addresses and/or interface names to use (pin one on multi-homed hosts).
        Default: all interfaces.
    loopback
        Use only 127.0.0.1 (tests, several nodes on one host).
    advertise
        Set False to browse without advertising.
    limits
        Timeouts and caps.
    """

    def __init__(
        self,
        node_id: str,
        port: int,
        *,
        role: str = "worker",
        cores: int | None = None,
        model_hash: str = "",
        version: int = PROTOCOL_VERSION,
        on_event: Callable[[PeerEvent], None] | None = None,
        interfaces: Sequence[str] | None = None,
        loopback: bool = False,
        advertise: bool = True,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.node_id = node_id
        self.port = port
        self.limits = limits
        self.name = service_name(node_id)
        self._txt = txt_record(
            node_id, version=version, role=role, port=port, cores=cores or os.cpu_count() or 1,
            model_hash=model_hash,
        )
        self._on_event = on_event
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._loopback = loopback
        self._advertise = advertise
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._by_name: dict[str, PeerInfo] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rejected: dict[str, str] = {}
        self._subscribers: set[asyncio.Queue[PeerEvent | None]] = set()
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Discovery {self.node_id[:8]} peers={len(self._by_name)}>"

    @property
    def peers(self) -> dict[str, PeerInfo]:
        """Known peers by node id (a copy)."""
        return {p.node_id: p for p in self._by_name.values()}

    @property
    def rejected(self) -> dict[str, str]:
        """Recently ignored service names and why (capped at ``max_peers``; a copy)."""
        return dict(self._rejected)

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> Self:
        """Open the mDNS sockets, start browsing and advertise (idempotent).

        Returns when our service is announced.

        Returns
        -------
        Discovery
            ``self``.

        Raises
        ------
        DiscoveryError
            No usable interface, socket error or another node with our id.
        """
        if self._started:
            return self
        self._started = True
        if self._loopback:
            ips: list[str] = ["127.0.0.1"]
            zc_interfaces: Any = ips
        elif self._interfaces is not None:
            ips = _ipv4_of_interfaces(self._interfaces)
            zc_interfaces = ips
        else:
            ips = _all_ipv4()
            zc_interfaces = InterfaceChoice.All
        if self._advertise and not ips:
            raise DiscoveryError("no IPv4 address to advertise (use loopback=True or interfaces=)")
        try:
            self._azc = AsyncZeroconf(interfaces=zc_interfaces, ip_version=IPVersion.V4Only)
        except OSError as e:
            raise DiscoveryError(f"cannot open mDNS sockets on {zc_interfaces}: {e}") from e
        try:
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
            if self._advertise:
                info = AsyncServiceInfo(
                    SERVICE_TYPE,
                    self.name,
                    port=self.port,
                    properties=self._txt,
                    server=f"{_PREFIX}{self.node_id}.local.",
                    parsed_addresses=ips,
                )
                try:
                    announced = await self._azc.async_register_service(info)
                    await announced
                except (NonUniqueNameException, BadTypeInNameException) as e:
                    raise DiscoveryError(f"cannot advertise {self.name}: {e!r}") from e
            logger.info(
                "discovery started for node %s on %s (advertise=%s)",
                self.node_id, ", ".join(ips) or "all interfaces", self._advertise,
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop browsing, withdraw our service (mDNS goodbye), end iterators; safe twice."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            if self._azc is not None:
                await self._azc.async_close()
        finally:
            for q in self._subscribers:
                _put_last(q, None)
            self._closed.set()
            logger.debug("discovery for node %s closed", self.node_id)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- events -------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[PeerEvent, None]:
        """Iterate over peer events until :meth:`close`.

        Peers already known when iteration starts are replayed first as ``"added"``.
        A subscriber that falls ``max_discovery_events`` behind loses events (logged).

        Yields
        ------
        PeerEvent
        """
        if self._closing:
            return
        q: asyncio.Queue[PeerEvent | None] = asyncio.Queue(self.limits.max_discovery_events)
        for peer in list(self._by_name.values())[: self.limits.max_discovery_events]:
            q.put_nowait(PeerEvent("added", peer))
        self._subscribers.add(q)
        try:
            while (event := await q.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(q)

    def _emit(self, kind: EventKind, peer: PeerInfo) -> None:
        logger.info(
            "peer %s: %s at %s:%d (role %s, %d cores, version %d)",
            kind, peer.node_id, peer.host, peer.port, peer.role, peer.cores, peer.version,
        )
        event = PeerEvent(kind, peer)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a callback bug must not kill discovery
                logger.exception("discovery on_event callback failed for %s", event)
        for q in self._subscribers:
            if q.full():
                logger.warning("discovery subscriber is %d events behind; dropping", q.qsize())
            else:
                q.put_nowait(event)

    # ---- zeroconf side ------------------------------------------------------------------

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback: runs on the event loop and only schedules work."""
        name = name.lower()
        if self._closing or name == self.name:
            return
        loop = asyncio.get_running_loop()
        if state_change is ServiceStateChange.Removed:
            loop.call_soon(self._removed, name)
            return
        old = self._resolving.pop(name, None)
        if old is not None:
            old.cancel()  # superseded by a newer announcement
        if len(self._resolving) >= self.limits.max_peers:
            self._reject(name, "too many services being resolved at once (max_peers)")
            return
        task = loop.create_task(self._resolve(name), name=f"mdns resolve {name}")
        self._resolving[name] = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._resolve_done, name))

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and task.exception() is not None:
            logger.error("resolving %s failed", name, exc_info=task.exception())

    async def _resolve(self, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        timeout_ms = self.limits.mdns_resolve_timeout * 1000.0  # zeroconf wants ms
        if not await info.async_request(self._azc.zeroconf, timeout_ms):
            logger.debug(
                "no complete answer for %s within %.1f s", name, self.limits.mdns_resolve_timeout
            )
            return
        hosts = info.parsed_addresses(IPVersion.V4Only)
        try:
            if not hosts:
                raise ValueError("no IPv4 address")
            peer = parse_txt(
                name, info.properties, host=hosts[0], srv_port=info.port, limits=self.limits
            )
        except ValueError as e:
            self._reject(name, str(e))
            return
        if peer.node_id == self.node_id:
            return
        old = self._by_name.get(name)
        if old is None and len(self._by_name) >= self.limits.max_peers:
            self._reject(name, f"peer table full ({self.limits.max_peers} peers)")
            return
        if old == peer:
            return
        self._by_name[name] = peer
        self._rejected.pop(name, None)
        self._emit("added" if old is None else "updated", peer)

    def _removed(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        peer = self._by_name.pop(name, None)
        if peer is not None and not self._closing:
            self._emit("removed", peer)

    def _reject(self, name: str, reason: str) -> None:
        """Log a bad record once (per remembered name) and ignore it."""
        if name in self._rejected:
            return
        if len(self._rejected) >= self.limits.max_peers:
            del self._rejected[next(iter(self._rejected))]  # forget the oldest
        self._rejected[name] = reason
        logger.warning("ignoring mDNS service %r: %s", name, reason)


def _put_last(q: asyncio.Queue[PeerEvent | None], item: PeerEvent | None) -> None:
    """Put an item, dropping the oldest one if the queue is full (used for the end mark)."""
    if q.full():
        q.get_nowait()
    q.put_nowait(item)
