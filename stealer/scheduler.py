"""Work queues and stealing decisions: pure state machines, no sockets, no clocks of their own.

A data source (or the gateway, for tail tasks) owns a :class:`WorkQueue`. Its tasks leave the
queue only under a *lease* naming the node that runs them (itself or a thief). A lease ends when
the gateway acknowledges the task's result (:meth:`WorkQueue.done`; for tiles nothing depends
on, once for the whole frame: :meth:`WorkQueue.end_tiles`), and the task goes back to the
*front* of the queue when its holder is lost or the lease runs out (:meth:`WorkQueue.peer_lost`,
:meth:`WorkQueue.expire`). So a task is never lost, and a second run can only happen after a
failure, where the gateway keeps the first result and drops the duplicate.

The caller passes ``now`` (seconds, any monotonic clock) into every method that needs time, so
tests drive these machines with plain numbers.
"""

from __future__ import annotations

import logging
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

#: Task id of a frame's tail task (the layers after the fused block); tile tasks are 0 .. n-1.
TAIL = -1


@dataclass(frozen=True, slots=True, order=True)
class TaskRef:
    """Names one task of one frame of one source, cluster-wide."""

    source: str
    frame: int
    task: int

    @property
    def is_tail(self) -> bool:
        return self.task == TAIL

    def __str__(self) -> str:
        kind = "tail" if self.is_tail else f"tile {self.task}"
        return f"{self.source[:8]}#{self.frame}/{kind}"


@dataclass(slots=True)
class Lease:
    holder: str
    deadline: float
    started: float = 0.0
    speculated: bool = False  # a speculative copy is out already (at most one per task)


@dataclass
class WorkQueue:
    """FIFO of tasks with leases.

    FIFO (not LIFO, as in classic work stealing) because the plan orders tasks so that reuse
    producers run before their dependents; thieves take from the same end so the order holds
    across the cluster.

    Parameters
    ----------
    owner : str
        Node id of the queue's owner (its own runs are leased to it too).
    lease_seconds : float
        How long a holder may keep a task before it is handed out again.
    max_attempts : int
        Times a task may be handed out and come back unfinished (its holder reported a
        failure, its lease ran out, its holder was lost) before it is given up instead of
        queued again: it then goes to :attr:`given_up`, for the owner to fail its frame.
        0: no limit.
    """

    owner: str
    lease_seconds: float
    queue: deque[TaskRef] = field(default_factory=deque)
    leases: dict[TaskRef, Lease] = field(default_factory=dict)
    requeued: int = 0
    # smoothed seconds from lease to acknowledgement, per kind (tile, tail): how old a lease
    # must be before a straggler is suspected
    typical: dict[bool, float] = field(default_factory=dict)
    max_attempts: int = 0
    attempts: dict[TaskRef, int] = field(default_factory=dict)  # failed attempts, live tasks only
    given_up: list[TaskRef] = field(default_factory=list)  # failed max_attempts times; owner drains
    _tails: int = 0  # tail tasks in ``queue``

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def queued_tails(self) -> int:
        """Tail tasks in the queue (kept as a count: status is reported on every change)."""
        return self._tails

    @property
    def queued_tiles(self) -> int:
        return len(self.queue) - self._tails

    def add(self, tasks: Iterable[TaskRef], *, front: bool = False) -> None:
        """Queue tasks in the given order, at the back (or at the front: a frame's tail goes
        first, so the frame's latency does not include later frames' tiles)."""
        tasks = list(tasks)
        self._tails += sum(1 for r in tasks if r.is_tail)
        if front:
            self.queue.extendleft(reversed(tasks))
        else:
            self.queue.extend(tasks)

    def take(self, holder: str, now: float, *, accept_tail: bool = True,
             ready: Callable[[TaskRef], bool] | None = None,
             prefer: Callable[[TaskRef], bool] | None = None, window: int = 8) -> TaskRef | None:
        """Hand the first task ``holder`` may run to it under a lease, or None if there is none.

        With ``ready``, the first task for which it is true goes first, and only if there is
        none the first task at all: a reuse tile whose producers are still running would have
        to run its full variant (several times the work and the input bytes), while the next
        frame's producers can start at once and the tile becomes cheap a moment later.

        With ``prefer``, a task it likes may go instead of that one if it is among the next
        ``window`` tasks and ready too (the holder already has the reuse strips it needs, say):
        a short look ahead, so that the queue's order still holds across frames.
        """
        # One pass over the queue, each candidate's readiness asked once: a grant scans this
        # on every steal, and ``ready``/``prefer`` are the costly part of it.
        it = iter(self.queue)
        first = ref = None
        ref_ready = False
        for r in it:
            if not accept_tail and r.task == TAIL:
                continue
            if first is None:
                first = r
            if ready is None or ready(r):
                ref, ref_ready = r, True
                break
        if first is None:
            return None
        if ref is None:
            ref = first  # nothing is ready: the first task goes (its full variant)
        if prefer is not None and ref_ready and not prefer(ref):
            looked = 0
            for r in it:
                if not accept_tail and r.task == TAIL:
                    continue
                if looked == window:
                    break
                looked += 1
                if (ready is None or ready(r)) and prefer(r):
                    ref = r
                    break
        self.queue.remove(ref)  # the first equal entry: refs are unique in the queue
        self._tails -= ref.is_tail
        self.leases[ref] = Lease(holder, now + self.lease_seconds, now)
        return ref

    def take_ref(self, ref: TaskRef, holder: str, now: float) -> bool:
        """Lease a specific queued task to ``holder`` (work sharing assigns tasks by name).
        Returns False if the task is no longer queued (already taken)."""
        try:
            self.queue.remove(ref)
        except ValueError:
            return False
        self._tails -= ref.is_tail
        self.leases[ref] = Lease(holder, now + self.lease_seconds, now)
        return True

    def restart(self, ref: TaskRef, holder: str, now: float) -> bool:
        """``holder`` starts the task it fetched ahead of time: its lease (and the age that
        makes it look like a straggler) count from now. False if it holds no lease on it."""
        lease = self.leases.get(ref)
        if lease is None or lease.holder != holder:
            return False
        lease.started, lease.deadline = now, now + self.lease_seconds
        return True

    def holder(self, ref: TaskRef) -> str | None:
        lease = self.leases.get(ref)
        return lease.holder if lease else None

    def done(self, ref: TaskRef, now: float | None = None) -> bool:
        """The gateway has the task's result: end its lease (or drop it from the queue if a
        requeued copy is waiting). Returns False if the task was not known (a late duplicate)."""
        self.attempts.pop(ref, None)
        lease = self.leases.pop(ref, None)
        if lease is not None:
            if now is not None:
                took = max(0.0, now - lease.started)
                old = self.typical.get(ref.is_tail)
                self.typical[ref.is_tail] = took if old is None else 0.8 * old + 0.2 * took
            return True
        try:
            self.queue.remove(ref)
        except ValueError:
            return False
        self._tails -= ref.is_tail
        return True

    def fail(self, ref: TaskRef) -> list[TaskRef]:
        """The holder of ``ref`` could not run it: queue it again at the front, or, after
        ``max_attempts``, give it up. Returns the tasks queued again."""
        if ref not in self.leases:
            return []
        return self._requeue([ref])

    def pop_given_up(self) -> list[TaskRef]:
        """The tasks given up since the last call (the owner fails their frames)."""
        out, self.given_up = self.given_up, []
        return out

    def peer_lost(self, holder: str) -> list[TaskRef]:
        """Requeue, at the front and in their original order, every task ``holder`` held."""
        lost = sorted(ref for ref, lease in self.leases.items() if lease.holder == holder)
        return self._requeue(lost)

    def expire(self, now: float) -> list[TaskRef]:
        """Requeue every task whose lease ran out."""
        late = sorted(ref for ref, lease in self.leases.items() if lease.deadline <= now)
        return self._requeue(late)

    def speculate(self, thief: str, now: float, *, min_age: float, factor: float = 2.0,
                  accept_tail: bool = True) -> TaskRef | None:
        """A straggler for an idle ``thief`` to run a speculative copy of: the oldest lease held by
        another node that is older than ``factor`` times the typical task time (and ``min_age``),
        each task at most once. The original lease stays; the first result wins."""
        best: tuple[float, TaskRef] | None = None
        for ref, lease in self.leases.items():
            if lease.holder == thief or lease.speculated or (ref.is_tail and not accept_tail):
                continue
            typical = self.typical.get(ref.is_tail)
            if typical is None:
                continue  # no task of its kind has finished yet: nothing to call late
            age = now - lease.started
            if age < max(min_age, factor * typical):
                continue
            if best is None or lease.started < best[0]:
                best = (lease.started, ref)
        if best is None:
            return None
        self.leases[best[1]].speculated = True
        return best[1]

    def outstanding(self, holder_not: str) -> int:
        """Leases held by other nodes (what an idle node might speculate on)."""
        return sum(1 for lease in self.leases.values() if lease.holder != holder_not and not lease.speculated)

    def next_deadline(self) -> float | None:
        return min((lease.deadline for lease in self.leases.values()), default=None)

    def untouched(self, source: str, frame: int, n_tasks: int) -> bool:
        """True if all ``n_tasks`` of the frame are still queued (nothing started, nothing done)."""
        if any((r.source, r.frame) == (source, frame) for r in self.leases):
            return False
        return sum(1 for r in self.queue if (r.source, r.frame) == (source, frame)) == n_tasks

    def end_tiles(self, source: str, frame: int, now: float | None = None) -> int:
        """The gateway has every tile of a frame: end their leases and forget queued copies
        (a requeued tile whose first result was in after all). Its tail, if queued here, stays.
        With ``now``, the ended leases count toward the typical tile time (most tiles end this
        way, with no ack of their own: without them a 1x1 grid never learnt its task time, and
        every lease older than ``straggler_min`` looked like a straggler)."""
        before = len(self.queue) + len(self.leases)
        mine = lambda r: r.source == source and r.frame == frame and not r.is_tail  # noqa: E731
        if now is not None:
            for ref, lease in self.leases.items():
                if mine(ref):
                    took = max(0.0, now - lease.started)
                    old = self.typical.get(False)
                    self.typical[False] = took if old is None else 0.8 * old + 0.2 * took
        if any(mine(r) for r in self.queue):
            self.queue = deque(r for r in self.queue if not mine(r))
        self.leases = {r: l for r, l in self.leases.items() if not mine(r)}
        if self.attempts:
            self.attempts = {r: n for r, n in self.attempts.items() if not mine(r)}
        return before - len(self.queue) - len(self.leases)

    def drop_frame(self, source: str, frame: int) -> int:
        """Forget every queued and leased task of a frame (it completed, or was dropped)."""
        before = len(self.queue) + len(self.leases)
        self.queue = deque(r for r in self.queue if (r.source, r.frame) != (source, frame))
        self._tails = sum(1 for r in self.queue if r.is_tail)
        self.leases = {r: l for r, l in self.leases.items() if (r.source, r.frame) != (source, frame)}
        if self.attempts:
            self.attempts = {r: n for r, n in self.attempts.items() if (r.source, r.frame) != (source, frame)}
        return before - len(self.queue) - len(self.leases)

    def _requeue(self, refs: list[TaskRef]) -> list[TaskRef]:
        """Queue leased tasks again at the front, in order; a task that has come back
        ``max_attempts`` times is given up instead."""
        again = []
        for ref in refs:
            del self.leases[ref]
            tries = self.attempts.get(ref, 0) + 1
            if self.max_attempts and tries >= self.max_attempts:
                self.attempts.pop(ref, None)
                self.given_up.append(ref)
                log.warning("%s came back %d times: given up", ref, tries)
            else:
                self.attempts[ref] = tries
                again.append(ref)
        for ref in reversed(again):
            self.queue.appendleft(ref)
            self._tails += ref.is_tail
        if again:
            self.requeued += len(again)
            log.info("requeued %d task(s): %s", len(again), ", ".join(map(str, again[:5])))
        return again


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """What a node knows about a peer's queue (from its last status message)."""

    queued_tiles: int
    queued_tails: int
    rtt: float = 0.0  # seconds, smoothed round trip of the peer connection
    can_take_tails: bool = True
    leased: int = 0  # tasks the peer has out with other nodes
    speed: float = 0.0  # FLOP/s the peer measured over its own compute; 0: unknown


def choose_victim(loads: Mapping[str, PeerLoad], *, want_tails: bool, tile_seconds: float,
                  tail_seconds: float, exclude: Iterable[str] = ()) -> str | None:
    """Pick a victim: a peer with a queued tail first (if this node takes tails), else the peer
    whose queue holds the most work (in estimated seconds), or None.

    Tails first because a frame's tail is the last step before its result (results leave in
    frame order, so a waiting tail holds up every later frame) and because otherwise they are
    left to the gateway, where they queue: measured on 6 emulated Pis, the gateway ran 11 of
    12 tails and capped the cluster while the others waited on their links. Work is counted
    in seconds, not tasks, because a tail task costs about as much as a dozen tiles; ties go
    to the peer with the shorter round trip.
    """
    skip = set(exclude)
    best: tuple[bool, float, float, str] | None = None
    for peer, load in loads.items():
        if peer in skip:
            continue
        tails = load.queued_tails if want_tails else 0
        work = load.queued_tiles * tile_seconds + tails * tail_seconds
        if work <= 0:
            continue
        key = (tails == 0, -work, load.rtt, peer)
        if best is None or key < best:
            best = key
    return None if best is None else best[3]
