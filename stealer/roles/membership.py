"""Membership and gateway election, pure: who is connected in which role, who the gateway is.

Events in (a peer joined or was lost, a gateway claim arrived, this node is closing), actions
out (:class:`Promote` this node, :class:`StepDown`, :class:`Follow` another gateway,
:class:`SendClaim` to a peer that follows a weaker claim). No I/O, no clock.

A claim is the pair (epoch, node id). The stronger claim wins everywhere: the higher epoch, and
at equal epochs the **smaller node id** (a deterministic tie-break, so two standbys that took
over at once on the two sides of a partition agree, once it heals, on exactly one gateway).
Only nodes that joined as ``gateway`` or ``standby`` may claim; a worker's claim is refused.
When the gateway is lost, the connected standby with the smallest node id takes over with the
old epoch + 1; every node computes the same choice from the same membership. A node that is
closing never takes over (its connections all drop at once while it exits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

log = logging.getLogger(__name__)

CLAIMING_ROLES = ("gateway", "standby")


@dataclass(frozen=True, slots=True)
class Promote:
    """This node is the gateway from ``epoch`` on: tell every peer (GatewayClaim)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StepDown:
    """This node was the gateway and a stronger claim won: stop acting as one."""

    winner: str


@dataclass(frozen=True, slots=True)
class Follow:
    """``node`` is the gateway now; ``changed``: another gateway than the one this node's
    frames were last announced to (they must start again there)."""

    node: str
    changed: bool


@dataclass(frozen=True, slots=True)
class SendClaim:
    """Tell ``node`` this node's (stronger) claim: it follows a weaker one."""

    node: str
    epoch: int


MembershipAction = Union[Promote, StepDown, Follow, SendClaim]


class MembershipState:
    """Parameters
    ----------
    node_id : str
    role : {"gateway", "standby", "worker"}
        The role this node started with.
    """

    def __init__(self, node_id: str, role: str) -> None:
        self.node_id = node_id
        self.role = role
        self.gateway_id: str | None = node_id if role == "gateway" else None
        self.epoch = 0
        self.peer_roles: dict[str, str] = {}  # role each connected peer joined with
        self.last_gateway: str | None = self.gateway_id  # the gateway frames were last announced to
        self.closing = False
        self.takeovers = 0

    @property
    def is_gateway(self) -> bool:
        return self.gateway_id == self.node_id

    def _stronger(self, epoch: int, node: str) -> bool:
        """Whether claim (epoch, node) beats the claim this node follows."""
        if self.gateway_id is None or epoch != self.epoch:
            return epoch >= self.epoch
        return node < self.gateway_id  # equal epochs: the smaller node id wins

    def peer_joined(self, node: str, role: str) -> list[MembershipAction]:
        self.peer_roles[node] = role
        return [SendClaim(node, self.epoch)] if self.is_gateway else []

    def peer_lost(self, node: str) -> list[MembershipAction]:
        self.peer_roles.pop(node, None)
        if node != self.gateway_id:
            return []
        self.gateway_id = None
        if self.closing:
            return []
        candidates = [n for n, r in self.peer_roles.items() if r in CLAIMING_ROLES]
        if self.role in CLAIMING_ROLES:
            candidates.append(self.node_id)
        if not candidates:
            log.error("lost the gateway %s and no standby is connected; sources keep their frames "
                      "until a gateway appears", node[:8])
            return []
        winner = min(candidates)
        log.warning("lost the gateway %s; standby %s takes over", node[:8], winner[:8])
        if winner != self.node_id:
            return []
        return self._promote()

    def _promote(self) -> list[MembershipAction]:
        self.role = "gateway"
        self.epoch += 1
        self.gateway_id = self.last_gateway = self.node_id
        self.takeovers += 1
        return [Promote(self.epoch)]

    def claim(self, node: str, epoch: int) -> list[MembershipAction]:
        """``node`` says it is the gateway from ``epoch`` on."""
        role = self.peer_roles.get(node)
        if role not in CLAIMING_ROLES:
            log.warning("node %s (%s) claims the gateway: refused, only a gateway or a standby may",
                        node[:8], role)
            return []
        if node == self.gateway_id and epoch == self.epoch:
            return []
        if not self._stronger(epoch, node):
            # it follows a weaker claim than ours (or made one): tell it ours, and it steps down
            return [SendClaim(node, self.epoch)] if self.is_gateway else []
        out: list[MembershipAction] = []
        if self.is_gateway:
            log.warning("node %s claims the gateway at epoch %d; this node steps down", node[:8], epoch)
            self.role = "standby"
            out.append(StepDown(node))
        self.epoch = epoch
        self.gateway_id = node
        changed = self.last_gateway != node
        self.last_gateway = node
        out.append(Follow(node, changed))
        return out

    def close(self) -> None:
        self.closing = True

