"""``--grid auto``: the planner's predictions and choices (pure), its calibration against recorded
runs, the CLI, and a real-socket cluster whose source re-plans as a peer joins and leaves."""

from __future__ import annotations

import asyncio
import io
import math
from contextlib import redirect_stdout

import pytest
from hypothesis import given, settings, strategies as st

from stealer.cliargs import parse_grid_or_auto
from stealer.darknet import parse_cfg
from stealer.errors import PlanError
from stealer.ftp import auto
from stealer.ftp import cli as ftp_cli
from stealer.ftp.auto import Cluster, NodeSpec, candidate_plans, choose, predict
from stealer.network import Network, builtin_cfg, resolve_cfg
from stealer.node import Node

from .test_node import collect, config, expected_digest

pytestmark = pytest.mark.timeout(120)

YOLO = parse_cfg(resolve_cfg("yolov2"))
CANDIDATES = candidate_plans(YOLO, 16)
BY_NAME = {c.name: c for c in CANDIDATES}
PI_LINK = 20e6 / 8

# Recorded on emulated Pis (0.2 CPU core each, 20 Mbit/s links), bench/RESULTS.md (the
# stop16-1x1-inflight and stop16-5x5 runs: 2 x nodes + 2 frames in flight, the source on a node
# that is not the gateway): frames/s, medians of two repeats.
RECORDED = [
    pytest.param("1x1", 1, 0.246, id="1x1-1-node"),
    pytest.param("1x1", 6, 1.383, id="1x1-6-nodes"),
    pytest.param("1x1", 8, 1.758, id="1x1-8-nodes"),
    pytest.param("5x5 quad", 6, 0.745, id="5x5-reuse-6-nodes"),
    pytest.param("5x5 quad", 8, 0.902, id="5x5-reuse-8-nodes"),
]


def pis(n: int, **kw) -> Cluster:
    return Cluster.equal(n, source=1 if n > 1 else 0, gateway=0, **kw)


@pytest.mark.parametrize("name, nodes, measured", RECORDED)
def test_predictions_land_near_the_recorded_runs(name, nodes, measured):
    p = predict(BY_NAME[name], pis(nodes), 2 * nodes + 2)
    assert p.fps == pytest.approx(measured, rel=0.25), (p, measured)


def test_recorded_ordering_holds():
    """What the runs showed, beyond the figures: 1x1 beats 5x5 at 6 and 8 nodes, and 8 nodes
    beat 6 with either."""
    fps = {(c, n): predict(BY_NAME[c], pis(n), 2 * n + 2).fps for c in ("1x1", "5x5 quad") for n in (6, 8)}
    assert fps["1x1", 8] > fps["1x1", 6] > fps["5x5 quad", 6]
    assert fps["1x1", 8] > fps["5x5 quad", 8] > fps["5x5 quad", 6]


def test_throughput_on_eight_pis_is_whole_frames():
    choice = choose(CANDIDATES, pis(8), "throughput")
    assert choice.best.grid == (1, 1)
    assert choice.best.inflight == 2 * 8 + 2  # ties go to the runtime's own rule
    assert choice.within_budget and len(choice.predictions) == len(CANDIDATES) * 18


def test_latency_objective_tiles_the_frame():
    choice = choose(CANDIDATES, pis(8), "latency")
    whole = min(p.single_latency for p in choice.predictions if p.grid == (1, 1))
    assert choice.best.grid != (1, 1)
    assert choice.best.latency < whole
    assert choice.best.inflight == 1


def test_a_budget_excludes_the_slow_candidates():
    preds = choose(CANDIDATES, pis(8)).predictions
    whole = min(p.latency for p in preds if p.grid == (1, 1))
    tiled = min(p.latency for p in preds if p.grid != (1, 1))
    assert tiled < whole
    budget = (tiled + whole) / 2
    choice = choose(CANDIDATES, pis(8), "latency", latency_budget=budget)
    assert choice.within_budget and choice.best.latency <= budget and choice.best.grid != (1, 1)
    # the most frames/s among those within the budget, which is more than the lowest latency gives
    fits = [p for p in choice.predictions if p.latency <= budget]
    assert choice.best.fps == max(p.fps for p in fits)
    assert choice.best.fps > choose(CANDIDATES, pis(8), "latency").best.fps
    # a generous budget lets whole frames back in
    assert choose(CANDIDATES, pis(8), "latency", latency_budget=100.0).best.grid == (1, 1)


def test_a_budget_nothing_meets_gives_the_lowest_latency_and_says_so():
    choice = choose(CANDIDATES, pis(8), "throughput", latency_budget=0.5)
    assert not choice.within_budget and "no candidate meets 500 ms" in choice.note
    assert choice.best.latency == min(p.latency for p in choice.predictions)


def test_nodes_too_small_for_a_whole_frame_leave_1x1_to_the_others():
    whole = BY_NAME["1x1"]
    small = BY_NAME["5x5 quad"].tile_memory + (1 << 20)  # 5x5 tiles fit, a whole frame's fused block does not
    assert small < whole.tile_memory
    nodes = (NodeSpec(),) + tuple(NodeSpec(memory=small) for _ in range(7))  # the gateway holds everything
    cluster = Cluster(nodes, source=1, gateway=0)
    p = predict(whole, cluster, 18)
    assert p.fps <= predict(whole, Cluster((NodeSpec(),)), 18).fps  # only node 0 runs whole frames
    assert p.fps < predict(whole, pis(8), 18).fps / 5
    choice = choose(CANDIDATES, cluster, "throughput")
    assert choice.best.grid != (1, 1) and choice.best.fps > p.fps


def test_no_node_that_holds_a_tail_means_no_plan():
    small = BY_NAME["5x5 quad"].tile_memory + (1 << 20)
    cluster = Cluster.equal(4, memory=small)
    assert not predict(BY_NAME["1x1"], cluster, 4).feasible
    with pytest.raises(PlanError, match="tails need"):
        choose(CANDIDATES, cluster)


def test_bad_inputs_are_plan_errors():
    with pytest.raises(PlanError, match="objective"):
        choose(CANDIDATES, pis(2), "fastest")
    with pytest.raises(PlanError, match="gateway 3"):
        Cluster.equal(2, gateway=3)
    with pytest.raises(PlanError, match="link"):
        Cluster((NodeSpec(link=0),))


nodes_st = st.lists(st.builds(NodeSpec, speed=st.floats(1e8, 1e11), link=st.floats(1e5, 1e9)),
                    min_size=2, max_size=8)


@settings(max_examples=60, deadline=None)
@given(nodes=nodes_st, extra=st.builds(NodeSpec, speed=st.floats(0, 1e11), link=st.floats(1e5, 1e9)),
       which=st.sampled_from(range(len(CANDIDATES))))
def test_another_node_never_predicts_fewer_frames(nodes, extra, which):
    """From two computing nodes on (a lone node moves no strips, a second one starts to)."""
    cp = CANDIDATES[which]
    before = predict(cp, Cluster(tuple(nodes), source=1, gateway=0), 1000).fps
    after = predict(cp, Cluster((*nodes, extra), source=1, gateway=0), 1000).fps
    assert after >= before * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(nodes=nodes_st, factor=st.floats(1.0, 100.0), which=st.sampled_from(range(len(CANDIDATES))),
       inflight=st.integers(1, 20))
def test_faster_links_never_predict_worse(nodes, factor, which, inflight):
    cp = CANDIDATES[which]
    slow = Cluster(tuple(nodes), source=1, gateway=0)
    fast = Cluster(tuple(NodeSpec(n.speed, n.memory, n.link * factor) for n in nodes), source=1, gateway=0)
    a, b = predict(cp, slow, inflight), predict(cp, fast, inflight)
    assert b.fps >= a.fps * (1 - 1e-9)
    assert b.single_latency <= a.single_latency * (1 + 1e-9)
    assert b.latency <= a.latency * (1 + 1e-9)


def test_predictions_are_consistent_with_frames_in_flight():
    preds = [predict(BY_NAME["3x3 quad"], pis(6), k) for k in range(1, 15)]
    fps = [p.fps for p in preds]
    assert fps == sorted(fps) and preds[0].fps == pytest.approx(1 / preds[0].single_latency)
    for p in preds:  # Little's law
        assert p.latency * p.fps == pytest.approx(max(p.inflight, p.single_latency * p.fps))
    assert preds[-1].bound == "compute" and preds[0].bound == "frames in flight"


# ------------------------------------------------------------------------------------ the CLI
def test_grid_argument_accepts_auto():
    assert parse_grid_or_auto("auto") == "auto" and parse_grid_or_auto("AUTO") == "auto"
    assert parse_grid_or_auto("4x3") == (4, 3)


def test_plan_command_prints_the_candidates_and_the_choice():
    out = io.StringIO()
    with redirect_stdout(out):
        assert ftp_cli.main(["--grid", "auto", "--nodes", "8"]) == 0
    text = out.getvalue()
    assert "6x6 none" in text and "1x1" in text
    chosen = [line for line in text.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].startswith("1x1")
    out = io.StringIO()
    with redirect_stdout(out):
        assert ftp_cli.main(["--grid", "auto", "--objective", "latency", "--latency-budget", "100"]) == 0
    assert "no candidate meets 100 ms" in out.getvalue()


# ------------------------------------------------------------------------------------ the runtime
@pytest.fixture(scope="module")
def tiny_net() -> Network:
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96").replace("height=416", "height=96")
    return Network.from_cfg_text(text, seed=11)


# The planner's speed and link rate are fixed here, so that its choices do not depend on how
# fast this machine is: slow nodes on fast links, the latency objective. One node: 1x1 (tiles
# only add work); two: 3x3; three: 4x4 (checked below on the planner itself first).
AUTO = dict(grid_auto=True, objective="latency", node_speed=1e8, link_rate=1e9)


def test_the_cluster_test_plans_differ_by_node_count(tiny_net):
    cps = candidate_plans(tiny_net.spec, 9)
    grids = [choose(cps, Cluster.equal(n, 1e8, 1e9, gateway=min(1, n - 1)), "latency").best.grid
             for n in (1, 2, 3)]
    assert grids == [(1, 1), (3, 3), (4, 4)]


async def test_source_replans_as_a_peer_joins_and_leaves(tiny_net):
    """Every frame finishes and is bit-exact although the source switched plans under it three
    times: frames keep the plan they were cut with."""
    events: list[dict] = []
    gw = Node(tiny_net, config(gateway=True))
    await gw.start()
    src = Node(tiny_net, config(sources=[5], fps=20, max_inflight=3, peers=[("127.0.0.1", gw.port)], **AUTO),
               on_event=events.append)
    cut: list[str] = []  # the plan key of every frame, as the source cut it
    real_new_frame = src.source.new_frame

    def new_frame(source_id, frame, now):
        out = real_new_frame(source_id, frame, now)
        cut.append(src.source.frames[(source_id, frame.number)].plan_key)
        return out

    src.source.new_frame = new_frame  # type: ignore[method-assign]
    thief: Node | None = None
    results: list[dict] = []

    def plans() -> list[tuple[int, str]]:
        return [(e["nodes"], e["plan"]) for e in events if e["event"] == "plan"]

    async def until(cond) -> None:
        async with asyncio.timeout(60):
            while not cond():
                results.extend(await collect(gw, 1))

    try:
        await src.start()
        await until(lambda: len(results) >= 3 and (2, "3x3:9:quad") in plans())
        thief = Node(tiny_net, config(peers=[("127.0.0.1", gw.port), ("127.0.0.1", src.port)]))
        await thief.start()
        await until(lambda: cut.count("4x4:9:quad") >= 3)
        await thief.close()
        await until(lambda: plans()[-1] == (2, "3x3:9:quad") and cut[-1] == "3x3:9:quad" and len(plans()) >= 4)
        assert await src.drain(60)
        results.extend(await collect(gw, len(cut) - len(results)))
    finally:
        for n in (thief, src, gw):
            if n is not None:
                await n.close()
    assert [n for n, _ in plans()] == [1, 2, 3, 2]
    assert [k for _, k in plans()] == ["1x1:9:none", "3x3:9:quad", "4x4:9:quad", "3x3:9:quad"]
    assert src.stats.replans == 3
    assert {"3x3:9:quad", "4x4:9:quad"} <= set(cut)
    assert sorted(r["frame"] for r in results) == list(range(len(cut)))  # every frame finished
    for r in results:
        assert r["output_sha256"] == expected_digest(tiny_net, 5, r["frame"]), r
    assert gw.stats.frames_done == len(cut)
    assert math.isfinite(max(e["latency"] for e in events if e["event"] == "plan"))
    assert {e["objective"] for e in events if e["event"] == "plan"} == {"latency"}


def test_a_frame_codec_lifts_the_source_uplink_bound():
    """With raw pixels, 1x1 on 20 Mbit/s is bounded by the source's uplink well before 16 nodes;
    frames that travel in a tenth of the bytes move the bound out, and the prediction says so."""
    raw = predict(BY_NAME["1x1"], pis(16), 34)
    jpeg = predict(BY_NAME["1x1"], pis(16, pixel_ratio=0.065), 34)
    assert raw.bound == "source uplink" and jpeg.bound != "source uplink"
    assert jpeg.fps > 1.2 * raw.fps
    assert predict(BY_NAME["1x1"], pis(1, pixel_ratio=0.065), 4).fps == predict(BY_NAME["1x1"], pis(1), 4).fps
    with pytest.raises(PlanError, match="pixel ratio"):
        pis(4, pixel_ratio=0.0)


async def test_peers_tell_their_measured_speed_and_the_plan_uses_it(tiny_net):
    """Each node measures its own FLOP/s and sends it with its Status; the source's planner
    (grid auto, no fixed node_speed) sees every peer at the speed it measured."""
    from dataclasses import replace

    from .test_node import FAST_RT

    quick = replace(FAST_RT, speed_sample=0.02)  # measured after 20 ms of compute
    gw = Node(tiny_net, config(gateway=True, runtime=quick))
    await gw.start()
    src = Node(tiny_net, config(sources=[4], frames=30, max_inflight=3, peers=[("127.0.0.1", gw.port)],
                                runtime=quick, grid_auto=True, link_rate=1e9))
    try:
        await src.start()
        await collect(gw, 30)
        async with asyncio.timeout(30):  # the gateway's last status may still be on its way
            while not 0 < gw._speed_told == src.peers[gw.id].load.speed:  # what it said, as it said it
                await asyncio.sleep(0.01)
        told, heard = gw._speed_told, src.peers[gw.id].load.speed
        cluster = src._cluster_now()
    finally:
        for n in (src, gw):
            await n.close()
    assert gw.stats.busy_seconds >= 0.02 and told > 0
    assert heard == told
    assert sorted(n.speed for n in cluster.nodes) == sorted([src._node_speed(), told])
