""":class:`NodeState`: every attribute of a node, set in one ``__init__``, and the few views of
that state every part reads (the plan cache, the source machine, the membership's role).

Each part of the shell (:mod:`.peers`, :mod:`.source`, :mod:`.victim`, :mod:`.thief`,
:mod:`.gateway`, :mod:`.kernels`) is a mixin subclassing :class:`NodeState`;
:class:`stealer.node.Node` combines them. The methods one part calls on another are declared
here for the type checker only (``if TYPE_CHECKING``): at run time they exist just once, in the
part that defines them, and mypy checks each definition against its declaration.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import numpy as np

from ..compute import ComputePool
from ..errors import ConfigError
from ..ftp.auto import CandidatePlan, Choice
from ..ftp.plan import Plan, default_layers, make_plan
from ..network import Network
from ..roles import gateway as gw_role
from ..roles.gateway import GatewayState
from ..roles.membership import MembershipState
from ..roles.source import SourceState, ToGateway
from ..roles.strips import KeptOutputs, StripCache
from ..roles.worker import WorkerPolicy
from ..scheduler import TaskRef, WorkQueue
from ..sources import Frame
from ..wire import ClusterKey, Hello
from ..wire.server import Server
from ..wire.messages import (FrameDone, FrameGo, FrameUnknown, FrameWait, Message, OutputsMissing, Preview, StealReply,
                             TailDone, TileAck, TileDone, TilesIn, TilesRedo)
from .shardstate import ShardRuntime
from .config import MAX_IMAGE_SIDE, Job, NodeConfig, Peer, Stats, _fusable, parse_plan_key, plan_key

if TYPE_CHECKING:  # imported where it starts: zeroconf is not loaded by nodes without discovery
    from ..discovery import Discovery
    from ..metrics import NodeMetrics  # nor prometheus_client and aiohttp by nodes without --metrics
    from ..outputs.mqtt import MqttPublisher  # nor paho by nodes without --mqtt
    from ..dashboard.server import Dashboard  # nor the dashboard by nodes without --http
    from ..dashboard.frames import FrameStore
    from ..outputs.mjpeg import MjpegServer  # nor aiohttp by nodes without --mjpeg
    from ..outputs.video import VideoOut  # nor OpenCV by nodes without --video-out

T = TypeVar("T")


class NodeState:
    """All of a node's attributes (see :class:`stealer.node.Node` for the parameters)."""

    def __init__(self, net: Network, config: NodeConfig,
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.net = net
        self.cfg = config
        self.id = config.node_id
        self.on_result = on_result
        self.on_event = on_event  # milestones for operators and benchmarks (first task, takeover)
        self.first_task_at: float | None = None
        most = _fusable(net)
        if config.layers is not None and config.layers > most:  # caught here, not when the first tail fails to run
            bad = net.layers[most] if most < len(net.layers) else None
            raise ConfigError(f"--layers {config.layers}: at most {most} leading layers of this model can be "
                              "fused" + (f" (layer {bad.index} is a {bad.kind}, which cannot be in a fused block)"
                                         if bad is not None else ""))
        if config.layers is not None and config.layers < 1:
            raise ConfigError(f"--layers {config.layers}: a fused block holds at least one layer")
        # unset: DeepThings' 16 for YOLOv2, the cost model's choice for DAG models (ftp.plan.default_layers)
        self.layers = config.layers or default_layers(net.spec, (1, 1) if config.grid_auto else config.grid,
                                                      config.scheme)
        # the plan this node's next frames are cut with (grid auto: the planner's latest choice;
        # a frame keeps the plan it was cut with, see SourceState)
        self._own_plan_key = plan_key(config.grid, self.layers, config.scheme)
        if config.grid_auto:  # until the planner runs at start: what it gives a lone node
            self._own_plan_key = plan_key((1, 1), self.layers, "none")
        self._auto_candidates: list[CandidatePlan] = []  # grid auto: every candidate's plan, made at start
        self._auto_choice: Choice | None = None  # grid auto: the latest choice
        # grid auto: the cluster the choice was made for (computing nodes, their speeds bucketed)
        self._planned_for: tuple[int, tuple[int, ...]] | None = None
        self._speed_told = 0.0  # the measured speed peers were last told in a Status
        self._model_flops = sum(l.flops for l in net.layers)
        # who is the gateway, elections and takeovers: decided by the pure membership machine
        self.membership = MembershipState(
            self.id, "gateway" if config.gateway else ("standby" if config.standby else "worker"))
        self.peers: dict[str, Peer] = {}
        self.queue = WorkQueue(self.id, config.runtime.lease, max_attempts=config.limits.max_task_attempts)
        self._source: SourceState | None = None  # made with this node's plan (see source)
        self.stats = Stats()
        # released results for an in-process reader, bounded: the oldest unread go first
        self.results: asyncio.Queue[dict[str, Any]] = asyncio.Queue(config.limits.max_unread_results)
        self._plans: dict[str, Plan] = {}
        self._pool = ComputePool(config.slots, name=f"compute-{self.id[:6]}")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work = asyncio.Event()
        self._gateway_seen = asyncio.Event()
        self._stopping = asyncio.Event()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._pending_from: dict[int, str] = {}  # request id -> the peer asked (``_request``)
        self._assigned: list[Job] = []  # tasks pushed to this node (policy "share")
        self._status_dirty = False
        self._last_status: tuple[int, int, int] | None = None
        self._server: Server | None = None
        self._discovery: Discovery | None = None
        self.metrics: NodeMetrics | None = None  # --metrics: its registry and /metrics server
        self.mqtt: MqttPublisher | None = None  # --mqtt (gateway or standby): publishes released results
        self.dashboard: Dashboard | None = None  # --http: the dashboard and its server
        self.frames: FrameStore | None = None  # --http, --mjpeg, --video-out: the latest annotated frames
        self.mjpeg: MjpegServer | None = None  # --mjpeg (gateway or standby): live annotated streams
        self.video: VideoOut | None = None  # --video-out (gateway or standby): annotated frames to files
        self._started_at = time.monotonic()
        self._link_bytes_closed = [0, 0]  # bytes in, out of connections already closed
        self._busy_marks: collections.deque[tuple[float, float]] = collections.deque(maxlen=6)  # (t, busy s)
        # frame previews (only while the gateway wants them): the frame of each source waiting
        # for its result to go out as a preview, when each source last sent one, and the
        # previews of each source being encoded and sent, in frame order (at most video_queue)
        self._preview_wait: dict[str, Frame] = {}
        self._preview_sent: dict[str, float] = {}
        self._preview_out: dict[str, collections.deque[Frame]] = {}
        self._connecting: set[str] = set()
        self._lease_timer: asyncio.TimerHandle | None = None
        self._null_cache: dict[tuple[str, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._steal_seconds: float | None = None  # smoothed, request to data in hand
        self._frame_freed = asyncio.Event()
        self._sources_done = asyncio.Event()
        # gateway state: decisions in the pure role machine, timers here
        self.gateway = GatewayState(self.id, self._plan, limits=config.limits, max_image_side=MAX_IMAGE_SIDE)
        self._deadline_timers: dict[tuple[str, int], asyncio.TimerHandle] = {}
        # reuse strips this node produced, served to dependent tiles peer to peer; the gateway
        # keeps only where each frame's strips are
        self._held = StripCache(max_bytes=config.limits.reuse_cache_bytes)
        # tile outputs this node made and keeps for the node that runs their frame's tail
        self._kept = KeptOutputs(config.limits.kept_output_bytes, config.limits.kept_output_seconds)
        self._key = ClusterKey.of(config.secret)  # derived once (scrypt), not per connection
        self._out_file = open(config.out, "a", buffering=1) if (config.out and config.gateway) else None
        self._closed = False
        self._tail_ok: bool | None = None
        self._draining = False
        self._running = 0  # tasks in hand: computing, or computed and not yet delivered
        self._idle_changed = asyncio.Event()
        self._delivery_slots = asyncio.Semaphore(config.runtime.pending_results)
        # --shards: shards held, and (gateway) their placement and the shard tasks out
        self.sharding = ShardRuntime() if config.shards else None
        self._handlers = self._handler_table()
        self.worker = WorkerPolicy(config.policy, config.speculate, config.runtime.short_task,
                                   config.runtime.steal_batch)

    if TYPE_CHECKING:
        # what the parts call on one another, declared for mypy (defined once, in the file named)

        # shell.py
        def hello(self) -> Hello: ...
        def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]: ...
        def _handler_table(self) -> dict[type[Message], Callable[[Peer | None, Any], Awaitable[None] | None]]: ...
        async def _dispatch(self, peer: Peer | None, msg: Message) -> None: ...
        def _dispatch_now(self, peer: Peer | None, msg: Message) -> Awaitable[None] | None: ...

        # peers.py
        def _event(self, event: dict[str, Any]) -> None: ...
        async def _to_gateway(self, msg: Message) -> None: ...
        async def _respond(self, peer: Peer, reply: Message | None, what: str) -> None: ...
        def _post(self, peer: Peer, msg: Message) -> None: ...
        async def _send_quietly(self, peer: Peer, msg: Message) -> None: ...
        def _notify(self, node_id: str, msg: TileAck | TilesIn | FrameDone | FrameWait | FrameGo | FrameUnknown
                    | TilesRedo) -> None: ...
        def _on_outputs_missing(self, peer: Peer | None, msg: OutputsMissing) -> None: ...
        async def _collect_outputs(self, job: Job) -> bool: ...
        def _work_changed(self) -> None: ...
        async def _report_loop(self) -> None: ...
        def _link_bytes(self) -> tuple[int, int]: ...
        def _busy_share(self) -> float: ...

        # source.py
        def _announce(self, actions: list[ToGateway]) -> None: ...
        def _replan(self) -> None: ...
        def _on_tiles_in(self, msg: TilesIn) -> None: ...
        def _on_tile_ack(self, msg: TileAck) -> None: ...
        def _source_frame_done(self, msg: FrameDone) -> None: ...

        # victim.py
        async def _grant_for(self, ref: TaskRef, request_id: int) -> StealReply | None: ...
        def _local_job(self, ref: TaskRef) -> Job | None: ...
        def _ready(self, ref: TaskRef) -> bool: ...
        def _near(self, node_id: str) -> Callable[[TaskRef], bool]: ...
        def _give_up_failed(self, reason: str) -> None: ...
        def _leases_changed(self) -> None: ...

        # thief.py
        def _short_tasks(self) -> bool: ...

        # gateway.py
        def _carry_out(self, actions: list[gw_role.Action]) -> None: ...
        def _on_tail_done(self, peer: Peer | None, msg: TailDone) -> None: ...

        # shards.py
        def _shards_changed(self) -> None: ...
        def _shards_peer_lost(self, node: str) -> None: ...
        def _start_sharded_tail(self, ref: TaskRef) -> None: ...
        def _close_shards(self) -> None: ...
        def _on_preview(self, peer: Peer | None, msg: Preview) -> None: ...

        # kernels.py
        async def _compute(self, fn: Callable[..., T], *args: Any) -> T: ...
        def _compute_tile(self, job: Job, borrowed: dict[int, np.ndarray] | None
                          ) -> tuple[TileDone, dict[int, np.ndarray]]: ...
        def _compute_tail(self, job: Job) -> TailDone: ...
        def _compute_whole(self, job: Job, borrowed: dict[int, np.ndarray] | None) -> TailDone: ...

    def _measured_speed(self) -> float:
        """FLOP/s over this node's own compute (FLOPs run / busy seconds), once it has computed
        for ``runtime.speed_sample`` seconds; 0 before."""
        if self.stats.busy_seconds >= self.cfg.runtime.speed_sample and self.stats.flops_run:
            return self.stats.flops_run / self.stats.busy_seconds
        return 0.0

    def _plan(self, key: str) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            grid, layers, scheme = parse_plan_key(key)
            plan = make_plan(self.net, grid, layers, scheme=scheme)
            self._plans[key] = plan
        return plan

    @property
    def source(self) -> SourceState:
        """This node's data-source machine (made at first use: it needs this node's plan)."""
        if self._source is None:
            self._source = SourceState(self.queue, self._own_plan_key, self._plan(self._own_plan_key),
                                       self.cfg.deadline or 0.0)
        return self._source

    @property
    def role(self) -> str:
        return self.membership.role

    @property
    def gateway_id(self) -> str | None:
        return self.membership.gateway_id

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def is_gateway(self) -> bool:
        return self.membership.is_gateway

    def _gateway(self) -> Peer | None:
        return self.peers.get(self.gateway_id) if self.gateway_id else None
