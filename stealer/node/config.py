"""What a node is told and what it keeps per peer, task and run: :class:`NodeConfig` (its
command line), :class:`RuntimeLimits` (the runtime's timeouts), :class:`Peer`, :class:`Job`,
:class:`Stats`, the plan keys that name a plan on the wire, and the memory a node needs.

Plain data and pure functions: nothing here imports the rest of the node package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..codec import DEFAULT_JPEG_QUALITY, check_frame_codec
from ..config import DEFAULT_LIMITS, DEFAULT_SHARD_TIMING, Limits, ShardTiming
from ..errors import ProtocolError
from ..ftp.auto import tail_memory, tile_memory  # the auto planner counts memory the same way
from ..ftp.plan import Plan
from ..network import Network
from ..outputs.mqtt import MqttConfig
from ..outputs.video import VideoConfig
from ..scheduler import PeerLoad, TaskRef
from ..sources import FrameSource
from ..wire import Comm
from ..wire.messages import Status


MAX_IMAGE_SIDE = 1 << 14
"""Largest camera image side a peer may name for a tile's pixels (16384 px, past any camera):
the pixel rectangle is computed from it before the pixels are checked."""


@dataclass(frozen=True)
class RuntimeLimits:
    """Timeouts (seconds) of the runtime itself; transport limits live in :class:`Limits`."""

    lease: float = 30.0
    """A holder may keep a task this long before it is handed out again (a hung thief). Far
    above a tile's compute time on a Pi (~1 s) and a tail's (~10 s)."""
    steal_timeout: float = 2.0
    """Wait this long for a victim's answer before trying another victim."""
    strips_timeout: float = 2.0
    """Wait this long for reuse strips before running the tile's full variant instead."""
    gateway_wait: float = 60.0
    """A source waiting for a gateway says so this often (it waits as long as it takes)."""
    pending_results: int = 2
    """Results a node may have computed but not yet delivered to the gateway. The compute slot
    goes on with its next task while a result uploads (over Wi-Fi a tile's output and strips
    take about as long to send as to compute), and this bounds the memory that can pile up
    behind a slow link."""
    steal_batch: int = 2
    """Tiles a thief gets for one steal request when tasks are short and the victim's queue is
    deep (at least this many per node it knows): the extra ones follow the answer unasked, so
    a busy thief asks half as often, while every other node still finds work to steal."""
    short_task: float = 0.005
    """Tasks that compute in less than this (seconds, on average) are short: for them the
    hand-offs around a task (a steal round trip, the hand-over to the compute thread and back,
    0.2-0.8 ms) are a visible share, so nodes take them two at a time (``steal_batch``, and a
    second task queued behind the first). Longer tasks go one at a time: a second one would
    only wait, its lease ageing into a straggler's, while another node could run it (measured
    on 0.2-core emulated Pis: more speculative copies, fewer frames/s at 3 and 4 nodes)."""
    speed_sample: float = 2.0
    """Seconds of compute before a node's speed (FLOPs run / busy seconds) counts as measured
    and goes to its peers: over the first tasks, kernel warm-up and small tiles' overheads
    dominate the figure."""
    outputs_timeout: float = 30.0
    """Wait this long for the tile outputs a tail needs from the nodes that kept them (a few MB
    over a 20 Mbit/s link take a few seconds) before their tiles run again."""
    straggler_min: float = 0.25
    """An idle node copies a task only once its lease is this old (and twice the typical task
    time): below that, a copy would mostly duplicate work that is about to arrive."""


@dataclass
class NodeConfig:
    """Everything a node is told on its command line."""

    node_id: str
    host: str = "0.0.0.0"
    port: int = 0
    gateway: bool = False
    standby: bool = False  # may take over as gateway when the gateway dies
    sources: list[FrameSource] = field(default_factory=list)
    grid: tuple[int, int] = (5, 5)
    grid_auto: bool = False  # choose grid, scheme and frames in flight (stealer.ftp.auto); re-plan as peers come and go
    objective: str = "throughput"  # grid_auto: "throughput" or "latency"
    latency_budget: float | None = None  # grid_auto: seconds a frame may take (the most fps within it)
    link_rate: float = 20e6 / 8  # grid_auto: bytes/s assumed for every link (nothing measures it yet)
    node_speed: float | None = None  # grid_auto: FLOP/s assumed per node; None: this node's measured speed
    layers: int | None = None
    scheme: str = "quad"  # "none" = no reuse
    frames: int | None = None  # per source; None = unbounded
    fps: float | None = None
    max_inflight: int = 0  # frames per source in flight (back-pressure); 0: auto (see Source._inflight_limit)
    deadline: float | None = None  # seconds per frame; None: never drop anything
    slots: int = 1  # tasks computed at once; 0: this node computes nothing (a camera-only source)
    null_compute: bool = False  # benchmarks only: tasks "run" without kernels (runtime overhead)
    max_memory: int = 0  # bytes offered for tasks; 0 = unlimited
    policy: str = "steal"
    speculate: bool = True  # idle nodes run copies of stragglers (first result wins)
    direct_outputs: bool = True  # tile outputs stay where they were made; the tail's runner fetches them
    out: str | None = None
    metrics: tuple[str | None, int] | None = None  # --metrics: serve /metrics at (host or default, port)
    mqtt: MqttConfig | None = None  # --mqtt: the gateway (or a standby once it takes over) publishes results
    http: tuple[str | None, int] | None = None  # --http: serve the dashboard at (host or default, port)
    mjpeg: tuple[str | None, int] | None = None  # --mjpeg (gateway or standby): live annotated streams at (host, port)
    video: VideoConfig | None = None  # --video-out (gateway or standby): annotated frames to video files
    discovery: bool = True
    loopback: bool = False
    interfaces: list[str] | None = None
    peers: list[tuple[str, int]] = field(default_factory=list)
    thresh: float = 0.24
    nms: float = 0.45
    limits: Limits = DEFAULT_LIMITS
    runtime: RuntimeLimits = field(default_factory=RuntimeLimits)
    secret: bytes | None = field(default=None, repr=False)  # never in repr or logs
    authenticate_frames: bool = False
    frame_codec: str = "raw"  # how this node's frames travel to thieves (stealer.codec)
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # with frame_codec "jpeg": the frames' encoding quality
    shards: int = 0  # --shards K: the gateway places and gathers the tail's weighted layers as K shards
    coded: bool = False  # --coded: a parity shard per sharded layer (a late or lost shard is recovered)
    pipeline: int = 0  # --pipeline S: the tail's weighted layers whole in S stages on S nodes (shard mode, K = 1)
    weights_file: str | None = None  # shard mode: the darknet weights file shards are read from, by range
    shard_timing: ShardTiming = DEFAULT_SHARD_TIMING

    def __post_init__(self) -> None:
        check_frame_codec(self.frame_codec, self.jpeg_quality)


@dataclass
class Peer:
    node_id: str
    comm: Comm
    role: str
    max_memory: int
    dialer: str = ""  # node id of the side that opened the connection
    answering: int = 0  # its requests being answered in the background
    load: PeerLoad = field(default_factory=lambda: PeerLoad(0, 0))
    status: Status | None = None  # its last Status (the dashboard shows its counters)
    status_at: float = 0.0  # time.time() that Status came

    @property
    def is_gateway(self) -> bool:
        return self.role == "gateway"


@dataclass
class Job:
    """A task in hand: where its data is and who must hear of its lease."""

    ref: TaskRef
    plan_key: str
    data: np.ndarray | None  # frame (or frame region) for a tile, fused output for a tail
    img_w: int
    img_h: int
    victim: str  # node id whose queue leased it (ourselves for local work)
    partial: bool = False  # the input is only the reuse variant's region: no full fallback in hand
    # or, instead of ``data``, the camera pixels that network-input rectangle ``region`` is
    # letterboxed from, their top-left pixel at ``pixel_origin`` (y, x) of the image
    pixels: np.ndarray | None = None
    pixel_origin: tuple[int, int] = (0, 0)
    region: tuple[int, int, int, int] = (0, 0, 0, 0)
    # or, instead of ``pixels``, their encoding in a frame codec, decoded in the compute
    # thread: ``encoded_shape`` is what it must decode to, the region's pixels (zstd, png) or
    # the whole image that they are cropped from (jpeg)
    codec: str = "raw"
    encoded: np.ndarray | None = None
    encoded_shape: tuple[int, int, int] = (0, 0, 0)
    holders: dict[str, list[int]] | None = None  # who holds the strips it consumes, when known
    strips: dict[int, np.ndarray] | None = None  # strips it consumes that came with its grant
    prefetched: bool = False  # fetched while the slot computed the task before (its lease restarts)
    keep_output: bool = False  # a tile: keep its output for the tail's runner (its source's advice)
    granted_at: float = 0.0  # monotonic time its grant came (a prefetched task's wait is counted from it)


@dataclass
class Stats:
    tiles_run: int = 0
    tails_run: int = 0
    stolen: int = 0
    steal_failures: int = 0
    busy_seconds: float = 0.0
    reuse_fallbacks: int = 0
    small_grants: int = 0  # reuse tiles granted with only their reuse variant's frame region
    pixel_grants: int = 0  # tiles granted as camera pixels (uint8) rather than float32 input
    encoded_grants: int = 0  # of those, the ones whose pixels travelled in a frame codec (not raw)
    input_bytes_raw: int = 0  # bytes of the tile inputs granted, as raw pixels (or float32) would be
    input_bytes_sent: int = 0  # bytes of the same inputs as they were sent (encoded, or raw)
    region_refetches: int = 0  # reuse tiles shipped small whose strips were gone (full region fetched)
    strips_served: int = 0  # strip fetches this node answered from the strips it produced
    strips_granted: int = 0  # grants that carried reuse strips this node holds (no fetch needed)
    outputs_kept: int = 0  # tile outputs this node kept for their tail's runner (direct data paths)
    outputs_served: int = 0  # fetches of kept tile outputs this node answered
    outputs_fetched: int = 0  # tails this node ran on tile outputs it fetched from the nodes that kept them
    batch_grants: int = 0  # tiles sent unasked after a steal's answer (a deep queue, steal_batch)
    paired: int = 0  # tasks queued to the compute thread right behind another one
    speculative: int = 0
    duplicates_dropped: int = 0
    frames_done: int = 0
    requeued: int = 0
    lease_expiries: int = 0  # leases of this node's queue that ran out (their tasks queued again)
    peers_lost: int = 0  # connections to peers that ended (a peer left, died or was cut off)
    takeovers: int = 0
    frames_resent: int = 0
    frames_dropped: int = 0
    frames_partial: int = 0
    task_errors: int = 0
    whole_frames: int = 0  # 1x1 frames whose tile and tail ran here back to back (affinity)
    flops_run: int = 0  # FLOPs of the tasks this node computed (with busy_seconds: its speed)
    replans: int = 0  # grid auto: times this source switched plans as the cluster changed
    shard_tasks: int = 0  # shard mode: shard tasks this node computed
    shards_recovered: int = 0  # coordinator: shards recovered from their parity
    shard_reruns: int = 0  # coordinator: shards run again under a new placement (lost, no parity)
    shard_bytes: int = 0  # shard mode: bytes of shard weights this node holds now
    weights_bytes: int = 0  # shard mode: bytes of the fused block's weights this node holds (for tiles)


def plan_key(grid: tuple[int, int], layers: int, scheme: str) -> str:
    return f"{grid[0]}x{grid[1]}:{layers}:{scheme}"


def parse_plan_key(key: str) -> tuple[tuple[int, int], int, str]:
    try:
        grid, layers, scheme = key.split(":")
        rows, cols = grid.split("x")
        return (int(rows), int(cols)), int(layers), scheme
    except ValueError:
        raise ProtocolError(f"bad plan key {key!r}") from None


def memory_needs(net: Network, plan: Plan) -> tuple[int, int]:
    """Bytes a node needs to run tiles (fused weights + the largest task's working set) and, on
    top of that, to run tails too (the remaining layers' weights + a generous activation bound:
    a layer's input and output, a routed map, and the fused map the tail starts from)."""
    return tile_memory(plan), tail_memory(net.layers, plan)


def _fusable(net: Network) -> int:
    from ..ftp.plan import max_fused_layers

    return max_fused_layers(net.spec)  # any boundary: the tail reads every output of the block


def default_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0
