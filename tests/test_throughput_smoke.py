"""The throughput benchmark's own code path, small: a 3-host emulated cluster (root only) runs a
tiny model through ``bench/throughput.py``, twice, every result is checked against single-device
inference, and frames/s comes from the steady window with a median and spread over the repeats."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from stealer.network import builtin_cfg

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.root, pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0, reason="the cluster emulator needs root")]


def test_throughput_smallest_scenario_matches_single_device(tmp_path):
    sys.path.insert(0, str(ROOT))
    from tools.emulate import check_environment

    try:
        check_environment()
    except Exception as exc:  # noqa: BLE001 - any missing tool means skip, with the reason
        pytest.skip(str(exc))
    import bench.throughput as tp

    cfg = tmp_path / "tiny96.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                   .replace("height=416", "height=96"))
    out = tmp_path / "throughput.json"
    # half the default frames (at 3 nodes 8 in flight: (60 + 2 x 8) / 2 = 38, 22 of them in the
    # steady window), twice
    code = tp.main(["--scenarios", "scaling", "--nodes", "3", "--cpu", "0.4", "--rate", "50mbit",
                    "--model", str(cfg), "--weights-seed", "3", "--layers", "9", "--frames-scale", "0.5",
                    "--repeat", "2",
                    "--quiet-wait", "0", "--out", str(out), "--digests", str(tmp_path / "digests.json"),
                    "--md", str(tmp_path / "RESULTS.md"), "--plots", str(tmp_path / "plots")])
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["run"]["repeat"] for r in runs] == [0, 1]
    for run in runs:
        assert run["status"] == "ok", run
        frames = run["frames_expected"]
        inflight = run["run"]["max_inflight"]
        assert inflight == 8 and frames == 38 and run["frames_ok"] == frames
        assert run["mismatches"] == [] and run["unverified"] == 0  # every frame checked, bit for bit
        # frames/s over the steady window: the warm-up burst and the drain left out
        assert run["fps_basis"] == "steady" and run["fps"] > 0 and run["fps_all"] > 0
        assert run["steady"]["results"] == frames - 2 * inflight
        assert run["window"]["basis"] == "steady"
        assert all(n["stats_ok"] for n in run["nodes"]), run["nodes"]
        assert sum(n["tiles_run"] for n in run["nodes"]) >= frames * 25
        assert run["window"]["mb_per_frame"] > 0
    (config,) = report["configs"]
    assert config["repeats"] == 2 and config["fps_basis"] == "steady"
    assert config["fps_min"] <= config["fps"] <= config["fps_max"]
    assert sorted(config["fps_values"]) == sorted(r["fps"] for r in runs)
    assert code == 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| scaling | 3 nodes |" in md and "38 x 2" in md
