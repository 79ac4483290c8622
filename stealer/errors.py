"""The one exception family of stealer.

Every error that stealer raises on purpose derives from :class:`StealerError`, so callers
(the CLI, the node's connection handlers) can catch ours without catching bugs.
"""

from __future__ import annotations


class StealerError(Exception):
    """Base class of every error stealer raises on purpose."""


class ModelError(StealerError):
    """A cfg or weights file is malformed or does not fit its cfg."""


class CfgError(ModelError):
    """A darknet cfg file cannot be parsed; the message names the file and line."""


class WeightsError(ModelError):
    """A darknet weights file does not fit its cfg; the message names the byte counts."""


class ShapeError(StealerError):
    """An input tensor has the wrong shape or dtype for the layer it is fed to."""


class PlanError(StealerError):
    """A fused-tile partition cannot be made (bad grid, unsupported layer in the fused range)."""


class ProtocolError(StealerError):
    """A peer sent bytes that do not decode to a valid message; the connection is dropped."""


class CommClosedError(StealerError):
    """A peer connection is closed (cleanly or not); socket errors are converted to this once."""


class HandshakeRejected(ProtocolError):
    """The handshake failed on purpose: the peer (or we) refused the connection.

    The message carries the human-readable reason (protocol version or model hash
    mismatch, server full, ...). Retrying the same connection will fail the same way.
    """


class AuthError(HandshakeRejected):
    """A peer failed the cluster-secret challenge (or its proof did not verify for us).

    Raised before any other message of that peer is read. The message never contains the
    secret, a key or a MAC.
    """


class FrameAuthError(ProtocolError):
    """A frame's MAC did not verify (tampered, replayed, reordered or from another key);
    the connection is aborted."""


class ConfigError(StealerError):
    """A command-line setting is invalid (unknown ``--limit`` name, bad value, ...)."""


class SecretError(ConfigError):
    """The cluster secret cannot be loaded (missing file, too short); never shows the secret."""


class PeerDeadError(CommClosedError):
    """Not one byte arrived from a peer for its link's dead deadline (``Limits.peer_dead_after``,
    grown on a loaded link up to ``Limits.peer_dead_max``); its connection was aborted."""


class DiscoveryError(StealerError):
    """mDNS discovery could not start (no usable interface, name conflict, socket error)."""


class PlacementError(PlanError):
    """No placement of a model's layers, shards and tiles fits the nodes' memory; the message
    names the layer and the memory it needs."""
