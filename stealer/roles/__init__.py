"""The roles a node plays, each a pure state machine: events in, actions out, no I/O.

* :mod:`.membership` — who is connected, who is the gateway, elections and takeovers;
* :mod:`.source` — a data source's frames, their tasks and what the gateway is told;
* :mod:`.gateway` — frame assembly, strip locations and results in order, with its bounds;
* :mod:`.worker` — which task a compute slot runs next: local, stolen, paired, a copy;
* :mod:`.strips` — the reuse strips a node holds and how they travel.

The node shell (:mod:`stealer.node`) feeds them events from the wire, timers and compute
threads, and carries out what they return.
"""
