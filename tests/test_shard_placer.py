"""The coordinator's placement machine (:class:`stealer.roles.shards.ShardPlacer`) over histories
of joins, departures, suspicions, late answers and reads: holders given up as lost (frozen, or a
cold process still compiling kernels) come back as soon as they answer, so the shards the
coordinator took over while they were away spread out again; a node told only to drop what it
holds keeps no placement from becoming active."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stealer.config import ShardTiming
from stealer.darknet import parse_cfg
from stealer.network import builtin_cfg
from stealer.roles import shards as sh

BIG = 1 << 40
TIMING = ShardTiming(place_grace=5.0, lease=30.0, suspect_for=60.0)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    cfg = Path(tmp_path_factory.mktemp("placer")) / "tiny96.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                   .replace("height=416", "height=96"))
    return parse_cfg(cfg)


def _read_all(p: sh.ShardPlacer, acts: list, now: float, alive: set[str] | None = None) -> list:
    """Every node told to hold something reads it (in name order; of ``alive`` only, if given):
    the actions that follow."""
    out = []
    for a in [a for a in acts if isinstance(a, sh.Assign) and a.holdings and (alive is None or a.node in alive)]:
        out += p.ready(a.node, a.epoch, True, now)
        p.validate()
    return out


def _sharded_holders(p: sh.ShardPlacer) -> dict[int, set[str]]:
    assert p.active is not None
    return {l.index: {h.node for h in l.holders} for l in p.active.layers if l.mode == "shards"}


def test_holders_given_up_as_lost_get_their_shards_back_when_they_answer_late(spec):
    """The cold-start defect: both holders' first tasks (compiling) ran past the lease, the
    coordinator took every layer whole; their late answers must spread the shards again."""
    p = sh.ShardPlacer(spec, "gw", 9, 2, True, 0.0, TIMING)
    acts = p.nodes_changed({"gw": BIG, "a": BIG, "b": BIG}, 1.0)
    assert any(isinstance(a, sh.Activated) for a in _read_all(p, acts, 1.5))
    assert all(h == {"gw", "a", "b"} for h in _sharded_holders(p).values())
    # a round re-run: both holders suspected as lost, the coordinator alone holds the tail
    acts = p.suspect("a", 40.0) + p.suspect("b", 40.0)
    _read_all(p, acts, 40.5)
    assert p.active is not None and p.active.shards == 1 and not _sharded_holders(p)
    assert {h.node for l in p.active.layers for h in l.holders if l.mode == "whole"} == {"gw"}
    # their results come in, too late for the round: they are back, well before suspect_for
    acts = p.answered("a", 41.0, late=True) + p.answered("b", 41.0, late=True)
    assert any(isinstance(a, sh.Activated) for a in _read_all(p, acts, 41.5))
    assert p.active.shards == 2 and p.active.coded
    assert all(h == {"gw", "a", "b"} for h in _sharded_holders(p).values())


def test_a_slow_holder_stays_out_after_a_late_answer_but_not_after_one_in_time(spec):
    p = sh.ShardPlacer(spec, "gw", 9, 2, True, 0.0, TIMING)
    nodes = {"gw": BIG, "a": BIG, "b": BIG, "c": BIG}
    _read_all(p, p.nodes_changed(nodes, 1.0), 1.5)
    slow = next(n for n in ("a", "b", "c") if any(n in h for h in _sharded_holders(p).values()))
    _read_all(p, p.suspect(slow, 10.0, degrade=False), 10.5)  # recovered from the parity
    assert all(slow not in h for h in _sharded_holders(p).values())
    assert p.answered(slow, 11.0, late=True) == []  # late again: it would only be late again
    assert slow in p.suspects
    acts = p.answered(slow, 12.0)  # in time (a round of the old placement): it may hold again
    assert slow not in p.suspects and acts == [] or any(isinstance(a, sh.Assign) for a in acts)


def test_a_late_ready_of_a_node_given_up_for_not_reading_brings_it_back(spec):
    p = sh.ShardPlacer(spec, "gw", 9, 2, True, 0.0, TIMING)
    acts = p.nodes_changed({"gw": BIG, "a": BIG, "b": BIG}, 1.0)
    for a in acts:
        if isinstance(a, sh.Assign) and a.node != "b":
            p.ready(a.node, a.epoch, True, 2.0)
    acts = p.tick(1.0 + TIMING.lease)  # b never read its shards (compiling, in a cold process)
    assert "b" in p.lost
    _read_all(p, acts, 32.0)
    assert p.active is not None and p.active.shards == 1
    acts = p.ready("b", 1, True, 33.0)  # it read epoch 1's shards after all
    assert "b" not in p.suspects
    _read_all(p, acts, 33.5)
    assert p.active.shards == 2 and all(h == {"gw", "a", "b"} for h in _sharded_holders(p).values())


def test_a_node_told_only_to_drop_its_shards_does_not_hold_up_the_new_placement(spec):
    p = sh.ShardPlacer(spec, "gw", 9, 2, True, 0.0, TIMING)
    _read_all(p, p.nodes_changed({"gw": BIG, "a": BIG, "b": BIG, "c": BIG}, 1.0), 1.5)
    frozen = next(n for n in ("a", "b", "c") if any(n in h for h in _sharded_holders(p).values()))
    acts = p.suspect(frozen, 10.0, degrade=False)
    (drop,) = [a for a in acts if isinstance(a, sh.Assign) and a.node == frozen]
    assert drop.holdings == ()
    assert any(isinstance(a, sh.Activated) for a in _read_all(p, acts, 10.5)), \
        "the new placement waits for the frozen node to drop its shards"
    assert all(frozen not in h and len(h) == 3 for h in _sharded_holders(p).values())


NAMES = ("a", "b", "c", "d")
EVENT = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(NAMES)),
    st.tuples(st.just("leave"), st.sampled_from(NAMES)),
    st.tuples(st.just("lost"), st.sampled_from(NAMES)),
    st.tuples(st.just("slow"), st.sampled_from(NAMES)),
    st.tuples(st.just("late"), st.sampled_from(NAMES)),
    st.tuples(st.just("ready"), st.sampled_from(NAMES + ("gw",))),
    st.tuples(st.just("stale-ready"), st.sampled_from(NAMES)),
    st.tuples(st.just("tick"), st.floats(0.0, 40.0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(EVENT, max_size=25))
def test_once_the_lost_answer_and_everyone_reads_the_shards_spread_over_every_node_not_slow(spec, coded, events):
    """Any history; then every node given up as lost answers (late) and every node reads what it
    is told, with no suspicion running out: the active placement splits each sharded layer over
    K (+ parity) distinct nodes whenever that many nodes are connected and not suspected as slow,
    none of them gone."""
    k = 2
    p = sh.ShardPlacer(spec, "gw", 9, k, coded, 0.0, TIMING)
    now, nodes = 1.0, {"gw": BIG}
    pending: list = p.nodes_changed(nodes, now)
    for kind, arg in events:
        if kind == "join":
            nodes[arg] = BIG
            pending += p.nodes_changed(nodes, now)
        elif kind == "leave" and arg in nodes:
            del nodes[arg]
            pending += p.nodes_changed(nodes, now)
        elif kind in ("lost", "slow") and arg in nodes:
            pending += p.suspect(arg, now, degrade=kind == "lost")
        elif kind == "late" and arg in nodes:
            pending += p.answered(arg, now, late=True)
        elif kind == "ready" and (arg in nodes or arg == "gw"):
            got = [a for a in pending if isinstance(a, sh.Assign) and a.node == arg and a.epoch == p.epoch]
            if got:
                pending += p.ready(arg, p.epoch, True, now)
        elif kind == "stale-ready" and arg in nodes and p.epoch > 1:
            pending += p.ready(arg, p.epoch - 1, True, now)
        elif kind == "tick":
            now += arg
            pending += p.tick(now)
        p.validate()
    # settle: the lost answer, then everyone reads, until nothing changes (no time passes)
    for n in sorted(p.lost & set(nodes)):
        pending += p.answered(n, now, late=True)
    for _ in range(10):
        acts = _read_all(p, [a for a in pending if isinstance(a, sh.Assign) and a.epoch == p.epoch], now, set(nodes))
        pending = acts
        if p.proposed is None:
            break
    if p.proposed is None and p.active is None:  # still in the grace with too few nodes
        _read_all(p, p.tick(max(now, TIMING.place_grace)), max(now, TIMING.place_grace), set(nodes))
        now = max(now, TIMING.place_grace)
    assert p.proposed is None and p.active is not None
    usable = {"gw"} | {n for n in nodes if n not in p.suspects}
    want = k + int(coded)
    for layer, holders in _sharded_holders(p).items():
        assert holders <= usable, (layer, holders, usable)
    if len(usable) >= want:
        held = _sharded_holders(p)
        assert held and all(len(h) == want for h in held.values()), (held, usable, p.suspects)


def test_when_no_placement_fits_the_placer_asks_for_no_tick_before_something_can_change(spec):
    """A gateway whose nodes offer too little for the tail (waiting for more) spun a core: the
    placer's next check stayed at the grace's end, in the past, so the shell ticked it again at
    once, forever."""
    p = sh.ShardPlacer(spec, "gw", 9, 2, False, 0.0, TIMING)
    assert p.nodes_changed({"gw": 200 << 20}, 1.0) == []  # in the grace, one node of the two K=2 wants
    assert p.next_check() == TIMING.place_grace
    (fail,) = p.tick(TIMING.place_grace)  # the tail whole on the gateway does not fit in 200 MB
    assert isinstance(fail, sh.PlaceFailed)
    assert p.next_check() is None  # only an event (a node joining) can change it
    (fail,) = p.nodes_changed({"gw": 200 << 20, "a": 160 << 20}, 5.5)
    assert isinstance(fail, sh.PlaceFailed) and p.next_check() is None
    _read_all(p, p.suspect("a", 6.0), 6.0)
    assert p.next_check() == 6.0 + TIMING.suspect_for  # a suspicion running out can
    acts = p.nodes_changed({"gw": BIG, "a": 160 << 20, "b": BIG}, 7.0)
    assert any(isinstance(a, sh.Activated) for a in _read_all(p, acts, 7.5))
