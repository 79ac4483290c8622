"""Direct data paths: with several frames in flight a tile's output stays on the node that made
it and the node that runs the frame's tail fetches it from there (one link instead of two, and
none through the gateway). In-process clusters on real 127.0.0.1 sockets, checked bit for bit
against single-device inference; a holder that dies, or will not give what it kept, costs its
tiles a second run and loses no frame."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from stealer.node import Node, RuntimeLimits
from stealer.wire.messages import OutputsFetch, StripsReply, TileDone

from .test_node import FAST_RT, _rogue, collect, config, expected_digest, steal_one, tiny_net  # noqa: F401

pytestmark = pytest.mark.timeout(120)

RT = RuntimeLimits(**{**FAST_RT.__dict__, "outputs_timeout": 3.0})


@pytest.mark.parametrize("direct", [True, False])
async def test_kept_outputs_reach_the_tail_runner_and_every_frame_is_exact(tiny_net, direct):
    kw = dict(scheme="quad", runtime=RT, direct_outputs=direct)
    gw = Node(tiny_net, config(gateway=True, **kw))
    await gw.start()
    thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port)], **kw))
    await thief.start()
    src = Node(tiny_net, config(sources=[31], frames=8, max_inflight=4,
                                peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)], **kw))
    await src.start()
    nodes = (gw, thief, src)
    try:
        results = await collect(gw, 8)
        # the releases follow the last result over the wire: kept outputs go with their frames
        async with asyncio.timeout(10):
            while any(len(n._kept) for n in nodes):
                await asyncio.sleep(0.05)
    finally:
        for n in (src, thief, gw):
            await n.close()
    assert [r["frame"] for r in results] == list(range(8))
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 31, r["frame"]), r
    kept = sum(n.stats.outputs_kept for n in nodes)
    assert gw.stats.outputs_kept == 0  # the gateway has the maps where they must be
    if direct:
        assert kept > 0, "no tile kept its output"
        assert sum(n.stats.outputs_fetched for n in nodes) > 0
        assert sum(n.stats.outputs_served for n in nodes) > 0
    else:
        assert kept == 0 and sum(n.stats.outputs_fetched for n in nodes) == 0
    assert all(n._kept.nbytes == 0 and n._kept.expired_frames == 0 for n in nodes)
    assert gw.gateway.stats.tiles_redone == 0


async def _keep_one_and(tiny_net, then: str) -> tuple[Node, list[dict]]:
    """A raw peer steals a tile and says it keeps its output; then it dies (``then`` "die"), or
    stays and answers every fetch with "not here" ("refuse")."""
    cfg = config(gateway=True, sources=[33], frames=3, max_inflight=3, runtime=RT)
    gw = Node(tiny_net, cfg)
    await gw.start()
    try:
        rogue = await _rogue(gw.port, tiny_net)
        grant = await steal_one(rogue)
        # (kept whatever its grant advised: the gateway takes a peer's word that it keeps one)
        await rogue.send(TileDone(grant.source, grant.frame, grant.task, grant.plan, "full",
                                  np.empty(0, np.float32), kept=True))
        if then == "die":
            rogue.abort("simulated crash after keeping an output")
            results = await collect(gw, 3)
        else:
            async def refuse() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        msg = await rogue.recv()
                        if isinstance(msg, OutputsFetch):
                            await rogue.send(StripsReply(msg.request_id, False))
            serve = asyncio.create_task(refuse())
            try:
                results = await collect(gw, 3)
            finally:
                serve.cancel()
                rogue.abort("done")
    finally:
        await gw.close()
    return gw, results


@pytest.mark.parametrize("then", ["die", "refuse"])
async def test_a_holder_that_dies_or_refuses_costs_a_rerun_and_loses_no_frame(tiny_net, then):
    gw, results = await _keep_one_and(tiny_net, then)
    assert [r["frame"] for r in results] == [0, 1, 2]
    for r in results:
        assert "error" not in r, r
        assert r["output_sha256"] == expected_digest(tiny_net, 33, r["frame"]), r
    assert gw.gateway.stats.tiles_redone >= 1, "the kept tile never ran again"
