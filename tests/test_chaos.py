"""Chaos on real processes (127.0.0.1, mDNS): workers killed or frozen and restarted, the gateway
killed once; every frame must come out, bit-identical to single-device inference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("warm_kernels")]


def test_chaos_loses_no_frame(tmp_path):
    import chaos

    # --timeout ends the run well inside pytest's timeout, so a stuck frame fails with the
    # frames it lost and the directory holding every node's log, not a bare timeout
    report = chaos.main(["--frames", "60", "--fps", "8", "--kill-every", "1.2", "--workers", "3",
                         "--no-baseline", "--timeout", "200", "--out", str(tmp_path / "chaos.json")])
    c = report["chaos"]
    assert c["lost"] == [] and c["wrong"] == [], (c["lost"], c["wrong"], c["work"])
    assert c["completed"] == 60
    assert c["takeover_seconds"] is not None, "the gateway was killed but nobody took over"
    kinds = {k["how"] for k in c["kills_detail"]}
    assert {"SIGKILL", "SIGSTOP"} <= kinds
    for d in c["detection"]:
        # a killed process's sockets close at once; a frozen one is caught by the heartbeat
        assert d["seconds"] < (0.5 if d["how"] == "SIGKILL" else 1.5), d
