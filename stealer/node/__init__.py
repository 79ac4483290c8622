"""The node daemon: discovery, peer connections, work stealing, the gateway's assembly.

One asyncio loop per node carries messages; kernels run in a thread pool (they release the GIL).
The decisions live in pure state machines (:mod:`stealer.roles`, :mod:`stealer.scheduler`,
:mod:`stealer.assembly`); this package is the shell that only moves data between them, the
network and the compute threads.

Roles
-----
* every node computes: its own queue first (if it is a source, or the gateway with tail tasks),
  then it steals from the peer with the most queued work (peers announce their queue length
  with :class:`Status` whenever it changes, so idle nodes wait on an event, never poll);
* a *source* partitions each frame (FTP plan, reuse-aware order) into its queue and tells the
  gateway (:class:`FrameStart`); stolen tiles carry their frame region straight from the source;
* the *gateway* caches reuse strips, stitches tiles, queues each stitched frame's tail (the
  layers after the fused block) as a stealable task, and emits results in frame order.

Every task leaves a queue under a lease; the gateway's acknowledgement ends it, and a lost
holder's tasks are queued again (the gateway keeps the first result of a task, drops repeats).

Files
-----
One :class:`Node` class, put together in :mod:`.shell` from one mixin per part:

=============  ====================================================================================
``config``     NodeConfig, RuntimeLimits, Peer, Job, Stats, plan keys, memory_needs (plain data)
``state``      NodeState: every attribute (one ``__init__``), the views all parts read, and the
               methods the parts call on one another, declared for mypy
``shell``      Node: start, close, drain, spawned tasks, the handler table and dispatch
``peers``      connections, redial, lost peers, membership actions, status, answers and posts
``source``     the source loop, frames announced to the gateway, acks, work sharing
``victim``     this node's queue handing out tasks: grants, regions, strips served, leases
``thief``      the compute loop: steal, prefetch, run jobs, deliver results, fetch strips
``gateway``    gateway actions: the gateway machine fed and carried out, deadlines, results
``kernels``    what runs in the compute threads: a tile's kernels, a tail, null compute
=============  ====================================================================================

The parts never import :mod:`.shell`; they share only :mod:`.config` and :mod:`.state`.
"""

from ..roles.strips import pack_strips, unpack_strips
from .config import (
    MAX_IMAGE_SIDE,
    Job,
    NodeConfig,
    Peer,
    RuntimeLimits,
    Stats,
    default_memory,
    memory_needs,
    parse_plan_key,
    plan_key,
)
from .shell import Node, install_signal_handlers

__all__ = [
    "MAX_IMAGE_SIDE",
    "Job",
    "Node",
    "NodeConfig",
    "Peer",
    "RuntimeLimits",
    "Stats",
    "default_memory",
    "install_signal_handlers",
    "memory_needs",
    "pack_strips",
    "parse_plan_key",
    "plan_key",
    "unpack_strips",
]
