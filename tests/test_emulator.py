"""The cluster emulator (tools/emulate.py) with real namespaces, cgroups, tc and mDNS.

Needs root and iproute2; skipped otherwise (the parsing and error-message tests run anywhere).
Every cluster has its own run id, and each test checks that nothing carrying it survives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import IO

import pytest

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "emulate.py"


def _load() -> ModuleType:
    # Loaded by path: tools/ is not an installed package, and this works whatever
    # pytest's import mode is.
    spec = importlib.util.spec_from_file_location("stealer_tools_emulate", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


emulate = _load()


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups)"
    try:
        emulate.check_environment()
    except emulate.EmulatorError as e:
        return str(e)
    return None


needs_root = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def as_root(test):
    """Mark a test as needing root (skipped without it) and bound its time."""
    return pytest.mark.root(needs_root(pytest.mark.timeout(60)(test)))


PY = sys.executable


def leftovers(rid: str) -> list[str]:
    """Everything on the machine that still carries run id ``rid``."""
    found = [n for n in emulate._list_netns(emulate._which("ip")) if rid in n]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [line for line in links.splitlines() if rid in line]
    for parent in set(emulate._cgroup_layout(memory=True).parents.values()):
        found += [str(p) for p in parent.glob(f"*{rid}*")]
    if (emulate.STATE_DIR / f"{rid}.json").exists():
        found.append(f"state file of {rid}")
    return found


def gone(pid: int) -> bool:
    info = emulate._proc_start(pid)
    return info is None or info[0] in "ZX"  # a zombie of a dead parent waits for init


def read_until(stream: IO[bytes], done: str, timeout: float) -> str:
    """Read ``stream`` until ``done`` appears in it (or EOF / timeout); return what was read."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    data = b""
    deadline = time.monotonic() + timeout
    while done.encode() not in data and time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    sel.close()
    return data.decode(errors="replace")


# ---------------------------------------------------------------------------- no root needed

def test_parsing():
    assert emulate.parse_rate("20mbit") == 20_000_000
    assert emulate.parse_rate("500kbit") == 500_000
    assert emulate.parse_rate("1mbps") == 8_000_000  # tc: bps is bytes per second
    assert emulate.parse_rate("none") is None and emulate.parse_rate(None) is None
    assert emulate.parse_cpu("0.4,0.2", 3) == [0.4, 0.2, 0.4]
    assert emulate.parse_cpu(0.2, 2) == [0.2, 0.2]
    assert emulate.parse_cpu("none", 2) == [None, None]
    assert emulate.parse_size("64M") == 64 * 2**20
    for bad in (lambda: emulate.parse_rate("fast"), lambda: emulate.parse_cpu("0.001", 1),
                lambda: emulate.parse_size("1K")):
        with pytest.raises(ValueError):
            bad()


def test_placeholders_only_replace_known_words():
    c = emulate.Cluster(3, cpu="0.4,0.2", sources_per_node=2, run_id="t0")
    assert c.substitute(1, ["{name}", "--ip={ip}", "{peers}", "{sources}", "{cpu}", "d = {}", "{nope}"]) == [
        "node1", "--ip=10.213.0.2", "10.213.0.1,10.213.0.3", "2", "0.2", "d = {}", "{nope}"]
    assert c.environment(0)["STEALER_EMU_IP"] == "10.213.0.1"


def test_clear_errors_when_not_root_or_tool_missing(monkeypatch, capsys):
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 1000)
    assert emulate.main(["--nodes", "2", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulate, "_which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(emulate.EmulatorError, match="`tc` not found"):
        emulate.check_environment()


# ---------------------------------------------------------------------------- root

@pytest.fixture(scope="module")
def trio():
    """Three hosts at half a core each; cleanup is checked after the module's tests."""
    if _why_not():
        pytest.skip(str(_why_not()))
    with emulate.Cluster(3, cpu=0.5, rate="20mbit") as cluster:
        yield cluster
    assert leftovers(cluster.run_id) == []


TCP_MESH = textwrap.dedent("""
    import socket, sys, threading, time
    ip, name, peers = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    srv = socket.create_server((ip, 7000))
    srv.settimeout(20)
    def serve():
        for _ in peers:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(name.encode() + b" got " + conn.makefile("rb").readline())
    server = threading.Thread(target=serve)
    server.start()
    for peer in peers:
        deadline = time.monotonic() + 15
        while True:  # the peer's server may not be listening yet
            try:
                sock = socket.create_connection((peer, 7000), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sock:
            sock.sendall(name.encode() + b"\\n")
            print(peer, sock.makefile("rb").readline().decode().strip(), flush=True)
    server.join()
""")


@as_root
def test_every_host_reaches_every_other_over_tcp(trio):
    procs = [trio.spawn(i, [PY, "-c", TCP_MESH, "{ip}", "{name}", "{peers}"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=40) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        lines = sorted(out.split("\n")[:-1])
        peers = [h for h in trio.hosts if h.index != i]
        assert lines == [f"{h.ip} {h.name} got node{i}" for h in peers]
    # Nothing can leave the cluster: a host has no default route.
    routes = subprocess.run(["ip", "-n", trio.hosts[0].netns, "route", "show", "default"],
                            capture_output=True, text=True).stdout
    assert routes.strip() == ""
    sent = trio.net_counters()
    assert all(sent[i]["tx_bytes"] > 0 and sent[i]["rx_bytes"] > 0 for i in range(3))


MDNS_ADVERTISE = textwrap.dedent("""
    import socket, sys
    from zeroconf import ServiceInfo, Zeroconf
    ip, instance = sys.argv[1], sys.argv[2]
    zc = Zeroconf()
    info = ServiceInfo("_stealertest._tcp.local.", instance + "._stealertest._tcp.local.",
                       addresses=[socket.inet_aton(ip)], port=7001, properties={"node": instance},
                       server=instance + ".local.")
    zc.register_service(info)
    print("registered", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    zc.unregister_service(info)
    zc.close()
""")

MDNS_BROWSE = textwrap.dedent("""
    import socket, sys, threading
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf
    want = sys.argv[1] + "._stealertest._tcp.local."
    found = threading.Event()
    def on_change(zeroconf, service_type, name, state_change):  # (zeroconf's keywords)
        if name == want and state_change is ServiceStateChange.Added:
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
            if info is not None:
                print(name, socket.inet_ntoa(info.addresses[0]), info.port, flush=True)
                found.set()
    zc = Zeroconf()
    ServiceBrowser(zc, "_stealertest._tcp.local.", handlers=[on_change])
    ok = found.wait(15)
    zc.close()
    sys.exit(0 if ok else 1)
""")


@as_root
def test_mdns_service_found_across_namespaces(trio):
    pytest.importorskip("zeroconf")
    name = f"emu-{trio.run_id}-node0"
    adv = trio.spawn(0, [PY, "-c", MDNS_ADVERTISE, "{ip}", name], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Browse from a host that starts before the service exists as well as after it.
        browse = trio.spawn(2, [PY, "-c", MDNS_BROWSE, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        assert "registered" in read_until(adv.stdout, "registered", 20)
        out, err = trio.spawn(1, [PY, "-c", MDNS_BROWSE, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True).communicate(timeout=30)
        assert out.split() == [f"{name}._stealertest._tcp.local.", trio.hosts[0].ip, "7001"], err
        out, err = browse.communicate(timeout=30)
        assert out.split()[1:] == [trio.hosts[0].ip, "7001"], err
    finally:
        adv.stdin.close()
        adv.wait(10)


BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass\n"


@as_root
def test_cpu_quota_holds_busy_loop_to_its_share():
    with emulate.Cluster(2, cpu=[0.2, 0.4], rate=None, memory="96M") as cluster:
        limit_file = "memory.limit_in_bytes" if cluster.cgroup_version == 1 else "memory.max"
        for h in cluster.hosts:
            assert int((cluster.cgroup_dir(h, "memory") / limit_file).read_text()) == 96 * 2**20
        before = [cluster.cpu_seconds(i) for i in range(2)]
        t0 = time.monotonic()
        procs = [cluster.spawn(i, [PY, "-c", BUSY]) for i in range(2)]
        ends = []
        for p in procs:
            assert p.wait(30) == 0
            ends.append(time.monotonic())
        shares = [(cluster.cpu_seconds(i) - before[i]) / (ends[i] - t0) for i in range(2)]
        # Generous bands: the machine is shared (a loaded machine can hold the 0.4 host
        # down to ~0.2), so a host may get less than its quota, but never much more.
        assert 0.1 <= shares[0] <= 0.3, shares
        assert 0.1 <= shares[1] <= 0.5, shares
        assert cluster.cpu_throttling(0)[0] > 0
    assert leftovers(cluster.run_id) == []


SINK = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], 7002))
    srv.settimeout(20)
    conn, _ = srv.accept()
    n = 0
    while chunk := conn.recv(65536):
        n += len(chunk)
    conn.sendall(str(n).encode())
    conn.close()
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    deadline = time.monotonic() + 15
    while True:
        try:
            sock = socket.create_connection((sys.argv[1], 7002), timeout=20)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    t0 = time.monotonic()
    sock.sendall(bytes(2_000_000))
    sock.shutdown(socket.SHUT_WR)
    n = sock.recv(100).decode()  # the sink answers once it has everything
    print(n, time.monotonic() - t0, flush=True)
""")


@as_root
def test_link_rate_limits_a_bulk_transfer():
    with emulate.Cluster(2, cpu=None, rate="8mbit") as cluster:
        sink = cluster.spawn(0, [PY, "-c", SINK, "{ip}"])
        r = cluster.run(1, [PY, "-c", SOURCE, cluster.hosts[0].ip], timeout=30)
        assert r.returncode == 0, r.stderr
        assert sink.wait(10) == 0
        n, elapsed = r.stdout.split()
        assert int(n) == 2_000_000
        # 2 MB at 8 Mbit/s is 2.0 s; unshaped it would take milliseconds.
        assert 1.5 <= float(elapsed) < 20, elapsed
        assert cluster.net_counters()[1]["tx_bytes"] >= 2_000_000
    assert leftovers(cluster.run_id) == []


@as_root
def test_teardown_after_child_crash_kills_escaped_grandchild():
    with emulate.Cluster(2, cpu=0.5) as cluster:
        rid = cluster.run_id
        assert leftovers(rid)  # the objects exist while the cluster runs
        # The child leaves a grandchild in a new session (out of its process group),
        # then crashes: only the cgroup still knows about the grandchild.
        child = cluster.spawn(0, ["sh", "-c", "setsid sleep 60 & echo $!; kill -SEGV $$"],
                              stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        assert child.wait(10) == -signal.SIGSEGV
        assert not gone(grandchild)
    assert leftovers(rid) == []
    assert gone(grandchild)


@as_root
def test_teardown_after_exception_in_with_block():
    with pytest.raises(RuntimeError, match="boom"):
        with emulate.Cluster(3, cpu=0.3) as cluster:
            sleeper = cluster.spawn(2, ["sleep", "60"])
            raise RuntimeError("boom")
    assert sleeper.returncode == -signal.SIGTERM
    assert leftovers(cluster.run_id) == []
    with pytest.raises(emulate.EmulatorError):
        cluster.spawn(0, ["true"])


def _start_cli(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start the CLI with two hosts that print `up` and sleep; return it and its run id."""
    cli = subprocess.Popen([PY, str(_TOOL), "--nodes", "2", *args, "--",
                            "sh", "-c", "echo up; exec sleep 60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = read_until(cli.stderr, "node1=", 20)
    assert "emulate: run " in err, err
    rid = err.split("emulate: run ", 1)[1].split(":", 1)[0]
    out = read_until(cli.stdout, "[node1] up", 20)
    out += read_until(cli.stdout, "[node0] up", 5) if "[node0] up" not in out else ""
    assert "[node0] up" in out and "[node1] up" in out, out
    return cli, rid


@as_root
def test_cli_sigterm_tears_down():
    cli, rid = _start_cli("--cpu", "0.2,0.3")
    state = json.loads((emulate.STATE_DIR / f"{rid}.json").read_text())
    assert state["pid"] == cli.pid
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 128 + signal.SIGTERM, err
    assert b"torn down" in err
    assert leftovers(rid) == []


@as_root
def test_cleanup_stale_removes_what_a_killed_owner_left():
    cli, rid = _start_cli("--rate", "none")
    state = json.loads((emulate.STATE_DIR / f"{rid}.json").read_text())
    sleepers = emulate._cgroup_procs(state["leaves"])
    assert sleepers
    cli.kill()  # no chance to clean up
    cli.communicate(timeout=10)
    assert leftovers(rid)  # namespaces, cgroups, state file all left behind
    # (Another run starting in parallel may clean it first: only the outcome is checked.)
    emulate.cleanup_stale()
    assert leftovers(rid) == []
    assert all(gone(pid) for pid in sleepers)
    assert rid not in emulate.cleanup_stale()  # nothing of it is left to find


@as_root
def test_cleanup_stale_spares_live_runs_and_removes_orphans():
    with emulate.Cluster(1, cpu=0.2, rate=None) as cluster:
        assert cluster.run_id not in emulate.cleanup_stale()
        assert leftovers(cluster.run_id)
    # A namespace with the emulator's naming but no state file: a crash between steps.
    orphan = "zz" + cluster.run_id[:4]
    subprocess.run(["ip", "netns", "add", f"se-{orphan}-h0"], check=True)
    try:
        emulate.cleanup_stale()
        assert leftovers(orphan) == []
    finally:
        subprocess.run(["ip", "netns", "delete", f"se-{orphan}-h0"], capture_output=True)
