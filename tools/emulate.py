"""Emulate a shelf of Raspberry Pis on one Wi-Fi LAN, on one Linux machine.

Each emulated host is a network namespace with one veth link (``eth0``) to a bridge that
lives in a dedicated *switch* namespace, so the root namespace's links and routes are never
touched. Every host gets an address on a private subnet (default ``10.213.0.0/24``, host
``i`` at ``.i+1``), loopback up and a ``224.0.0.0/4`` route (there is no default route, and
without it a multicast ``sendto`` that does not set ``IP_MULTICAST_IF`` fails with
ENETUNREACH; python-zeroconf sets it, other code may not); the bridge has IGMP snooping
off, so every multicast group is flooded to every port as on a simple Wi-Fi network. Links are shaped with ``tc tbf`` on both ends of each veth (egress of the host
end is the host's upload, egress of the switch end its download). Each host's processes run
in their own CPU cgroup limited to a share of one core (``--cpu 0.2``: 20 ms per 100 ms
period), optionally with a memory limit.

Commands run inside a host through a tiny ``/bin/sh`` wrapper that writes its own pid to
the host's ``cgroup.procs`` files and then ``exec``\\ s ``ip netns exec NS …``, so the command
is inside the cgroup before it executes anything (no race), and every process it forks
stays there. Teardown kills whatever is in the cgroups and namespaces, removes the
cgroups and namespaces (the veths and the bridge go with them) and the run's state file.

Every name carries a random run id (``se-<rid>-h0``, ``se-<rid>-sw``, ``br-<rid>``,
``v<rid>h0``, ``stealer-emu-<rid>``); the state of each run is kept in
``/run/stealer-emu/<rid>.json`` with the owner's pid and start time, and
:func:`cleanup_stale` (called at every start, or ``--cleanup``) removes what runs whose
owner died left behind. The emulator sends nothing anywhere: all traffic stays between the
namespaces it created.

Not emulated: latency and loss (``netem`` is not available on the CI machine), and the
shared nature of a Wi-Fi channel (each link gets its own rate, hosts do not contend for one
medium).

Library use::

    with Cluster(nodes=3, cpu=0.2, rate="20mbit") as cluster:
        procs = [cluster.spawn(i, ["python", "-m", "stealer", "node", "--ip", "{ip}"])
                 for i in range(3)]
        ...
        print(cluster.snapshot())  # CPU seconds and bytes per host

Command line (as root)::

    python tools/emulate.py --nodes 3 --cpu 0.2 --rate 20mbit -- <command …>

Placeholders in the command, replaced per host: ``{host}`` (index), ``{name}`` (``node0``…),
``{ip}``, ``{peers}`` (comma-separated IPs of the other hosts), ``{nodes}``, ``{sources}``
(``--sources-per-node``), ``{cpu}`` (the host's share, empty if unlimited), ``{run}`` (run
id); only these exact words are replaced (other braces pass through), but they are replaced
everywhere, also inside a ``python -c`` script's f-strings. The same values are in the
environment as ``STEALER_EMU_HOST``, ``STEALER_EMU_NAME``,
``STEALER_EMU_IP``, ``STEALER_EMU_PEERS``, ``STEALER_EMU_NODES``, ``STEALER_EMU_SOURCES``,
``STEALER_EMU_CPU``, ``STEALER_EMU_RUN``. Without a command the default is
``python -m stealer node``; if the words after ``--`` start with an option (``-- --foo 1``)
they are appended to the default command.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

__all__ = [
    "Cluster",
    "EmulatorError",
    "Host",
    "HostStats",
    "check_environment",
    "cleanup_stale",
    "list_runs",
    "main",
    "parse_cpu",
    "parse_rate",
    "parse_size",
]

logger = logging.getLogger("stealer.emulate")

STATE_DIR: Final = Path("/run/stealer-emu")
NETNS_PREFIX: Final = "se-"
CGROUP_PREFIX: Final = "stealer-emu-"
CFS_PERIOD_US: Final = 100_000
DEFAULT_SUBNET: Final = "10.213.0.0/24"
DEFAULT_RATE: Final = "20mbit"
DEFAULT_CPU: Final = 0.2
HOST_IFACE: Final = "eth0"
_RUN_ID = re.compile(r"[0-9a-z]{1,8}")
_NETNS_NAME = re.compile(r"se-([0-9a-z]{1,8})-(?:sw|h[0-9]+)")
_CGROUP_NAME = re.compile(r"stealer-emu-([0-9a-z]{1,8})")
_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


def default_command() -> list[str]:
    """The command run on every host when none is given: ``python -m stealer node``."""
    return [sys.executable, "-m", "stealer", "node"]


class EmulatorError(RuntimeError):
    """The emulator cannot run here (not root, tool missing) or a setup step failed."""


# ---------------------------------------------------------------------------- parsing

_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(bit|bps)?", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_SCALE: Final = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_rate(text: str | int | None) -> int | None:
    """Parse a link rate in tc's units into bits per second.

    Parameters
    ----------
    text
        ``"20mbit"``, ``"500kbit"``, ``"1gbit"``, ``"2mbps"`` (tc's ``bps`` means *bytes*
        per second), a bare number (bits per second), or ``None`` / ``"none"`` / ``0`` for
        an unshaped link.

    Returns
    -------
    int or None
        Bits per second, or ``None`` when the link is not shaped.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none", "0")):
        return None
    if isinstance(text, int):
        return text if text > 0 else None
    m = _RATE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad rate {text!r} (expected e.g. 20mbit, 500kbit, 1gbit)")
    bits = float(m[1]) * _SCALE[m[2].lower()] * (8 if (m[3] or "").lower() == "bps" else 1)
    if bits < 8000:
        raise ValueError(f"rate {text!r} is below 8 kbit/s")
    return int(bits)


def parse_size(text: str | int | None) -> int | None:
    """Parse a memory size (``"512M"``, ``"1G"``, ``"65536"``; binary units) into bytes."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none")):
        return None
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 512M, 1G)")
    size = int(float(m[1]) * _BINARY[m[2].lower()])
    if size < 4 * 2**20:
        raise ValueError(f"memory limit {text!r} is below 4 MiB")
    return size


def parse_cpu(spec: str | float | Sequence[float | None] | None, nodes: int) -> list[float | None]:
    """Per-host CPU shares (fractions of one core) from a share, a list or a comma list.

    Parameters
    ----------
    spec
        ``0.2`` (all hosts), ``"0.4,0.4,0.2"`` / a sequence (one per host; a shorter list is
        repeated cyclically), or ``None`` / ``"none"`` for unlimited hosts.
    nodes
        Number of hosts.

    Returns
    -------
    list of float or None
        One share per host; ``None`` means no quota.
    """
    if spec is None:
        return [None] * nodes
    if isinstance(spec, str):
        items: list[float | None] = []
        for word in spec.split(","):
            word = word.strip().lower()
            items.append(None if word in ("none", "0", "") else float(word))
    elif isinstance(spec, (int, float)):
        items = [float(spec)]
    else:
        items = [None if s is None else float(s) for s in spec]
    if not items:
        raise ValueError("empty CPU share list")
    for s in items:
        # The kernel refuses quotas under 1 ms per period.
        if s is not None and not 0.01 <= s <= 64:
            raise ValueError(f"CPU share {s} out of range [0.01, 64] cores")
    return [items[i % len(items)] for i in range(nodes)]


# ---------------------------------------------------------------------------- environment

def _which(tool: str) -> str | None:
    # root's PATH on minimal images may lack the sbin directories where ip and tc live.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def check_environment(*, need_tc: bool = True) -> dict[str, str]:
    """Check that the emulator can run here; return the paths of ``ip`` and ``tc``.

    Raises
    ------
    EmulatorError
        Not root, not Linux, or ``ip`` (or ``tc`` when ``need_tc``) missing, with a message
        that says what to do.
    """
    if not sys.platform.startswith("linux"):
        raise EmulatorError("the cluster emulator needs Linux (network namespaces, cgroups)")
    if os.geteuid() != 0:
        raise EmulatorError("the cluster emulator needs root (network namespaces, cgroups); "
                            "run it with sudo")
    tools: dict[str, str] = {}
    for tool in ("ip", "tc") if need_tc else ("ip",):
        path = _which(tool)
        if path is None:
            raise EmulatorError(f"`{tool}` not found; install iproute2 (apt-get install iproute2)")
        tools[tool] = path
    if not Path("/bin/sh").exists():
        raise EmulatorError("/bin/sh not found (needed to place commands in their cgroup)")
    return tools


def _run(argv: Sequence[str], *, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a setup command; raise :class:`EmulatorError` with its stderr if it fails."""
    r = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise EmulatorError(f"`{shlex.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


# ---------------------------------------------------------------------------- cgroups

@dataclass(frozen=True, slots=True)
class _CgroupLayout:
    """Where this run's cgroups go: one parent directory per needed controller."""

    version: int
    parents: dict[str, Path]  # controller ("cpu", "cpuacct", "memory") -> parent dir


def _self_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller (key ``""`` for the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _v1_mounts() -> dict[str, tuple[Path, str]]:
    """v1 controller -> (mount point, hierarchy root of that mount) from mountinfo."""
    out: dict[str, tuple[Path, str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        for opt in rfields[2].split(","):
            out.setdefault(opt, (Path(fields[4]), fields[3]))
    return out


def _cgroup_layout(memory: bool) -> _CgroupLayout:
    """Find where to create cgroups: v2 if it has the cpu controller, else v1.

    v1 cgroups are created under this process's own cgroup in each hierarchy, so any limit
    the caller already lives under (a container, a CI job) still applies to the nodes.
    """
    controllers_file = _CGROUP_ROOT / "cgroup.controllers"
    if controllers_file.exists() and "cpu" in controllers_file.read_text().split():
        # v2: leaves may not sit under a cgroup with processes once controllers are
        # enabled in it, so the run goes directly under the root (exempt from that rule).
        wanted = ["cpu"] + (["memory"] if memory else [])
        available = controllers_file.read_text().split()
        for c in wanted:
            if c not in available:
                raise EmulatorError(f"cgroup v2 has no {c} controller")
        return _CgroupLayout(2, {c: _CGROUP_ROOT for c in ("cpu", "cpuacct", *wanted[1:])})
    mounts, mine = _v1_mounts(), _self_cgroups()
    parents: dict[str, Path] = {}
    for c in ("cpu", "cpuacct", "memory") if memory else ("cpu", "cpuacct"):
        if c not in mounts:
            if c == "cpuacct":
                continue  # accounting is optional; cpu_seconds() will say it is missing
            raise EmulatorError(f"no cgroup {c} controller mounted (need cgroup v1 {c} or v2)")
        mount, root = mounts[c]
        rel = mine.get(c, "/")
        if root != "/" and rel.startswith(root):
            rel = rel[len(root):]
        parents[c] = mount / rel.lstrip("/")
    return _CgroupLayout(1, parents)


def _cgroup_procs(dirs: Sequence[str | Path]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            pids.update(int(w) for w in Path(d, "cgroup.procs").read_text().split())
    return pids


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise EmulatorError(f"cannot write {value!r} to {path}: {e.strerror}") from e


# ---------------------------------------------------------------------------- state files

def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _owner_alive(state: Mapping[str, Any]) -> bool:
    info = _proc_start(int(state.get("pid", -1)))
    # A zombie owner is dead for our purpose; a different start time means pid reuse.
    return info is not None and info[0] not in "ZX" and info[1] == state.get("starttime", info[1])


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise stale cleanup with the creation of state files (see :func:`cleanup_stale`)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _list_netns(ip: str) -> list[str]:
    r = _run([ip, "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _netns_pids(ip: str, names: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for ns in names:
        r = _run([ip, "netns", "pids", ns], check=False)
        pids.update(int(w) for w in r.stdout.split() if w.isdigit())
    return pids


def _kill(pids: set[int], sig: int) -> None:
    me = os.getpid()
    for pid in pids:
        if pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _destroy(state: Mapping[str, Any], ip: str, reap: Any = None, timeout: float = 5.0) -> None:
    """Kill every process of a run, then remove its cgroups, namespaces and state file.

    Idempotent: whatever is already gone is skipped. ``reap`` (optional callable) collects
    our own exited children so they do not linger as zombies while we wait.
    """
    leaves = [Path(p) for p in state.get("leaves", [])]
    rundirs = [Path(p) for p in state.get("rundirs", [])]
    netns = list(state.get("netns", []))
    deadline = time.monotonic() + timeout
    while True:
        for leaf in leaves:  # v2 kills a whole cgroup in one write
            if (leaf / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.kill").write_text("1")
        pids = _cgroup_procs(leaves) | _netns_pids(ip, netns)
        pids.discard(os.getpid())
        if not pids:
            break
        _kill(pids, signal.SIGKILL)
        if reap is not None:
            reap()
        if time.monotonic() > deadline:
            logger.warning("run %s: processes %s survive SIGKILL", state.get("run_id"), sorted(pids))
            break
        time.sleep(0.02)
    if reap is not None:
        reap()
    for d in [*leaves, *rundirs]:  # leaves first: rmdir needs an empty cgroup
        for attempt in range(100):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 99:
                    logger.warning("cannot remove cgroup %s: %s", d, e.strerror)
                    break
                time.sleep(0.02)  # exiting tasks leave the cgroup asynchronously
    for ns in netns:  # hosts first, the switch last (deleting a veth end deletes its peer)
        r = _run([ip, "netns", "delete", ns], check=False)
        if r.returncode != 0 and "No such file" not in r.stderr:
            logger.warning("cannot delete namespace %s: %s", ns, r.stderr.strip())
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{state.get('run_id')}.json").unlink()


def list_runs() -> list[dict[str, Any]]:
    """The state records of all runs on this machine (live and dead), each with ``alive``."""
    runs = []
    for f in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(f.read_text())
            state["alive"] = _owner_alive(state)
            runs.append(state)
    return runs


def cleanup_stale() -> list[str]:
    """Remove what emulator runs whose owner process died left behind.

    Runs with a live owner are never touched. Also removes namespaces and cgroups that
    follow the emulator's naming but have no state file at all (a crash between steps).

    Returns
    -------
    list of str
        The run ids that were cleaned.
    """
    ip = check_environment(need_tc=False)["ip"]
    cleaned: list[str] = []
    with _state_lock():
        # List namespaces before state files: a run writes its state file (under this
        # lock) before creating anything, so a namespace seen here without a state file
        # read afterwards really is an orphan.
        namespaces = _list_netns(ip)
        states: dict[str, dict[str, Any]] = {}
        for f in STATE_DIR.glob("*.json"):
            try:
                states[f.stem] = json.loads(f.read_text())
            except (OSError, ValueError):
                # A torn write from a crashed owner; without the record only the name-based
                # orphan sweep below can help.
                if time.time() - f.stat().st_mtime > 60:
                    logger.warning("removing unreadable state file %s", f)
                    f.unlink(missing_ok=True)
        for rid, state in states.items():
            if not _owner_alive(state):
                logger.info("cleaning up run %s (owner pid %s is gone)", rid, state.get("pid"))
                _destroy(state, ip)
                cleaned.append(rid)
        orphans: dict[str, dict[str, list[str]]] = {}
        for ns in namespaces:
            m = _NETNS_NAME.fullmatch(ns)
            if m and m[1] not in states:
                orphans.setdefault(m[1], {"netns": [], "leaves": [], "rundirs": []})["netns"].append(ns)
        with contextlib.suppress(EmulatorError, OSError):
            for parent in set(_cgroup_layout(memory=True).parents.values()):
                for d in parent.glob(CGROUP_PREFIX + "*"):
                    m = _CGROUP_NAME.fullmatch(d.name)
                    if m and m[1] not in states and d.is_dir():
                        o = orphans.setdefault(m[1], {"netns": [], "leaves": [], "rundirs": []})
                        o["leaves"] += [str(p) for p in d.iterdir() if p.is_dir()]
                        o["rundirs"].append(str(d))
        for rid, o in orphans.items():
            logger.info("removing orphaned emulator objects of run %s", rid)
            o["netns"].sort(key=lambda n: n.endswith("-sw"))
            _destroy({"run_id": rid, **o}, ip)
            cleaned.append(rid)
    return cleaned


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot strand objects."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- cluster

@dataclass(frozen=True, slots=True)
class Host:
    """One emulated host.

    Attributes
    ----------
    index
        Position in the cluster (0-based).
    name
        ``node<index>``.
    ip
        IPv4 address on the cluster subnet.
    netns
        Network namespace name (``ip netns exec <netns> …``).
    port
        The switch-side end of the host's veth (in the switch namespace).
    iface
        The host-side interface name (``eth0``).
    cpu
        Share of one core (``None``: unlimited).
    rate
        Link rate in bits per second each way (``None``: unshaped).
    """

    index: int
    name: str
    ip: str
    netns: str
    port: str
    iface: str
    cpu: float | None
    rate: int | None


@dataclass(frozen=True, slots=True)
class HostStats:
    """Resource use of one host since the cluster started.

    Attributes
    ----------
    cpu_seconds
        CPU time of all processes in the host's cgroup (``nan`` without accounting).
    throttled_seconds, nr_throttled
        Time the host's processes were held back by the CPU quota, and in how many periods.
    tx_bytes, rx_bytes, tx_packets, rx_packets
        Traffic sent and received by the host on its link (counted at the switch port).
    """

    host: int
    name: str
    ip: str
    cpu_seconds: float
    throttled_seconds: float
    nr_throttled: int
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


class Cluster:
    """A cluster of emulated hosts: namespaces on one bridge, CPU cgroups, shaped links.

    Parameters
    ----------
    nodes
        Number of hosts (1–250).
    cpu
        Share of one core per host (``0.2`` = 20 ms per 100 ms), a sequence / comma list for
        a heterogeneous cluster, or ``None`` for unlimited hosts. See :func:`parse_cpu`.
    rate
        Link rate each way (``"20mbit"``, Wi-Fi class), a sequence of rates (one per host,
        repeated cyclically), or ``None`` for unshaped links. See :func:`parse_rate`.
    memory
        Optional memory limit per host (``"512M"``).
    subnet
        The cluster's IPv4 subnet; each run has its own isolated switch, so parallel runs
        may use the same subnet.
    sources_per_node
        Passed to commands as ``{sources}`` / ``STEALER_EMU_SOURCES`` (how many image
        sources each node should run).
    run_id
        Fixed run id (``[0-9a-z]{1,8}``); random by default.
    cpu_margin
        Warn when the hosts' total share exceeds the machine's cores minus this margin.
    term_grace
        Seconds between SIGTERM and SIGKILL at teardown.
    clean_stale
        Call :func:`cleanup_stale` on start.

    Notes
    -----
    Use as a context manager, or call :meth:`start` and :meth:`close` (also run at
    interpreter exit). Signals are not handled here: a program that wants SIGTERM to tear
    the cluster down should turn it into an exception (the CLI does). If the owner is
    killed outright, the next start (or ``--cleanup``) removes the leftovers.
    """

    def __init__(
        self,
        nodes: int = 3,
        cpu: float | str | Sequence[float | None] | None = DEFAULT_CPU,
        rate: str | int | Sequence[str | int | None] | None = DEFAULT_RATE,
        *,
        memory: str | int | None = None,
        subnet: str = DEFAULT_SUBNET,
        sources_per_node: int = 1,
        run_id: str | None = None,
        cpu_margin: float = 0.5,
        term_grace: float = 3.0,
        clean_stale: bool = True,
    ) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be in 1..250, got {nodes}")
        net = ipaddress.ip_network(subnet)
        if not isinstance(net, ipaddress.IPv4Network) or net.num_addresses - 2 < nodes:
            raise ValueError(f"subnet {subnet} cannot hold {nodes} hosts")
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id must match {_RUN_ID.pattern}, got {run_id!r}")
        shares = parse_cpu(cpu, nodes)
        rate_list: list[Any] = list(rate) if isinstance(rate, (list, tuple)) else [rate]
        rates = [parse_rate(rate_list[i % len(rate_list)]) for i in range(nodes)]
        self._memory = parse_size(memory)
        self._net = net
        self._sources = sources_per_node
        self._fixed_id = run_id is not None
        self._rid = run_id or secrets.token_hex(3)
        self._cpu_margin = cpu_margin
        self._grace = term_grace
        self._clean_stale = clean_stale
        self._shares, self._rates = shares, rates
        self._hosts = self._make_hosts()
        self._layout: _CgroupLayout | None = None
        self._leaves: list[list[Path]] = []
        self._state: dict[str, Any] = {}
        self._tools: dict[str, str] = {}
        self._procs: list[tuple[int, subprocess.Popen[Any]]] = []
        self._lock = threading.Lock()
        self._started = self._closed = False

    def _make_hosts(self) -> list[Host]:
        addrs = list(self._net.hosts())
        return [Host(i, f"node{i}", str(addrs[i]), f"{NETNS_PREFIX}{self._rid}-h{i}", f"v{self._rid}h{i}",
                     HOST_IFACE, self._shares[i], self._rates[i]) for i in range(len(self._shares))]

    # -- properties -----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run id that every object of this cluster carries in its name."""
        return self._rid

    @property
    def hosts(self) -> list[Host]:
        """The hosts, in index order."""
        return list(self._hosts)

    @property
    def switch_netns(self) -> str:
        """The namespace holding the bridge and the switch-side veth ends."""
        return f"{NETNS_PREFIX}{self._rid}-sw"

    @property
    def bridge(self) -> str:
        """The bridge's name (inside :attr:`switch_netns`)."""
        return f"br-{self._rid}"

    @property
    def netns_names(self) -> list[str]:
        """All namespaces of this run (hosts first, switch last)."""
        return [h.netns for h in self._hosts] + [self.switch_netns]

    @property
    def cgroup_dirs(self) -> list[Path]:
        """All cgroup directories of this run (host leaves first); empty before start."""
        return [Path(p) for p in self._state.get("leaves", []) + self._state.get("rundirs", [])]

    @property
    def processes(self) -> list[tuple[int, subprocess.Popen[Any]]]:
        """(host index, process) for every command spawned so far."""
        with self._lock:
            return list(self._procs)

    def __repr__(self) -> str:
        return f"Cluster(run_id={self._rid!r}, nodes={len(self._hosts)}, started={self._started})"

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> Cluster:
        """Create the namespaces, bridge, links, qdiscs and cgroups.

        Returns
        -------
        Cluster
            ``self``.

        Raises
        ------
        EmulatorError
            Not root, a tool missing, or a setup step failed (everything created so far is
            removed before raising).
        """
        if self._closed:
            raise EmulatorError("a closed Cluster cannot be restarted; make a new one")
        if self._started:
            return self
        self._tools = check_environment(need_tc=any(r is not None for r in self._rates))
        if self._clean_stale:
            cleaned = cleanup_stale()
            if cleaned:
                logger.info("removed leftovers of dead runs %s", ", ".join(cleaned))
        self._layout = _cgroup_layout(memory=self._memory is not None)
        self._write_state()
        self._started = True
        atexit.register(self.close)
        try:
            self._setup_cgroups()
            self._setup_network()
        except BaseException:
            self.close()
            raise
        self._warn_cpu()
        logger.info("cluster %s up: %s", self._rid, ", ".join(f"{h.name}={h.ip}" for h in self._hosts))
        return self

    def _write_state(self) -> None:
        """Record every object this run may create before creating any (crash safety)."""
        assert self._layout is not None
        info = _proc_start(os.getpid())
        while True:
            rundirs = sorted({str(p / f"{CGROUP_PREFIX}{self._rid}") for p in self._layout.parents.values()})
            self._leaves = [[Path(d, f"h{h.index}") for d in rundirs] for h in self._hosts]
            self._state = {
                "run_id": self._rid, "pid": os.getpid(), "starttime": info[1] if info else None,
                "created": time.time(), "argv": sys.argv, "netns": self.netns_names,
                "leaves": [str(p) for ls in self._leaves for p in ls], "rundirs": rundirs,
            }
            with _state_lock():
                try:
                    with open(STATE_DIR / f"{self._rid}.json", "x") as f:
                        json.dump(self._state, f)
                    return
                except FileExistsError:
                    if self._fixed_id:
                        raise EmulatorError(f"run id {self._rid} is in use") from None
            self._rid = secrets.token_hex(3)
            self._hosts = self._make_hosts()

    def _setup_cgroups(self) -> None:
        assert self._layout is not None
        layout = self._layout
        for d in self._state["rundirs"]:
            Path(d).mkdir()
            if layout.version == 2:
                # Controllers must be enabled top-down for the leaves to get cpu.max etc.
                ctl = " ".join("+" + c for c in sorted(set(layout.parents) - {"cpuacct"}))
                for parent in (Path(d).parent, Path(d)):
                    for word in ctl.split():
                        _write(parent / "cgroup.subtree_control", word)
        for h, leaves in zip(self._hosts, self._leaves):
            for leaf in leaves:
                leaf.mkdir()
            cpu_dir = self._dir_for("cpu", h.index)
            if layout.version == 1:
                _write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(cpu_dir / "cpu.cfs_quota_us",
                       "-1" if h.cpu is None else str(round(h.cpu * CFS_PERIOD_US)))
            else:
                _write(cpu_dir / "cpu.max",
                       f"{'max' if h.cpu is None else round(h.cpu * CFS_PERIOD_US)} {CFS_PERIOD_US}")
            if self._memory is not None:
                mem_dir = self._dir_for("memory", h.index)
                if layout.version == 1:
                    _write(mem_dir / "memory.limit_in_bytes", str(self._memory))
                    # Without a memsw limit a host could swap past its limit (only when
                    # swap accounting is on, hence optional).
                    with contextlib.suppress(OSError):
                        (mem_dir / "memory.memsw.limit_in_bytes").write_text(str(self._memory))
                else:
                    _write(mem_dir / "memory.max", str(self._memory))
                    with contextlib.suppress(OSError):
                        (mem_dir / "memory.swap.max").write_text("0")

    @property
    def cgroup_version(self) -> int:
        """1 or 2: which cgroup interface this run uses (known once started)."""
        if self._layout is None:
            raise EmulatorError("the cluster is not started")
        return self._layout.version

    def cgroup_dir(self, host: int | Host, controller: str = "cpu") -> Path:
        """The directory of ``host``'s cgroup for ``controller`` (``cpu``, ``cpuacct``,
        ``memory``); under cgroup v2 all three are the same directory."""
        return self._dir_for(controller, self._host(host).index)

    def _dir_for(self, controller: str, host: int) -> Path:
        """The host's cgroup directory in the hierarchy holding ``controller``."""
        assert self._layout is not None
        parent = self._layout.parents.get(controller)
        if parent is None:
            raise EmulatorError(f"no {controller} cgroup controller on this machine")
        return parent / f"{CGROUP_PREFIX}{self._rid}" / f"h{host}"

    def _setup_network(self) -> None:
        ip, sw = self._tools["ip"], self.switch_netns
        _run([ip, "netns", "add", sw])
        _run([ip, "-n", sw, "link", "set", "lo", "up"])
        # IGMP snooping off: with it the bridge prunes groups outside 224.0.0.0/24 to ports
        # it has seen join; flood everything, as a simple Wi-Fi network does.
        _run([ip, "-n", sw, "link", "add", self.bridge, "type", "bridge", "stp_state", "0",
              "forward_delay", "0", "mcast_snooping", "0"])
        _run([ip, "-n", sw, "link", "set", self.bridge, "up"])
        prefix = self._net.prefixlen
        for h in self._hosts:
            _run([ip, "netns", "add", h.netns])
            # Create the pair inside the switch namespace with the peer moved straight into
            # the host: the root namespace never sees either end, so no name clashes there.
            _run([ip, "-n", sw, "link", "add", h.port, "type", "veth", "peer", "name", h.iface,
                  "netns", h.netns])
            _run([ip, "-n", sw, "link", "set", h.port, "master", self.bridge, "up"])
            batch = "\n".join([
                "link set lo up",
                f"addr add {h.ip}/{prefix} dev {h.iface}",
                f"link set {h.iface} up",
                # No default route (nothing may leave the cluster), but multicast sends need
                # a route or they fail with ENETUNREACH.
                f"route add 224.0.0.0/4 dev {h.iface}",
            ]) + "\n"
            _run([ip, "-n", h.netns, "-batch", "-"], input=batch)
            if h.rate is not None:
                for ns, dev in ((h.netns, h.iface), (sw, h.port)):
                    _run([self._tools["tc"], "-n", ns, "qdisc", "replace", "dev", dev, "root",
                          *self._tbf_args(h.rate)])

    @staticmethod
    def _tbf_args(bits: int) -> list[str]:
        """tbf parameters for a rate: a burst of ~5 ms of traffic (at least 4 full frames,
        since tbf drops packets larger than its bucket), a queue of ~100 ms."""
        burst = max(bits // 8 // 200, 4 * 1514)
        return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "100ms"]

    def _warn_cpu(self) -> None:
        cores = len(os.sched_getaffinity(0))
        limited = [s for s in self._shares if s is not None]
        total = sum(limited)
        if len(limited) < len(self._shares):
            logger.warning("%d host(s) have no CPU quota: they compete for the machine's %d cores",
                           len(self._shares) - len(limited), cores)
        elif total > cores - self._cpu_margin:
            logger.warning("hosts' CPU shares total %.2f cores on a %d-core machine (margin %.2f): "
                           "nodes will compete and quotas will not hold", total, cores, self._cpu_margin)

    def close(self) -> None:
        """Stop every process, remove namespaces, bridge, veths, cgroups and the state file.

        Safe to call more than once and on a partially started cluster.
        """
        with self._lock:  # no spawn() may slip in once teardown has begun
            if not self._started or self._closed:
                self._closed = True
                return
            self._closed = True
        with _signals_deferred():
            try:
                self.terminate(self._grace)
            except Exception:  # teardown must go on whatever happened
                logger.exception("stopping processes of run %s failed", self._rid)
            finally:
                _destroy(self._state, self._tools.get("ip", "ip"), reap=self._reap)
                with self._lock:
                    procs = [p for _, p in self._procs]
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=2)
                atexit.unregister(self.close)
        logger.info("cluster %s torn down", self._rid)

    def _reap(self) -> None:
        with self._lock:
            procs = [p for _, p in self._procs]
        for p in procs:
            p.poll()

    def _host(self, host: int | Host) -> Host:
        if not self._started or self._closed:
            raise EmulatorError("the cluster is not running (use `with Cluster(...)` or start())")
        i = host.index if isinstance(host, Host) else host
        if not 0 <= i < len(self._hosts):
            raise IndexError(f"host {i} out of range 0..{len(self._hosts) - 1}")
        return self._hosts[i]

    # -- running commands -------------------------------------------------------------

    def values(self, host: int) -> dict[str, str]:
        """The per-host template values (``{host}``, ``{ip}``, …) of ``host``."""
        h = self._hosts[host]
        return {
            "host": str(h.index), "name": h.name, "ip": h.ip,
            "peers": ",".join(o.ip for o in self._hosts if o.index != h.index),
            "nodes": str(len(self._hosts)), "sources": str(self._sources),
            "cpu": "" if h.cpu is None else f"{h.cpu:g}", "run": self._rid,
        }

    def substitute(self, host: int, argv: Sequence[str]) -> list[str]:
        """Replace ``{host}``, ``{ip}``, ``{name}``, … in each word of ``argv``.

        Only these exact placeholders are replaced, so other braces (``python -c "d = {}"``)
        pass through untouched.
        """
        values = self.values(host)
        out = []
        for word in argv:
            for key, value in values.items():
                word = word.replace("{" + key + "}", value)
            out.append(word)
        return out

    def environment(self, host: int) -> dict[str, str]:
        """The ``STEALER_EMU_*`` variables set for commands on ``host``."""
        return {f"STEALER_EMU_{k.upper()}": v for k, v in self.values(host).items()}

    def command(self, host: int | Host, argv: Sequence[str]) -> list[str]:
        """The full argv that runs ``argv`` on ``host`` (in its cgroup and namespace).

        The ``/bin/sh`` wrapper puts itself in the cgroup, then ``exec``\\ s ``ip netns exec``,
        which ``exec``\\ s the command: one pid throughout, placed before the command starts.
        Joining the cgroup must come before ``ip netns exec``, which remounts ``/sys`` (and
        so hides ``/sys/fs/cgroup``) in the child.
        """
        h = self._host(host)
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of words, not a string")
        script = "".join(f"echo $$ > {shlex.quote(str(leaf / 'cgroup.procs'))} || exit 125\n"
                         for leaf in self._leaves[h.index])
        return ["/bin/sh", "-c", script + 'exec "$@"', "stealer-emu",
                self._tools["ip"], "netns", "exec", h.netns, *argv]

    def spawn(
        self,
        host: int | Host,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        text: bool = False,
        substitute: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` on ``host``; placeholders are substituted first.

        Parameters
        ----------
        host
            Host index (or :class:`Host`).
        argv
            The command; ``{host}``, ``{ip}``, ``{name}``, ``{peers}``, ``{nodes}``,
            ``{sources}``, ``{cpu}``, ``{run}`` are replaced per host.
        env
            Environment (default: this process's); ``STEALER_EMU_*`` are added.
        stdin, stdout, stderr, cwd, text
            As for :class:`subprocess.Popen`; stdin defaults to ``/dev/null`` because the
            command runs in its own session, away from the terminal.
        substitute
            Replace placeholders (default). Every word is scanned, including the code of a
            ``python -c`` script, where an f-string like ``f"{name}"`` would be replaced
            too: pass values as arguments or turn substitution off.

        Returns
        -------
        subprocess.Popen
            The process; it leads its own process group, which teardown signals.
        """
        h = self._host(host)
        full = self.command(h, self.substitute(h.index, argv) if substitute else list(argv))
        child_env = dict(os.environ if env is None else env)
        child_env.update(self.environment(h.index))
        with self._lock:
            if self._closed:
                raise EmulatorError("the cluster is closed")
            p = subprocess.Popen(full, env=child_env, stdin=stdin, stdout=stdout, stderr=stderr,
                                 cwd=cwd, text=text, start_new_session=True)
            self._procs.append((h.index, p))
        logger.debug("%s: started pid %d: %s", h.name, p.pid, shlex.join(argv))
        return p

    def run(
        self,
        host: int | Host,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        input: str | bytes | None = None,
        text: bool = True,
        env: Mapping[str, str] | None = None,
        substitute: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` on ``host`` to completion and capture its output (see :meth:`spawn`).

        On timeout the command's process group is killed and
        :class:`subprocess.TimeoutExpired` is raised.
        """
        p = self.spawn(host, argv, env=env, text=text, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                       substitute=substitute)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Wait for every spawned process; return their exit codes in spawn order.

        A code is ``None`` for a process still running when ``timeout`` ran out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = []
        for _, p in self.processes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                codes.append(p.wait(left))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM every spawned process group and every process in the hosts' cgroups,
        then SIGKILL what is left after ``grace`` seconds."""
        leaves = [p for ls in self._leaves for p in ls]
        live = [p for _, p in self.processes if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        # Also processes that left their group (daemons that setsid) but not their cgroup.
        _kill(_cgroup_procs(leaves), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap()
            if all(p.poll() is not None for p in live) and not _cgroup_procs(leaves):
                return
            time.sleep(0.02)
        for p in live:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        _kill(_cgroup_procs(leaves), signal.SIGKILL)
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)

    # -- measurements -----------------------------------------------------------------

    def cpu_seconds(self, host: int | Host) -> float:
        """CPU time (user + system) used by everything that ran in ``host``'s cgroup.

        Read from ``cpuacct.usage`` (cgroup v1) or ``cpu.stat``'s ``usage_usec`` (v2).
        """
        h = self._host(host)
        assert self._layout is not None
        if self._layout.version == 2:
            return self._cpu_stat(h.index).get("usage_usec", 0) / 1e6
        return int((self._dir_for("cpuacct", h.index) / "cpuacct.usage").read_text()) / 1e9

    def _cpu_stat(self, host: int) -> dict[str, int]:
        text = (self._dir_for("cpu", host) / "cpu.stat").read_text()
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}

    def cpu_throttling(self, host: int | Host) -> tuple[int, float]:
        """(periods throttled, seconds throttled) of ``host`` by its CPU quota."""
        h = self._host(host)
        stat = self._cpu_stat(h.index)
        if "throttled_usec" in stat:  # v2
            return stat.get("nr_throttled", 0), stat["throttled_usec"] / 1e6
        return stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9

    def net_counters(self) -> dict[int, dict[str, int]]:
        """Traffic per host: ``tx_bytes``, ``rx_bytes``, ``tx_packets``, ``rx_packets``.

        Counted on the switch-side veth ends (in one ``ip -s -j link`` call), so what a port
        receives is what its host sent.
        """
        if not self._started or self._closed:
            raise EmulatorError("the cluster is not running")
        r = _run([self._tools["ip"], "-n", self.switch_netns, "-s", "-j", "link", "show"])
        by_port = {link["ifname"]: link for link in json.loads(r.stdout)}
        out: dict[int, dict[str, int]] = {}
        for h in self._hosts:
            stats = by_port[h.port].get("stats64") or by_port[h.port]["stats"]
            out[h.index] = {"tx_bytes": stats["rx"]["bytes"], "rx_bytes": stats["tx"]["bytes"],
                            "tx_packets": stats["rx"]["packets"], "rx_packets": stats["tx"]["packets"]}
        return out

    def snapshot(self) -> list[HostStats]:
        """CPU and traffic counters of every host now (take two and subtract for a span)."""
        net = self.net_counters()
        out = []
        for h in self._hosts:
            try:
                cpu = self.cpu_seconds(h.index)
            except (EmulatorError, OSError):
                cpu = float("nan")
            nr, throttled = self.cpu_throttling(h.index)
            out.append(HostStats(h.index, h.name, h.ip, cpu, throttled, nr, **net[h.index]))
        return out


# ---------------------------------------------------------------------------- CLI

class _Terminated(Exception):
    """SIGTERM / SIGHUP turned into an exception so that teardown runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _pump(stream: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
    """Copy a child's output to our stdout line by line, each line prefixed by its host."""
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    stream.close()


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/emulate.py",
        description="Run a command on every host of an emulated Raspberry Pi cluster (network "
                    "namespaces on one bridge, CPU cgroups, shaped links). Needs root.",
        epilog="Everything after `--` is the command (default: python -m stealer node; words that "
               "start with `-` are appended to the default). Placeholders: {host} {name} {ip} {peers} "
               "{nodes} {sources} {cpu} {run}; also in the environment as STEALER_EMU_*.")
    p.add_argument("--nodes", type=int, default=3, help="number of hosts (default 3)")
    p.add_argument("--cpu", default=str(DEFAULT_CPU),
                   help="share of one core per host, or a comma list per host; 'none' = unlimited "
                        f"(default {DEFAULT_CPU})")
    p.add_argument("--rate", default=DEFAULT_RATE,
                   help=f"link rate each way, tc units, or a comma list; 'none' = unshaped "
                        f"(default {DEFAULT_RATE})")
    p.add_argument("--memory", default=None, help="memory limit per host, e.g. 512M (default none)")
    p.add_argument("--sources-per-node", type=int, default=1, help="value of {sources} (default 1)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"cluster subnet (default {DEFAULT_SUBNET})")
    p.add_argument("--duration", type=float, default=None,
                   help="stop the hosts after this many seconds (default: wait for all commands)")
    p.add_argument("--grace", type=float, default=3.0, help="seconds from SIGTERM to SIGKILL (default 3)")
    p.add_argument("--stats", default=None, metavar="FILE",
                   help="write per-host CPU seconds and bytes as JSON at the end")
    p.add_argument("--cleanup", action="store_true", help="remove leftovers of dead runs and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log setup and teardown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (first failing command's, else 0)."""
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1:]
    args = _build_parser().parse_args(words)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="emulate: %(levelname)s: %(message)s")
    if not command or command[0].startswith("-"):
        command = default_command() + command
    try:
        if args.cleanup:
            cleaned = cleanup_stale()
            print(f"emulate: cleaned {len(cleaned)} run(s) {' '.join(cleaned)}".rstrip(), file=sys.stderr)
            return 0
        rates: list[str | int | None] = list(args.rate.split(","))
        cluster = Cluster(args.nodes, args.cpu, rates, memory=args.memory, subnet=args.subnet,
                          sources_per_node=args.sources_per_node, term_grace=args.grace)
    except (EmulatorError, ValueError) as e:
        print(f"emulate: error: {e}", file=sys.stderr)
        return 2
    handlers = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    pumps: list[threading.Thread] = []
    status = 0
    try:
        with cluster:
            print(f"emulate: run {cluster.run_id}: " + ", ".join(
                f"{h.name}={h.ip} cpu={h.cpu if h.cpu is not None else 'unlimited'}" for h in cluster.hosts),
                file=sys.stderr, flush=True)
            lock = threading.Lock()
            procs = []
            for h in cluster.hosts:
                p = cluster.spawn(h.index, command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                procs.append(p)
                t = threading.Thread(target=_pump, args=(p.stdout, f"[{h.name}] ".encode(), lock),
                                     daemon=True)
                t.start()
                pumps.append(t)
            codes = cluster.wait(args.duration)
            if any(c is None for c in codes):
                logger.info("duration over: stopping the hosts")
                cluster.terminate(args.grace)
            failed = [c for c in codes if c not in (None, 0)]
            status = (128 - failed[0] if failed[0] < 0 else failed[0]) if failed else 0
            stats = cluster.snapshot()
            for s in stats:
                print(f"emulate: {s.name} cpu {s.cpu_seconds:.2f} s (throttled {s.throttled_seconds:.2f} s), "
                      f"sent {s.tx_bytes} B, received {s.rx_bytes} B", file=sys.stderr)
            if args.stats:
                Path(args.stats).write_text(json.dumps([asdict(s) for s in stats], indent=2) + "\n")
    except KeyboardInterrupt:
        print("emulate: interrupted, cluster torn down", file=sys.stderr)
        status = 130
    except _Terminated as e:
        print(f"emulate: {e}, cluster torn down", file=sys.stderr)
        status = 128 + e.signum
    except EmulatorError as e:
        print(f"emulate: error: {e}", file=sys.stderr)
        status = 2
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for t in pumps:
            t.join(timeout=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
