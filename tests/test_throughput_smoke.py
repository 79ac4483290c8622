"""The throughput benchmark's own code path, small: a 3-host emulated cluster (root only) runs a
handful of frames of a tiny model through ``bench/throughput.py`` and every result is checked
against single-device inference."""

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
    code = tp.main(["--scenarios", "scaling", "--nodes", "3", "--cpu", "0.4", "--rate", "50mbit",
                    "--model", str(cfg), "--weights-seed", "3", "--layers", "9",
                    "--quiet-wait", "0", "--out", str(out), "--digests", str(tmp_path / "digests.json"),
                    "--md", str(tmp_path / "RESULTS.md"), "--plots", str(tmp_path / "plots")])
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["status"] == "ok", run
    # the scenario's own count (10 at 3 nodes): more than are in flight at once, so results are
    # spread over a steady-state window (with all frames in flight they can finish together)
    frames = run["frames_expected"]
    assert frames >= 10 and run["frames_ok"] == frames
    assert run["mismatches"] == [] and run["unverified"] == 0  # every frame checked, bit for bit
    assert run["fps"] and run["fps"] > 0
    assert all(n["stats_ok"] for n in run["nodes"]), run["nodes"]
    assert sum(n["tiles_run"] for n in run["nodes"]) >= frames * 25
    assert run["window"]["mb_per_frame"] > 0
    assert code == 0
    assert "| scaling | 3 nodes |" in (tmp_path / "RESULTS.md").read_text()
