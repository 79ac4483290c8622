"""What a node keeps for sharded tail layers (``--shards K``): plain data, made once in
:class:`stealer.node.state.NodeState`, used by :mod:`stealer.node.shards`.

Holder side: the weights it holds, by ``(layer, start, stop, parity)``, and the placement epoch
they are for. Coordinator side: the placement machine, the shard tasks out, the thread that
runs the tails' layers without weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..placement import Placement
from ..roles.shards import LayerRound, ShardPlacer

HoldKey = tuple[int, int, int, bool]  # layer, start, stop, parity


@dataclass
class PendingShard:
    """A shard task out to a peer: the round it belongs to and where its output goes."""

    round: LayerRound
    job: int
    outs: dict[int, np.ndarray]
    reasons: dict[int, str]
    wake: asyncio.Event


@dataclass
class ShardRuntime:
    # holder side
    held: dict[HoldKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    epoch: int = 0  # of the holdings
    lock: asyncio.Lock | None = None  # made on the loop; one assignment read at a time
    # coordinator side
    placer: ShardPlacer | None = None
    active: Placement | None = None
    active_epoch: int = 0
    changed: asyncio.Event | None = None  # set (and replaced) whenever the active placement changes
    node_bytes: dict[str, int] = field(default_factory=dict)  # node -> weights it said it holds
    pending: dict[int, PendingShard] = field(default_factory=dict)  # task id -> where it goes
    ended: OrderedDict[int, str] = field(default_factory=OrderedDict)  # task id of a round over -> its node
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    timer: asyncio.TimerHandle | None = None
    tail_pool: concurrent.futures.ThreadPoolExecutor | None = None
    # big shard inputs go out one at a time (made on the loop): see ShardShell._send_shard
    send_gate: asyncio.Lock | None = None
    in_threads: set[concurrent.futures.Future[Any]] = field(default_factory=set)  # layers the tail threads wait on
    last_failure: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b in self.held.values())
