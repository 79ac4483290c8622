"""The throughput benchmark's arithmetic, no cluster: the steady-state window (warm-up burst and
drain left out), the run plan (frame counts, repeats, the latency scenario) and the medians and
spreads over repeats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.throughput as tp  # noqa: E402


def _run_of(warm: int, steady: int, drain: int, period: float = 0.5) -> list[float]:
    """Release stamps of a run: a warm-up burst (``warm`` results 10 ms apart after a 5 s
    start-up), a steady stream every ``period`` s, then a drain tail that comes out fast (the
    backlog runs down), the way a run with ``warm`` frames in flight looks."""
    t = 5.0
    out = []
    for _ in range(warm):
        out.append(t)
        t += 0.01
    for _ in range(steady):
        t += period
        out.append(t)
    for _ in range(drain):
        t += 0.05
        out.append(t)
    return out


def test_steady_window_skips_warmup_burst_and_drain():
    stamps = _run_of(warm=4, steady=52, drain=4, period=0.5)
    st = tp.steady_fps(stamps, 4)
    assert st is not None
    fps, start, end, n = st
    assert n == len(stamps) - 2 * 4 == 52
    sorted_stamps = sorted(stamps)
    assert start == sorted_stamps[4] and end == sorted_stamps[-5]
    assert fps == pytest.approx(2.0)  # one result per 0.5 s: the stream, not the burst or the tail
    # first to last result mixes in the burst and the tail: a different (here: wrong) figure
    all_fps = (len(stamps) - 1) / (sorted_stamps[-1] - sorted_stamps[0])
    assert abs(all_fps - 2.0) > 0.1


def test_steady_window_order_does_not_matter_and_starts_after_first_result():
    stamps = _run_of(warm=3, steady=20, drain=3)
    shuffled = stamps[::2] + stamps[1::2]
    assert tp.steady_fps(shuffled, 3) == tp.steady_fps(stamps, 3)
    st = tp.steady_fps(stamps, 3)
    assert st is not None and st.start >= min(stamps) and st.end <= max(stamps)
    # no frames in flight (a degenerate argument) still never reaches before the first result
    st0 = tp.steady_fps(stamps, 0)
    assert st0 is not None and st0.start == min(stamps) and st0.results == len(stamps)


def test_one_in_flight_drops_first_and_last():
    stamps = [10.0 + 2.0 * i for i in range(12)]  # latency runs: one frame every 2 s
    stamps[0] = 8.5  # the cold first frame
    st = tp.steady_fps(stamps, 1)
    assert st is not None
    assert st.results == 10 and st.start == 12.0 and st.end == 30.0
    assert st.fps == pytest.approx(0.5)


@pytest.mark.parametrize("n,inflight", [(0, 4), (1, 1), (8, 4), (9, 4), (5, 2)])
def test_too_few_results_give_none(n, inflight):
    # at most one result left once the burst and the drain are out: no interval to measure
    stamps = [float(i) for i in range(n)]
    assert tp.steady_fps(stamps, inflight) is None


def test_all_at_once_gives_none():
    assert tp.steady_fps([3.0] * 20, 4) is None


def _args(*extra: str):
    """The bench's own parser and defaults, without running anything."""
    return tp.build_parser().parse_args(["--model", "yolov2-tiny", *extra])


def test_plan_cluster_runs_have_60_frames_and_repeats_have_own_keys():
    runs = tp.plan_runs(_args("--scenarios", "single,scaling,latency,policy"), "fused.cfg")
    cluster = [r for r in runs if r.kind != "infer" and r.scenario != "latency"]
    assert cluster and all(r.total_frames >= tp.MIN_FRAMES for r in cluster)
    assert all(r.total_frames - 2 * r.total_inflight >= 20 for r in cluster)  # a real window
    one = [r for r in cluster if r.nodes == 1]
    assert one and all(r.total_frames >= 60 for r in one)
    # the repeat index is in the key, so --resume keeps both repeats (one key may serve two
    # scenarios: policy "steal, 1 source" is the scaling run at 6 nodes, run once per repeat)
    keys = [(r.key(), r.scenario, r.label) for r in runs]
    assert len(keys) == len(set(keys))
    assert {r.repeat for r in runs} == {0, 1}
    assert all(f'"repeat": {r.repeat}' in r.key() for r in runs)
    by_config = {}
    for r in runs:
        by_config.setdefault(tp.config_key({**r.__dict__}), []).append(r.repeat)
    assert all(sorted(v) == [0, 1] for v in by_config.values())
    lat = [r for r in runs if r.scenario == "latency"]
    assert sorted({r.nodes for r in lat}) == [1, 2, 3, 4, 6, 8]
    assert all(r.max_inflight == 1 and r.frames >= 10 for r in lat)
    # priority: single, then scaling, then latency; a scenario's repeats back to back
    order = list(dict.fromkeys(r.scenario for r in runs))
    assert order[:3] == ["single", "scaling", "latency"]
    sc = [r.repeat for r in runs if r.scenario == "scaling"]
    assert sc == sorted(sc)


def test_quick_plan_stays_small_but_has_a_window():
    runs = tp.plan_runs(_args("--quick", "--scenarios", "scaling", "--repeat", "1"), "fused.cfg")
    assert runs and all(r.total_frames < tp.MIN_FRAMES for r in runs)
    assert all(r.total_frames - 2 * r.total_inflight >= 2 for r in runs)


def _result(label: str, nodes: int, fps: float, repeat: int, scenario: str = "scaling", **kw) -> dict:
    run = {"scenario": scenario, "label": label, "kind": kw.pop("kind", "stealer"), "nodes": nodes, "frames": 60,
           "sources": [1], "max_inflight": kw.pop("max_inflight", 4), "fused_only": False, "repeat": repeat,
           "grid": [5, 5], "scheme": "quad", "policy": "steal"}
    return {"run": run, "status": "ok", "fps": fps, "fps_all": fps * 1.2, "fps_basis": "steady",
            "frames_ok": 60, "frames_expected": 60, "mismatches": [], "unverified": 0,
            "latency_p50": kw.pop("lat", 1.0), "latency_p99": 2.0, "ideal_speedup": 3.0,
            "startup_seconds": 4.0, "nodes": [], "window": {}, "run_key": f"{label}/{repeat}", **kw}


def test_view_gives_median_spread_and_speedup_of_medians():
    runs = [
        _result("node 1x1", 1, 0.10, 0, scenario="single"), _result("node 1x1", 1, 0.12, 1, scenario="single"),
        _result("4 nodes", 4, 0.30, 0), _result("4 nodes", 4, 0.36, 1),
        _result("1 nodes, 1 in flight", 1, 0.1, 0, scenario="latency", max_inflight=1, lat=8.0),
        _result("1 nodes, 1 in flight", 1, 0.1, 1, scenario="latency", max_inflight=1, lat=10.0),
        _result("4 nodes, 1 in flight", 4, 0.3, 0, scenario="latency", max_inflight=1, lat=3.0),
        _result("4 nodes, 1 in flight", 4, 0.3, 1, scenario="latency", max_inflight=1, lat=3.0),
    ]
    v = tp.view({"runs": runs})
    assert len(v["runs"]) == 4
    four = next(c for c in v["runs"] if c["run"]["label"] == "4 nodes")
    assert four["repeats"] == 2 and four["fps"] == pytest.approx(0.33)
    assert (four["fps_min"], four["fps_max"]) == (0.30, 0.36)
    assert four["frames_ok"] == four["frames_expected"] == 120 and four["frames_per_run"] == 60
    assert v["baseline"]["fps"] == pytest.approx(0.11)
    assert four["speedup"] == pytest.approx(0.33 / 0.11)
    assert four["efficiency"] == pytest.approx(0.33 / 0.11 / 3.0)
    lat4 = next(c for c in v["runs"] if c["run"]["label"] == "4 nodes, 1 in flight")
    assert lat4["latency_ratio"] == pytest.approx(3.0 / 9.0)
    table = tp.latency_md(v)
    assert "| 4 | 5x5 reuse | unshaped | 60 x 2 | 3.00 |" in table and "0.330 (0.300–0.360)" in table
    md, _, _ = tp.markdown(v)
    assert "| scaling | 4 nodes | 4 |" in md and "0.300–0.360" in md
    summary = tp.config_summary(v)
    assert {c["label"] for c in summary} == {"node 1x1", "4 nodes", "1 nodes, 1 in flight", "4 nodes, 1 in flight"}


def test_frame_codec_runs_have_their_own_reference_digests():
    """A jpeg run is checked against inference on the decoded JPEG frames, cached under a key
    naming codec and quality; lossless codecs compute on the camera's frames, so they share
    raw's digests (and raw's keys are those of before the codecs: old caches stay valid)."""
    import hashlib

    from stealer.images import synthetic_frame
    from stealer.network import Network, builtin_cfg

    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64").replace("height=416", "height=64")
    net = Network.from_cfg_text(text, seed=3)
    raw = tp.Run("s", "l")
    assert "frame_codec" not in raw.key() and "jpeg_quality" not in raw.key()
    assert tp.Run("s", "l", frame_codec="zstd").key() != raw.key()  # its own run, for --resume
    assert tp.Run("s", "l", frame_codec="zstd").frame_kind == raw.frame_kind == ("raw", 0)
    jpeg = tp.Run("s", "l", frame_codec="jpeg", jpeg_quality=70)
    assert jpeg.frame_kind == ("jpeg", 70) and jpeg.key() != raw.key()
    assert tp.Run("s", "l", kind="dask", frame_codec="jpeg").frame_kind == ("jpeg", 90)  # dask gets the same frames
    assert tp.digest_key(net) == tp.digest_key(net, raw.frame_kind)
    assert len({tp.digest_key(net), tp.digest_key(net, ("jpeg", 70)), tp.digest_key(net, ("jpeg", 90))}) == 3
    want_raw = hashlib.sha256(net.forward(synthetic_frame(2, 1, net.input_shape)).tobytes()).hexdigest()
    want_jpeg = hashlib.sha256(net.forward(synthetic_frame(2, 1, net.input_shape, "jpeg", 70)).tobytes()).hexdigest()
    assert tp.reference_digest(net, 2, 1) == want_raw
    assert tp.reference_digest(net, 2, 1, ("jpeg", 70)) == want_jpeg != want_raw


def test_plan_runs_carry_the_frame_codec():
    args = _args("--scenarios", "scaling")
    args.frame_codec, args.jpeg_quality = "jpeg", 80
    runs = tp.plan_runs(args, "fused.cfg")
    assert runs and all((r.frame_codec, r.jpeg_quality) == ("jpeg", 80) for r in runs if r.kind == "stealer")


def test_codec_scenario_runs_the_codecs_side_by_side_and_one_node_ignores_the_rate():
    runs = tp.plan_runs(_args("--scenarios", "single,codec", "--nodes", "1,8", "--repeat", "1"), "fused.cfg")
    codec = [r for r in runs if r.scenario == "codec"]
    assert [r.frame_codec for r in codec] == ["raw", "zstd", "jpeg"]
    assert {(r.nodes, r.grid) for r in codec} == {(8, (1, 1))} and len({r.key() for r in codec}) == 3
    one = [r for r in runs if r.scenario == "single" and r.kind == "stealer"]
    other_rate = tp.plan_runs(_args("--scenarios", "single", "--rate", "none", "--repeat", "1"), "fused.cfg")
    assert one and one[0].rate is None
    assert one[0].key() == next(r for r in other_rate if r.kind == "stealer").key()  # --resume reuses it


def test_hetero_runs_the_grid_and_whole_frames():
    runs = tp.plan_runs(_args("--scenarios", "hetero", "--repeat", "1"), "fused.cfg")
    assert sorted(r.grid for r in runs) == [(1, 1), (5, 5)] and {r.cpu for r in runs} == {(0.4, 0.2)}
    runs = tp.plan_runs(_args("--scenarios", "hetero", "--repeat", "1", "--grid", "1x1"), "fused.cfg")
    assert [r.grid for r in runs] == [(1, 1)]


def test_auto_scenario_runs_grid_auto_for_both_objectives(tmp_path):
    runs = tp.plan_runs(_args("--scenarios", "single,auto", "--nodes", "1,8", "--repeat", "1"), "fused.cfg")
    auto = [r for r in runs if r.scenario == "auto"]
    assert {(r.nodes, r.objective, r.max_inflight == 1) for r in auto} == {
        (6, "throughput", False), (8, "throughput", False), (6, "latency", True), (8, "latency", True)}
    assert all(r.grid_auto for r in auto) and len({r.key() for r in auto}) == 4
    plain = next(r for r in runs if r.kind == "stealer" and r.scenario == "single")
    assert "grid_auto" not in plain.key()  # the keys of runs of before (--resume) stay as they were
    assert tp.config_key({**plain.__dict__}) == tp.config_key(
        {k: v for k, v in plain.__dict__.items() if k not in ("grid_auto", "objective")})


def test_auto_choice_reads_the_sources_last_plan_event(tmp_path):
    log = tmp_path / "node1.log"
    lines = [  # what stealer.node.source emits on --grid auto
        {"event": "listening", "node_id": "abc"},
        {"event": "plan", "plan": "1x1:16:none", "nodes": 1, "objective": "latency", "inflight": 1, "fps": 0.25,
         "latency": 4.0, "within_budget": True},
        {"event": "plan", "plan": "3x3:16:quad", "nodes": 8, "objective": "latency", "inflight": 1, "fps": 0.41,
         "latency": 2.44, "within_budget": True},
    ]
    log.write_text("\n".join(__import__("json").dumps(x) for x in lines) + "\nnot json\n")
    got = tp.auto_choice(log)
    assert got == {"plan": "3x3 quad", "grid": (3, 3), "scheme": "quad", "objective": "latency", "nodes": 8,
                   "inflight": 1, "predicted_fps": 0.41, "predicted_latency": 2.44}
    assert tp.auto_choice(tmp_path / "missing.log") is None
    r = _result("8 nodes, grid auto, latency", 8, 0.4, 0, scenario="auto", max_inflight=1, lat=2.0,
                auto_choice=got)
    r["run"].update(grid_auto=True, objective="latency")
    one = _result("1 nodes, 1 in flight", 1, 0.1, 0, scenario="latency", max_inflight=1, lat=8.0)
    table = tp.auto_md(tp.view({"runs": [r, one]}))
    assert "| 8 nodes, grid auto, latency | latency | 3x3 quad (1) | 0.410 | 0.400 | 0.98 | 2.44 | 2.00 | 0.82 | 0.25 | ok |" \
        in table
