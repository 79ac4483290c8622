"""The soak benchmark's own code path, tiny: 50 frames through a gateway and a worker process,
RSS sampled and reported (the real soak, 10,000 frames, is run by hand: ``bench/soak.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def test_soak_50_frames_samples_both_processes(tmp_path, warm_kernels):
    out = tmp_path / "soak.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--frames", "50", "--every", "10",
                           "--timeout", "90", "--quiet", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["frames"] == 50
    assert [s["frames"] for s in report["samples"]][-1] == 50
    for s in report["samples"]:
        for role in ("gateway", "worker"):
            assert s[role]["VmRSS"] > 0 and s[role]["VmHWM"] >= s[role]["VmRSS"]
    # growth is measured from frame 10 (a fifth of the run) and judged, never asserted
    assert report["gateway_growth"]["from_frame"] >= 10 and report["verdict"]["pass"] in (True, False)
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
    print(f"soak smoke: {time.monotonic() - t0:.1f} s")


def test_growth_slope_and_line_counter(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import soak
    finally:
        sys.path.remove(str(ROOT / "bench"))
    samples = [{"frames": f, "gateway": {"VmRSS": 1000 + 3 * f}} for f in (0, 100, 200, 300)]
    g = soak.growth(samples, 100)
    assert g["from_frame"] == 100 and g["bytes"] == 600 and g["slope_bytes_per_frame"] == pytest.approx(3.0)
    path = tmp_path / "r.jsonl"
    counter = soak.LineCounter(path)
    assert counter.poll() == 0  # not written yet
    path.write_text('{"frame": 0}\n{"fra')  # a line being written is not counted yet
    assert counter.poll() == 1
    with open(path, "a") as fh:
        fh.write('me": 1}\n')
    assert counter.poll() == 2 and counter.last == {"frame": 1}
