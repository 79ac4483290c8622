"""The command line, run as real processes."""

from __future__ import annotations

import os
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from stealer.network import builtin_cfg


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stealer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def small_tiny_cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny64.cfg"
    cfg.write_text(builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64")
                   .replace("height=416", "height=64"))
    return cfg


def test_weights_then_infer_equals_random_weights(tmp_path):
    cfg = small_tiny_cfg(tmp_path)
    r = run("weights", "--cfg", str(cfg), "--seed", "5", "--out", str(tmp_path / "w.weights"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r1 = run("infer", "--cfg", str(cfg), "--weights", str(tmp_path / "w.weights"), "--out",
             str(tmp_path / "a.json"), "--save-output", str(tmp_path / "a.npy"), "synthetic:3", cwd=tmp_path)
    r2 = run("infer", "--cfg", str(cfg), "--random-weights", "5", "--save-output", str(tmp_path / "b.npy"),
             "synthetic:3", cwd=tmp_path)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["output_shape"] == [125, 2, 2] and result["source"] == "synthetic:3#0"
    assert isinstance(result["detections"], list)
    stdout_json = json.loads(r2.stdout.strip().splitlines()[-1])
    assert stdout_json["model_hash"] != result["model_hash"]  # hashes name the weights' origin


def test_infer_on_npy_and_image(tmp_path):
    from PIL import Image

    cfg = small_tiny_cfg(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((3, 64, 64), np.float32))
    assert run("infer", "--cfg", str(cfg), str(tmp_path / "x.npy"), cwd=tmp_path).returncode == 0
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "im.png")
    r = run("infer", "--cfg", str(cfg), str(tmp_path / "im.png"), "--out", str(tmp_path / "r.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_bad_inputs_give_one_clear_line(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=4\nsize=3\n[lstm]\n")
    r = run("infer", "--cfg", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:8: unknown section [lstm]" in r.stderr
    cfg = small_tiny_cfg(tmp_path)
    (tmp_path / "short.weights").write_bytes(b"\0" * 100)
    r = run("infer", "--cfg", str(cfg), "--weights", str(tmp_path / "short.weights"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "file has 100 bytes" in r.stderr
    np.save(tmp_path / "x.npy", np.zeros((3, 32, 32), np.float32))
    r = run("infer", "--cfg", str(cfg), str(tmp_path / "x.npy"), cwd=tmp_path)
    assert r.returncode == 2 and "must have shape (C,H,W)=(3, 64, 64)" in r.stderr


def test_info_table(tmp_path):
    r = run("info", "--cfg", "yolov2", cwd=tmp_path)
    assert r.returncode == 0
    assert "62.938" in r.stdout and "conv 3x3/1 p1 32 bn leaky" in r.stdout


def test_a_node_without_http_outputs_never_imports_aiohttp():
    """Building the command line and loading the node runtime must not import aiohttp (about
    9 MiB resident on every node, counted against --max-memory): only --http/--metrics/--mjpeg
    need it, and they import it when they start."""
    code = ("import sys; import stealer.cli as cli; cli.build_parser().parse_args(['node', '--shards', '4']); "
            "import stealer.node, stealer.node.shards, stealer.launcher; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.stdout.strip() == "[]", out.stdout
