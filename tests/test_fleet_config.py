"""``stealer node --config node.toml``: the file's options under the command line's, read with
the real parser; bad files are one clear line and exit code 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stealer.cli import build_parser
from stealer.errors import ConfigError
from stealer.fleet import parse_args

ROOT = Path(__file__).resolve().parents[1]


def node_args(tmp_path: Path, toml: str, *argv: str) -> argparse.Namespace:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    return parse_args(build_parser(), ["node", "--config", str(path), *argv])


def plain(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["node", *argv])


def test_the_file_sets_options_by_name_or_dest_with_dashes_or_underscores(tmp_path):
    args = node_args(tmp_path, """
gateway = true
grid = "3x3"
max-inflight = 4
max_memory = "512M"
deadline = 250
frame-codec = "zstd"
source = ["synthetic:1", "synthetic:2"]
peer = "10.0.0.2:7000"          # one value for a repeatable option is a list of one
no-reuse = true
speculate = false               # by dest: the same as no-speculate = true
random-weights = 4
metrics = ":9100"
log_format = "json"

[limits]
handshake_timeout = 10
max_frame_bytes = "512M"
""")
    assert args.gateway is True and args.grid == (3, 3) and args.max_inflight == 4
    assert args.max_memory == 512 << 20 and args.deadline == 250.0 and args.frame_codec == "zstd"
    assert args.source == ["synthetic:1", "synthetic:2"] and args.peer == [("10.0.0.2", 7000)]
    assert args.scheme == "none" and args.speculate is False and args.random_weights == 4
    assert args.metrics == (None, 9100) and args.log_format == "json"
    assert args.limits == [("handshake_timeout", 10.0), ("max_frame_bytes", 512 << 20)]
    # what the file does not set keeps the command line's defaults
    defaults = plain()
    assert (args.port, args.policy, args.slots, args.cfg) == (defaults.port, defaults.policy, defaults.slots,
                                                               defaults.cfg)
    assert args.func is defaults.func


def test_the_command_line_overrides_the_file(tmp_path):
    toml = """
grid = "3x3"
port = 7000
slots = 2
source = ["synthetic:1"]
peer = ["10.0.0.2:7000", "10.0.0.3:7000"]
scheme = "wave"
weights = "model.weights"
gateway = true
[limits]
handshake_timeout = 10
peer_dead_max = 20
"""
    args = node_args(tmp_path, toml, "--grid", "2x2", "--port=7100", "--source", "camera:0",
                     "--no-reuse", "--random-weights", "9", "--limit", "handshake_timeout=3")
    assert args.grid == (2, 2) and args.port == 7100 and args.slots == 2
    assert args.source == ["camera:0"]  # a list on the command line replaces the file's
    assert args.peer == [("10.0.0.2", 7000), ("10.0.0.3", 7000)]
    assert args.scheme == "none"  # --no-reuse (same dest as the file's scheme) wins
    # one of an exclusive group on the command line replaces the file's other one
    assert args.random_weights == 9 and args.weights is None
    assert args.gateway is True
    # the [limits] table merges: the command line's come last (and win), the file's others stay
    assert args.limits == [("handshake_timeout", 10.0), ("peer_dead_max", 20.0), ("handshake_timeout", 3.0)]
    from stealer.config import limits_from_args

    limits = limits_from_args(args)
    assert limits.handshake_timeout == 3.0 and limits.peer_dead_max == 20.0


def test_without_config_nothing_changes():
    argv = ["node", "--gateway", "--grid", "2x2", "--peer", "h:1"]
    assert vars(parse_args(build_parser(), argv)) == vars(build_parser().parse_args(argv))


def test_options_added_later_need_no_change(tmp_path):
    """The mapping is read from the parser: a new option works in the file as it is."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["node"]
    sub.add_argument("--future-mode", choices=["latency", "throughput"], default="throughput")
    sub.add_argument("--cameras", type=int, nargs="+", default=[])
    path = tmp_path / "n.toml"
    path.write_text('future-mode = "latency"\ncameras = [1, 2]\n')
    args = parse_args(parser, ["node", "--config", str(path)])
    assert args.future_mode == "latency" and args.cameras == [1, 2]
    path.write_text('future_mode = "fastest"\n')
    with pytest.raises(ConfigError, match=r"n\.toml: future_mode: invalid choice 'fastest'"):
        parse_args(parser, ["node", "--config", str(path)])


def test_the_example_config_is_valid_and_sets_what_it_says(tmp_path):
    args = parse_args(build_parser(), ["node", "--config", str(ROOT / "tools" / "node.example.toml")])
    assert args.cfg == "yolov2" and args.random_weights == 0 and args.grid == (5, 5)
    assert args.metrics == (None, 9100) and args.slots == 1


@pytest.mark.parametrize("toml, message", [
    pytest.param('gatway = true\n', "unknown key 'gatway' (did you mean 'gateway'?)", id="unknown-key"),
    pytest.param('port = "abc"\n', "port: invalid int value: 'abc'", id="not-an-int"),
    pytest.param('port = 7.5\n', "port: invalid int value: 7.5", id="float-for-int"),
    pytest.param('gateway = "yes"\n', "gateway: expected true or false, got 'yes'", id="flag-not-bool"),
    pytest.param('slots = true\n', "slots: expected a number or a string, got a boolean", id="bool-for-int"),
    pytest.param('host = 5\n', "host: expected a string, got 5", id="int-for-string"),
    pytest.param('grid = "3y3"\n', "grid: ", id="type-function-refuses"),
    pytest.param('policy = "grab"\n', "policy: invalid choice 'grab'", id="bad-choice"),
    pytest.param('cfg = ["a", "b"]\n', "cfg: expected one value, got a list", id="list-for-scalar"),
    pytest.param('peer = ["nohost"]\n', "peer: expected HOST:PORT", id="bad-list-item"),
    pytest.param('[limits]\nhandshake_timeot = 3\n', "limits.handshake_timeot: --limit", id="bad-limit-name"),
    pytest.param('[limits]\nmax_frame_bytes = 1.5\n', "limits.max_frame_bytes: --limit max_frame_bytes",
                 id="bad-limit-value"),
    pytest.param('weights = "w"\nrandom-weights = 1\n', "weights and random-weights cannot both be set",
                 id="exclusive-pair"),
    pytest.param('scheme = "none"\nreuse = true\n', "scheme and reuse set the same option", id="same-dest-twice"),
    pytest.param('config = "other.toml"\n', "config: a config file cannot name another", id="nested-config"),
    pytest.param('port = \n', "not valid TOML", id="syntax"),
])
def test_bad_settings_name_the_file_and_the_key(tmp_path, toml, message):
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        parse_args(build_parser(), ["node", "--config", str(path)])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_a_flag_set_false_by_its_name_is_as_if_not_given(tmp_path):
    args = node_args(tmp_path, "gateway = false\nno-reuse = false\nno-discovery = false\n")
    assert args.gateway is False and args.scheme == "auto" and args.no_discovery is False


def cli_env() -> dict[str, str]:
    """The environment of a ``python -m stealer`` child: this checkout's package first (the
    installed one may be another worktree's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stealer", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=cli_env())


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text('grid = "5x5"\nmax-inflight = "lots"\n')
    r = run_cli("node", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"stealer: error: {bad}: max-inflight: 'lots' is not a number of frames or 'auto'"]
    bad.write_text("slots = 1\nlisten = 7\n")
    r = run_cli("node", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and f"{bad}: unknown key 'listen'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("node", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read config file" in r.stderr and "missing.toml" in r.stderr


def test_the_scheduling_and_codec_options_come_from_the_file(tmp_path):
    """Options of the planner and the frame codecs (added on other branches) need no mapping."""
    path = tmp_path / "n.toml"
    path.write_text('grid = "auto"\nobjective = "latency"\nlatency-budget = 3000\nframe_codec = "zstd"\n')
    args = parse_args(build_parser(), ["node", "--config", str(path), "--frame-codec", "jpeg"])
    assert args.grid == "auto" and args.objective == "latency" and args.latency_budget == 3000
    assert args.frame_codec == "jpeg"  # the command line wins
