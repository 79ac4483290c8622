"""The worker role's decisions, pure: what a compute slot does next.

Every node computes: its own queue first, then it steals from the peer with the most queued
work (:func:`stealer.scheduler.choose_victim`), and with nothing queued anywhere it may copy a
straggler. These functions decide, from what the node knows (its own counts and its peers'
last :class:`~stealer.wire.messages.Status`), whether to steal, prefetch, pair two tasks or
copy one; the node shell's compute loop only carries that out. No I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from ..scheduler import PeerLoad


PREFETCH_TRANSFER_SHARE = 0.1
"""A task's transfer counts as on the critical path once it takes this share of its compute
time: below it, idling for the transfer costs less than a task waiting behind another."""


@dataclass(frozen=True, slots=True)
class WorkerPolicy:
    """Parameters
    ----------
    policy : {"steal", "share"}
        Work stealing, or the work-sharing baseline (tasks pushed round-robin, never stolen).
    speculate : bool
        Idle nodes run copies of stragglers (the first result wins).
    short_task : float
        Seconds: tasks that compute faster than this on average go two at a time.
    steal_batch : int
        Tiles per steal from a deep queue when tasks are short.
    """

    policy: str = "steal"
    speculate: bool = True
    short_task: float = 0.005
    steal_batch: int = 2

    def may_steal(self, draining: bool, has_gateway: bool = True) -> bool:
        """Whether to ask peers for work. Not while draining, and not while this node knows no
        gateway: it could not deliver what it ran, and each task it took would wait out its
        lease (a worker that lost the gateway to a false alarm at start-up took the same frame
        three times, and the frame was given up)."""
        return self.policy == "steal" and not draining and has_gateway

    def short_tasks(self, ran: int, busy_seconds: float, typical_tile: float | None) -> bool:
        """Whether tasks compute in less than ``short_task`` on average: by this node's own
        compute time, or, on a node that computes nothing, by how soon its leases end
        (``typical_tile``, seconds from lease to acknowledgement)."""
        if ran:
            return busy_seconds / ran < self.short_task
        return typical_tile is not None and typical_tile < 10 * self.short_task

    def deep_queue(self, queued_tiles: int, peers: int) -> bool:
        """A queue deep enough that taking two tiles at once still leaves every other node
        something to steal (``steal_batch`` per node)."""
        return queued_tiles >= self.steal_batch * (peers + 1)

    def should_prefetch(self, *, draining: bool, queued_here: int, assigned: int,
                        loads: Mapping[str, PeerLoad], transfer_seconds: float | None = None,
                        compute_seconds: float | None = None, has_gateway: bool = True) -> bool:
        """Whether to fetch the next task while this one computes. Never with work of its own.
        When fetching a task takes a visible share of computing one (``transfer_seconds``, a
        steal measured from request to data in hand, against ``compute_seconds``), the fetch
        sits on the critical path, so any queued task is worth fetching early: on 20 Mbit/s a
        1x1 frame's pixels take 0.4-3 s to arrive against 3.5 s of compute. Otherwise only
        from a queue deep enough that every other node still finds work."""
        if not self.may_steal(draining, has_gateway) or queued_here or assigned:
            return False
        queued = sum(p.queued_tiles for p in loads.values())
        if (queued and transfer_seconds is not None and compute_seconds
                and transfer_seconds >= PREFETCH_TRANSFER_SHARE * compute_seconds):
            return True
        return queued > len(loads)

    def straggler_victim(self, loads: Mapping[str, PeerLoad], tried: set[str]) -> str | None:
        """With nothing queued anywhere, the peer with the most tasks out (it may hold a straggler)."""
        if not self.speculate:
            return None
        cands = [(p.leased, pid) for pid, p in loads.items() if pid not in tried and p.leased > 0]
        return max(cands)[1] if cands else None

    def take_possible(self, *, draining: bool, assigned: int, queued: int, queued_tails: int,
                      accepts_tails: bool, loads: Mapping[str, PeerLoad], has_gateway: bool = True) -> bool:
        """Whether a task this node may run is queued here or (by the last word) at a peer. Must
        agree with what the slot's take and steal accept, or the compute loop would spin."""
        if assigned or queued - (0 if accepts_tails else queued_tails) > 0:
            return True
        if not self.may_steal(draining, has_gateway):
            return False
        return any(p.queued_tiles or (accepts_tails and p.queued_tails) for p in loads.values())


def status_worth_sending(last: tuple[int, ...] | None, now: tuple[int, ...]) -> bool:
    """Thieves only need a rough picture of who has work: tell peers when a count goes between
    zero and non-zero, or moves by a quarter (at least 2) since last told. Every take would
    otherwise cost a message to every peer."""
    if last is None:
        return True
    # the leased count only matters to a peer with nothing queued anywhere (it may then copy
    # a straggler): while this node has work queued, changes in it are not worth a message
    fields = 3 if now[0] == 0 and now[1] == 0 else 2
    for a, b in zip(last[:fields], now[:fields]):
        if (a == 0) != (b == 0):
            return True
        if abs(a - b) >= max(2, a // 4):
            return True
    return False


LEASE_RESTART_SHARE = 0.2
"""A prefetched task restarts its lease (TaskStarted) only when it waited at least this share
of ``straggler_min`` between its grant and its start: below that the victim's clocks are off by
too little to matter, and short tasks would pay one more message each (measured: 8% more
messages in the runtime benchmark's null-compute run)."""


def restarts_lease(waited: float, straggler_min: float) -> bool:
    """Whether the victim should hear that a prefetched task starts only now, ``waited`` seconds
    after it was granted: its lease and its straggler age then count from now."""
    return waited >= LEASE_RESTART_SHARE * straggler_min


SPEED_NEWS_SHARE = 0.25
"""A node's measured speed is news to its peers when first measured or once it moves by this
share from what they were last told: the planner buckets speeds about this coarsely."""


def speed_worth_telling(told: float, measured: float) -> bool:
    """Whether peers should hear this node's measured FLOP/s (0: not measured yet)."""
    return measured > 0 and (told == 0 or abs(measured - told) > SPEED_NEWS_SHARE * told)


def refused_steal(load: PeerLoad, speculative: bool) -> PeerLoad:
    """What a thief knows of a peer that had nothing to give: nothing queued there now (and,
    after a refused speculative steal, no straggler either). What the peer measured of its
    speed still stands: reset to 0, its next status looked like a speed change and re-ran the
    grid-auto planner."""
    return dataclasses.replace(load, queued_tiles=0, queued_tails=0, can_take_tails=True,
                               leased=0 if speculative else load.leased)
