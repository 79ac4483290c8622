"""mDNS discovery with real multicast on 127.0.0.1 (no mocks), plus TXT validation tables.

Other processes on this machine may be running the same tests at the same time, so every
check looks only at the node ids this test created, never at "exactly N peers".
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from stealer.config import DEFAULT_LIMITS
from stealer.discovery import (
    SERVICE_TYPE,
    Discovery,
    PeerEvent,
    PeerInfo,
    new_node_id,
    parse_txt,
    service_name,
    txt_record,
)
from stealer.wire import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(30)

MODEL = "ab" * 32
# Resolving is what these tests wait for; a shorter resolve timeout only makes a lost
# first answer retry sooner. Safe: the value reaches only the Discovery objects built here.
LIMITS = DEFAULT_LIMITS.replace(mdns_resolve_timeout=1.0)


def node(port: int, role: str = "worker", cores: int = 2, **kw: object) -> Discovery:
    return Discovery(
        new_node_id(), port, role=role, cores=cores, model_hash=MODEL, loopback=True,
        limits=LIMITS, **kw,  # type: ignore[arg-type]
    )


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition set by zeroconf's callbacks (there is no event to await for it)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def collect(events: AsyncIterator[PeerEvent], want: Callable[[list[PeerEvent]], bool]) -> list[PeerEvent]:
    seen: list[PeerEvent] = []
    async for ev in events:
        seen.append(ev)
        if want(seen):
            return seen
    raise AssertionError("event stream ended early")


async def test_three_nodes_find_each_other_and_see_removal() -> None:
    nodes = [node(7001, "source", 4), node(7002), node(7003, cores=1)]
    await asyncio.gather(*(n.start() for n in nodes))
    try:
        ids = {n.node_id for n in nodes}
        for n in nodes:
            others = ids - {n.node_id}
            await wait_until(functools.partial(others.issubset, n.peers), 10, f"{n} to see {others}")
            assert n.node_id not in n.peers
        a, b, c = nodes
        assert a.peers[b.node_id] == PeerInfo(b.node_id, "127.0.0.1", 7002, "worker", 2, MODEL, PROTOCOL_VERSION)
        assert b.peers[a.node_id] == PeerInfo(a.node_id, "127.0.0.1", 7001, "source", 4, MODEL, PROTOCOL_VERSION)
        assert b.peers[c.node_id].cores == 1

        # The iterator replays known peers, then reports the removal of a closed node.
        events = a.events()
        replay = await asyncio.wait_for(
            collect(events, lambda s: {e.peer.node_id for e in s} >= {b.node_id, c.node_id}), 5
        )
        assert all(e.kind == "added" for e in replay)
        await c.close()
        removed = await asyncio.wait_for(
            collect(events, lambda s: any(e.kind == "removed" and e.peer.node_id == c.node_id for e in s)),
            10,
        )
        assert removed[-1].peer.port == 7003
        assert c.node_id not in a.peers and b.node_id in a.peers
        await events.aclose()
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def test_callback_events_and_malformed_records_ignored() -> None:
    seen: list[PeerEvent] = []
    watcher = node(7100, on_event=seen.append)
    good = node(7101)
    rogue = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    bad_cores_id, mismatch_id = new_node_id(), new_node_id()
    txt = txt_record(bad_cores_id, version=1, role="worker", port=7102, cores=1, model_hash=MODEL)
    bad = [
        AsyncServiceInfo(  # cores is not a number
            SERVICE_TYPE, service_name(bad_cores_id), port=7102,
            properties={**txt, "cores": "lots"}, server=f"x{bad_cores_id}.local.",
            parsed_addresses=["127.0.0.1"],
        ),
        AsyncServiceInfo(  # instance name does not match the node id in TXT
            SERVICE_TYPE, service_name(mismatch_id), port=7102,
            properties=txt, server=f"x{mismatch_id}.local.", parsed_addresses=["127.0.0.1"],
        ),
    ]
    try:
        # Started together: each start spends ~1.5 s probing and announcing.
        await asyncio.gather(
            watcher.start(), good.start(), *(rogue.async_register_service(i) for i in bad)
        )
        await wait_until(
            lambda: {service_name(bad_cores_id), service_name(mismatch_id)} <= set(watcher.rejected),
            10, "both malformed records to be rejected",
        )
        await wait_until(lambda: good.node_id in watcher.peers, 10, "the good peer")
        assert bad_cores_id not in watcher.peers and mismatch_id not in watcher.peers
        assert "cores" in watcher.rejected[service_name(bad_cores_id)]
        assert any(e.kind == "added" and e.peer.node_id == good.node_id for e in seen)
        assert not any(e.peer.node_id in (bad_cores_id, mismatch_id) for e in seen)
    finally:
        await rogue.async_close()
        await asyncio.gather(watcher.close(), good.close())


async def test_close_twice_ends_iterators_and_browse_only_mode() -> None:
    browser = node(7200, advertise=False)
    advertiser = node(7201)
    await asyncio.gather(browser.start(), advertiser.start())
    await wait_until(lambda: advertiser.node_id in browser.peers, 10, "the advertiser")
    assert browser.node_id not in advertiser.peers  # browse-only nodes are invisible
    events = browser.events()
    first = await asyncio.wait_for(events.__anext__(), 5)
    assert first.kind == "added"
    await asyncio.gather(browser.close(), browser.close())
    await browser.close()

    async def drain() -> list[PeerEvent]:
        return [e async for e in events]  # ends because close() ended the stream

    await asyncio.wait_for(drain(), 5)  # (it may hold other test runs' peers first)
    await advertiser.close()
    await advertiser.close()


# ---- TXT validation (no network) ------------------------------------------------------

NID = "0123456789abcdef" * 2
GOOD = {b"id": NID.encode(), b"v": b"1", b"role": b"worker", b"port": b"7000", b"cores": b"4", b"model": MODEL.encode()}


def test_parse_txt_accepts_good_record() -> None:
    peer = parse_txt(service_name(NID), GOOD, host="10.0.0.5", srv_port=7000)
    assert peer == PeerInfo(NID, "10.0.0.5", 7000, "worker", 4, MODEL, 1)


@pytest.mark.parametrize(
    "changes, name, srv_port",
    [
        pytest.param({b"cores": None}, None, 7000, id="key-without-value"),
        pytest.param({b"cores": b"0"}, None, 7000, id="zero-cores"),
        pytest.param({b"cores": b"99999"}, None, 7000, id="too-many-cores"),
        pytest.param({b"port": b"70000"}, None, 7000, id="port-range"),
        pytest.param({}, None, 7001, id="srv-port-mismatch"),
        pytest.param({b"id": b"NOTHEX" * 5 + b"zz"}, None, 7000, id="bad-node-id"),
        pytest.param({b"role": b"Worker!"}, None, 7000, id="bad-role"),
        pytest.param({b"model": b"x" * 200}, None, 7000, id="value-too-long"),
        pytest.param({b"model": "é".encode()}, None, 7000, id="non-ascii"),
        pytest.param({b"v": b"-1"}, None, 7000, id="negative-version"),
        pytest.param({b"v": b"1" * 40}, None, 7000, id="huge-version"),
        pytest.param({}, service_name("f" * 32), 7000, id="name-mismatch"),
    ],
)
def test_parse_txt_rejects(changes: dict[bytes, bytes | None], name: str | None, srv_port: int) -> None:
    props = {**GOOD, **changes}
    if changes.get(b"cores", b"") is None:
        props[b"cores"] = None
    with pytest.raises(ValueError):
        parse_txt(name or service_name(NID), props, host="10.0.0.5", srv_port=srv_port)


def test_parse_txt_missing_key() -> None:
    for key in GOOD:
        props = {k: v for k, v in GOOD.items() if k != key}
        with pytest.raises(ValueError, match="missing"):
            parse_txt(service_name(NID), props, host="10.0.0.5", srv_port=7000)


def test_own_record_is_validated_before_advertising() -> None:
    with pytest.raises(ValueError):
        Discovery("not-a-uuid", 7000, loopback=True)
    with pytest.raises(ValueError):
        Discovery(new_node_id(), 7000, role="Bad Role", loopback=True)
