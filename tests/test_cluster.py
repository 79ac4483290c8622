"""Whole clusters of real processes through the CLI: kill -9 and SIGTERM mid-run, and (as root)
hosts in network namespaces on a bridge that find each other by mDNS."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stealer.images import synthetic_frame
from stealer.network import Network, builtin_cfg

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("warm_kernels")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny96.cfg"
    path.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=96")
                    .replace("height=416", "height=96"))
    return path


def digests(cfg: Path, seed: int, frames: int) -> list[str]:
    net = Network.from_random(cfg, 3)
    return [hashlib.sha256(net.forward(synthetic_frame(seed, f, net.input_shape)).tobytes()).hexdigest()
            for f in range(frames)]


def node(cfg: Path, tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "stealer", "node", "--cfg", str(cfg), "--random-weights", "3",
            "--grid", "3x3", "--layers", "9", "--host", "127.0.0.1", "--no-discovery",
            "--stats", str(tmp / f"{name}.json"), *extra]
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def listening_port(tmp: Path, name: str, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / f"{name}.log").read_text()
        for line in (tmp / f"{name}.log").read_text().splitlines():
            if line.startswith("{") and '"listening"' in line:
                return json.loads(line)["port"]
        time.sleep(0.05)
    raise AssertionError(f"{name} did not start")


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def wait_results(path: Path, n: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = read_results(path)
        if len(res) >= n:
            return res
        time.sleep(0.1)
    raise AssertionError(f"only {len(read_results(path))} of {n} results")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_worker_killed_mid_run_loses_no_frame(small_cfg, tmp_path, how):
    frames = 8
    out = tmp_path / "results.jsonl"
    gw = node(small_cfg, tmp_path, "gw", "--gateway", "--out", str(out), "--source", "synthetic:4",
              "--frames", str(frames), "--max-inflight", "2")
    procs = [gw]
    try:
        port = listening_port(tmp_path, "gw", gw)
        workers = [node(small_cfg, tmp_path, f"w{i}", "--peer", f"127.0.0.1:{port}") for i in range(2)]
        procs += workers
        for i, w in enumerate(workers):
            listening_port(tmp_path, f"w{i}", w)
        wait_results(out, 2)
        workers[0].send_signal(how)
        workers[0].wait(30)
        if how == signal.SIGTERM:
            assert workers[0].returncode == 0, (tmp_path / "w0.log").read_text()
        results = wait_results(out, frames)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(30)
    assert [r["frame"] for r in results] == list(range(frames))
    assert [r["output_sha256"] for r in results] == digests(small_cfg, 4, frames)
    assert gw.returncode == 0


def test_bad_model_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[maxpool]\nsize=2\nstride=2\n[lstm]\n")
    r = subprocess.run([sys.executable, "-m", "stealer", "node", "--cfg", str(bad), "--no-discovery"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown section [lstm]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_hosts_in_namespaces_find_each_other_by_mdns(small_cfg, tmp_path):
    sys.path.insert(0, str(ROOT))
    from tools.emulate import Cluster, check_environment

    try:
        check_environment()
    except Exception as exc:  # noqa: BLE001 - any missing tool means skip, with the reason
        pytest.skip(str(exc))
    frames = 4
    out = tmp_path / "results.jsonl"
    base = [sys.executable, "-m", "stealer", "node", "--cfg", str(small_cfg), "--random-weights", "3",
            "--grid", "3x3", "--layers", "9"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with Cluster(nodes=3, cpu=None, rate="50mbit") as cluster:
        procs = [
            cluster.spawn(0, base + ["--gateway", "--out", str(out), "--expect", str(frames)], env=env,
                          stdout=open(tmp_path / "n0.log", "wb"), stderr=subprocess.STDOUT, substitute=False),
            cluster.spawn(1, base + ["--source", "synthetic:6", "--frames", str(frames)], env=env,
                          stdout=open(tmp_path / "n1.log", "wb"), stderr=subprocess.STDOUT, substitute=False),
            cluster.spawn(2, base, env=env, stdout=open(tmp_path / "n2.log", "wb"), stderr=subprocess.STDOUT,
                          substitute=False),
        ]
        try:
            results = wait_results(out, frames, timeout=150)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
    assert [r["output_sha256"] for r in results] == digests(small_cfg, 6, frames)
