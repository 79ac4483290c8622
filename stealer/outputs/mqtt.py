"""``--mqtt HOST[:PORT]``: the gateway publishes every released result to an MQTT broker.

Each result goes out as the same JSON object ``--out`` writes as a line (the same bytes, with
no newline), in release order, to the topic ``--mqtt-topic`` (default
``stealer/results/{source}``: ``{source}`` is the result's source id, ``NODE/INDEX``, so
``stealer/results/#`` subscribes to every camera of the cluster and
``stealer/results/NODE/#`` to one node's cameras). Nothing is retained.

The client is paho-mqtt, the reference Python client, run on its own network thread
(``loop_start``): connecting, keepalive, reading acknowledgements and reconnecting with
backoff never touch the event loop. The gateway's side is :meth:`MqttPublisher.publish`,
called on the event loop for each released result, which only appends to a bounded queue
and hands results to the client while the broker is connected (``Client.publish`` just
queues a packet for the network thread and wakes it). Paho's callbacks come back to the
event loop with ``call_soon_threadsafe``, so every piece of the publisher's own state is
touched by the event loop only.

Delivery:

* **QoS 1 (default)**: at least once. A result is counted ``published`` when the broker has
  acknowledged it (PUBACK). A result handed to the client and not yet acknowledged when the
  connection drops is sent again after the reconnect (paho keeps it), so the subscriber may
  see it twice; the payload's ``source`` and ``frame`` name it. (QoS 2: exactly once between
  the gateway and the broker, confirmed at PUBCOMP.)
* **QoS 0**: at most once. ``published`` when written to the socket; results written but
  unconfirmed when the connection drops are counted ``dropped`` (they may have been lost).
* **The broker unreachable** (down at start-up, restarting, Wi-Fi gone): results wait, in
  order, in a queue of ``Limits.mqtt_queue``; the client retries from
  ``mqtt_reconnect_min`` doubling to ``mqtt_reconnect_max`` seconds, and everything waiting
  goes out once it is back. A broker that is down at start-up is logged, not fatal. When the
  queue is full the **oldest** waiting result is dropped (the newest ones describe what the
  cameras see now), counted in ``dropped`` and logged (once per outage, with a count when
  the broker is back).
* **Shutdown**: results still waiting get ``mqtt_flush_timeout`` seconds to be confirmed;
  the rest are counted ``dropped`` and logged.

So no result is ever lost silently: every released result ends up in ``published`` or
``dropped`` (both served on ``/metrics`` as ``stealer_mqtt_published_total`` and
``stealer_mqtt_dropped_total``), or is still ``queued``. What the broker does with a result
after acknowledging it (a subscriber that is not connected, a broker killed before it
forwarded or saved it) is the broker's guarantee, not this one: persistent subscriber
sessions and broker persistence cover that.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_LIMITS, Limits
from ..errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

__all__ = ["DEFAULT_TOPIC", "MQTT_PASSWORD_ENV", "MqttConfig", "MqttPublisher", "MqttStats", "add_mqtt_args",
           "mqtt_config_from_args", "parse_broker", "topic_for"]

log = logging.getLogger("stealer.outputs.mqtt")

DEFAULT_TOPIC = "stealer/results/{source}"
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
MQTT_PASSWORD_ENV = "STEALER_MQTT_PASSWORD"
MAX_TOPIC_BYTES = 65535  # MQTT strings carry a 16-bit length
MAX_PASSWORD_BYTES = 65535


@dataclass(frozen=True)
class MqttConfig:
    """Where and how the gateway publishes its results (``--mqtt*`` options)."""

    host: str
    port: int = DEFAULT_PORT
    topic: str = DEFAULT_TOPIC
    qos: int = 1
    client_id: str = ""  # "": stealer-<node id>, unique per node (a standby that takes over has its own)
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in repr or logs
    tls: bool = False
    ca_file: str | None = None  # with tls: trust this CA bundle instead of the system's

    def __post_init__(self) -> None:
        check_topic(self.topic)
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"--mqtt-qos {self.qos}: must be 0, 1 or 2")
        if self.password is not None and self.username is None:
            raise ConfigError("an MQTT password needs --mqtt-username (MQTT sends no password without a user name)")


@dataclass
class MqttStats:
    """What happened to the results handed to :meth:`MqttPublisher.publish` (``stealer_mqtt_F_total``)."""

    published: int = 0
    """Confirmed: acknowledged by the broker (QoS 1/2), written to the socket (QoS 0)."""
    dropped: int = 0
    """Lost on purpose or possibly lost, each logged: the queue overflowed, QoS-0 results
    unconfirmed when the connection dropped, results still waiting at shutdown."""
    connects: int = 0
    """Connections the broker accepted (the first one and every reconnect)."""
    disconnects: int = 0
    """Connections lost (a broker restart, a network failure)."""
    refused: int = 0
    """Connection attempts the broker refused (bad user name or password, not authorized)."""


def check_topic(template: str) -> None:
    """A ``--mqtt-topic`` template must give a topic a broker accepts for publishing."""
    if not template:
        raise ConfigError("--mqtt-topic must not be empty")
    rest = template.replace("{source}", "")
    if "+" in rest or "#" in rest:
        raise ConfigError(f"--mqtt-topic {template!r}: the wildcards + and # are for subscribing, not publishing")
    if "\0" in rest:
        raise ConfigError("--mqtt-topic must not contain a NUL character")
    if len(rest.encode()) > MAX_TOPIC_BYTES // 2:
        raise ConfigError("--mqtt-topic is too long")


def topic_for(template: str, source: str) -> str:
    """The topic of a result of ``source``: ``{source}`` replaced by the source id, in which
    characters a publish topic may not carry (wildcards, NUL) become ``_``. A source id is
    a node id and an index (``NODE/INDEX``: a subtopic per node) and bounded by the gateway."""
    safe = source.replace("+", "_").replace("#", "_").replace("\0", "_")[:MAX_TOPIC_BYTES // 4]
    return template.replace("{source}", safe)


class MqttPublisher:
    """Publishes released results to a broker from paho's network thread; see the module
    docstring for the delivery guarantees.

    Made by the node at start (gateway or standby with ``--mqtt``), fed by
    :meth:`publish` on the event loop, closed once with :meth:`close` (safe twice).
    """

    def __init__(self, cfg: MqttConfig, node_id: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.cfg = cfg
        self.limits = limits
        self.client_id = cfg.client_id or f"stealer-{node_id[:16]}"
        self.stats = MqttStats()
        self.connected = False
        # results not yet handed to the client, oldest first: (topic, payload)
        self._waiting: collections.deque[tuple[str, bytes]] = collections.deque()
        # handed to the client and not yet confirmed: message id -> None (insertion-ordered)
        self._outstanding: dict[int, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._closed = False
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._outage_drops = 0  # dropped since the broker was last connected (one log line per outage)
        self._down_since: float | None = time.monotonic()
        self._fail_logged = False
        self._refusal_logged: str | None = None

    @property
    def queued(self) -> int:
        """Results waiting or handed to the client and not yet confirmed."""
        return len(self._waiting) + len(self._outstanding)

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the client's network thread and its first connection attempt (in that
        thread: a broker that is down is retried, never an error here).

        Raises
        ------
        ConfigError
            The TLS settings cannot be used (a CA file that cannot be read).
        """
        import ssl

        try:
            import paho.mqtt.client as paho
        except ImportError:
            raise ConfigError("--mqtt needs paho-mqtt: pip install paho-mqtt") from None

        self._loop = asyncio.get_running_loop()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv311, clean_session=True)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            try:
                client.tls_set(ca_certs=self.cfg.ca_file)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"--mqtt-tls: cannot use CA file {self.cfg.ca_file!r}: {e}") from None
        # every message we hand over goes out at once: our own queue is where results wait
        client.max_inflight_messages_set(self.limits.mqtt_inflight)
        client.max_queued_messages_set(0)
        # floats work (paho compares and sleeps with them); its annotation says int
        client.reconnect_delay_set(self.limits.mqtt_reconnect_min, self.limits.mqtt_reconnect_max)  # type: ignore[arg-type]
        client.connect_timeout = self.limits.mqtt_connect_timeout
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        self._client = client
        client.connect_async(self.cfg.host, self.cfg.port, keepalive=max(1, round(self.limits.mqtt_keepalive)))
        client.loop_start()  # the first connect, and every retry, happen in paho's thread
        log.info("publishing results to mqtt://%s topic %s (QoS %d, client id %s)", self.where, self.cfg.topic,
                 self.cfg.qos, self.client_id)

    async def close(self) -> None:
        """Give waiting results ``mqtt_flush_timeout`` seconds (if the broker is connected),
        count the rest as dropped, disconnect and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is None:
            return
        if self.connected and self.queued:
            self._flushed.clear()
            try:
                await asyncio.wait_for(self._flushed.wait(), self.limits.mqtt_flush_timeout)
            except asyncio.TimeoutError:
                pass
        left = self.queued
        if left:
            self.stats.dropped += left
            log.warning("%d result(s) not confirmed by the MQTT broker at %s at shutdown (dropped)", left, self.where)
        self._waiting.clear()
        self._outstanding.clear()
        client.disconnect()
        # joins paho's thread, which may be in the middle of a connect attempt (at most
        # mqtt_connect_timeout): not on the event loop
        await asyncio.to_thread(client.loop_stop)

    # ------------------------------------------------------------------ results in
    def publish(self, result: dict[str, Any]) -> None:
        """Queue one released result (never blocks; on the event loop)."""
        if self._closed:
            return
        payload = json.dumps(result).encode()  # the --out line's bytes
        if len(self._waiting) >= self.limits.mqtt_queue:
            self._waiting.popleft()
            self.stats.dropped += 1
            self._outage_drops += 1
            if self._outage_drops == 1:
                log.warning("MQTT: %d results wait for the broker at %s (Limits.mqtt_queue): dropping the oldest "
                            "from now on (counted in stealer_mqtt_dropped_total)", self.limits.mqtt_queue, self.where)
        self._waiting.append((topic_for(self.cfg.topic, str(result.get("source", ""))), payload))
        self._pump()

    def _pump(self) -> None:
        """Hand waiting results to the client while connected, up to ``mqtt_inflight``."""
        import paho.mqtt.client as paho

        client = self._client
        while (client is not None and self.connected and self._waiting
               and len(self._outstanding) < self.limits.mqtt_inflight):
            topic, payload = self._waiting[0]
            info = client.publish(topic, payload, qos=self.cfg.qos)
            # at QoS 1/2 paho keeps a message it could not send yet (NO_CONN: the connection
            # just dropped) and sends it after the reconnect; at QoS 0 it is not taken, and
            # waits here for the next connection
            taken = info.rc == paho.MQTT_ERR_SUCCESS or (info.rc == paho.MQTT_ERR_NO_CONN and self.cfg.qos > 0)
            if not taken:
                log.debug("MQTT publish not taken (%s); waiting for the connection", paho.error_string(info.rc))
                break
            self._waiting.popleft()
            self._outstanding[info.mid] = None
        if not self.queued:
            self._flushed.set()

    # ------------------------------------------------------------------ paho's thread -> the loop
    def _to_loop(self, fn: Any, *args: Any) -> None:
        """From paho's network thread: run ``fn(*args)`` on the event loop (dropped when the
        loop is gone: the node is closing and close() accounts for what is left)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            pass

    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._to_loop(self._on_connect, bool(reason.is_failure), str(reason))

    def _paho_connect_fail(self, client: Any, userdata: Any) -> None:
        self._to_loop(self._on_connect_fail)

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._to_loop(self._on_disconnect, str(reason))

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._to_loop(self._on_publish, mid)

    # ------------------------------------------------------------------ on the loop
    def _on_connect(self, refused: bool, reason: str) -> None:
        if self._closed:
            return
        if refused:
            self.stats.refused += 1
            if self._refusal_logged != reason:
                self._refusal_logged = reason
                log.warning("MQTT broker at %s refused the connection: %s (retrying; %d result(s) waiting)",
                            self.where, reason, self.queued)
            return
        self.connected = True
        self.stats.connects += 1
        self._refusal_logged = None
        self._fail_logged = False
        if self.stats.connects > 1 or self._outage_drops:
            away = time.monotonic() - self._down_since if self._down_since is not None else 0.0
            log.warning("MQTT broker at %s connected again after %.1f s; %d result(s) waiting go out now%s",
                        self.where, away, self.queued,
                        f", {self._outage_drops} dropped meanwhile (queue full)" if self._outage_drops else "")
        else:
            log.info("MQTT broker at %s connected", self.where)
        self._outage_drops = 0
        self._down_since = None
        self._pump()

    def _on_connect_fail(self) -> None:
        if self._closed or self._fail_logged:
            return
        self._fail_logged = True  # once per outage: retries come every few seconds
        log.warning("cannot reach the MQTT broker at %s; retrying with backoff (up to %g s apart), results "
                    "wait in a queue of %d", self.where, self.limits.mqtt_reconnect_max, self.limits.mqtt_queue)

    def _on_disconnect(self, reason: str) -> None:
        if self._closed:
            return
        was = self.connected
        self.connected = False
        if not was:
            return  # a refused attempt ends this way too
        self.stats.disconnects += 1
        self._down_since = time.monotonic()
        if self.cfg.qos == 0 and self._outstanding:
            # written or queued at QoS 0: nobody will confirm them, and paho does not resend them
            lost = len(self._outstanding)
            self._outstanding.clear()
            self.stats.dropped += lost
            log.warning("MQTT: %d QoS-0 result(s) in transit when the connection dropped may be lost", lost)
        log.warning("lost the MQTT broker at %s (%s); reconnecting, %d result(s) waiting", self.where, reason,
                    self.queued)

    def _on_publish(self, mid: int) -> None:
        if self._outstanding.pop(mid, 0) is None:  # a late confirmation of a counted-lost one: ignored
            self.stats.published += 1
        self._pump()


# ---------------------------------------------------------------------- command line

def parse_broker(text: str) -> tuple[str, int | None]:
    """``--mqtt HOST[:PORT]`` for argparse (``[::1]:1883`` for IPv6): (host, port or None)."""
    t = text.strip()
    host, port = t, None
    if t.startswith("["):
        close = t.find("]")
        if close < 0:
            raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
        host, rest = t[1:close], t[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
            port = rest[1:]
    elif t.count(":") == 1:
        host, port = t.split(":")
    if not host:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT] with a port 1-65535, got {text!r}")
    return host, int(port)


def _qos_arg(text: str) -> int:
    if text not in ("0", "1", "2"):
        raise argparse.ArgumentTypeError(f"--mqtt-qos must be 0, 1 or 2, got {text!r}")
    return int(text)


def add_mqtt_args(p: argparse.ArgumentParser) -> None:
    """The ``--mqtt*`` options of ``stealer node``."""
    g = p.add_argument_group("results on MQTT (gateway or standby)")
    g.add_argument("--mqtt", type=parse_broker, default=None, metavar="HOST[:PORT]",
                   help=f"publish each result (the --out JSON object) to this MQTT broker [{DEFAULT_PORT}, "
                        f"{DEFAULT_TLS_PORT} with --mqtt-tls] [off]")
    g.add_argument("--mqtt-topic", default=DEFAULT_TOPIC, metavar="T",
                   help="topic; {source} is the result's source id, NODE/INDEX [%(default)s]")
    g.add_argument("--mqtt-qos", type=_qos_arg, default=1, metavar="0|1|2",
                   help="1: at least once (resent after a reconnect); 0: at most once [1]")
    g.add_argument("--mqtt-client-id", default="", metavar="ID", help="MQTT client id [stealer-<node id>]")
    g.add_argument("--mqtt-username", default=None, metavar="USER", help="MQTT user name")
    g.add_argument("--mqtt-password-file", default=None, metavar="PATH",
                   help=f"read the MQTT password from this file (or from ${MQTT_PASSWORD_ENV}); never on the command line")
    g.add_argument("--mqtt-tls", action="store_true", help="connect with TLS (the system's CAs unless --mqtt-ca)")
    g.add_argument("--mqtt-ca", default=None, metavar="PATH", help="with --mqtt-tls: CA bundle to trust")


def read_password(path: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The MQTT password from ``path`` (trailing newlines stripped) or ``$STEALER_MQTT_PASSWORD``."""
    if path is None:
        value = (os.environ if environ is None else environ).get(MQTT_PASSWORD_ENV)
        return value if value else None
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PASSWORD_BYTES + 2)
    except OSError as e:
        raise ConfigError(f"--mqtt-password-file {path!r}: cannot read it: {e.strerror or e}") from None
    data = data.rstrip(b"\r\n")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"--mqtt-password-file {path!r}: longer than {MAX_PASSWORD_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"--mqtt-password-file {path!r}: not UTF-8 text") from None


def mqtt_config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> MqttConfig | None:
    """The :class:`MqttConfig` of the ``--mqtt*`` options, or None without ``--mqtt``.

    Raises
    ------
    ConfigError
        A bad topic, a password without a user name, a password file that cannot be read,
        an ``--mqtt-*`` option without ``--mqtt``.
    """
    if args.mqtt is None:
        extra = [f"--{n.replace('_', '-')}" for n in ("mqtt_username", "mqtt_password_file", "mqtt_ca")
                 if getattr(args, n) is not None] + (["--mqtt-tls"] if args.mqtt_tls else [])
        if extra or args.mqtt_topic != DEFAULT_TOPIC:
            raise ConfigError(f"{(extra or ['--mqtt-topic'])[0]} needs --mqtt HOST[:PORT]")
        return None
    host, port = args.mqtt
    if args.mqtt_ca is not None and not args.mqtt_tls:
        raise ConfigError("--mqtt-ca needs --mqtt-tls")
    return MqttConfig(host=host, port=port or (DEFAULT_TLS_PORT if args.mqtt_tls else DEFAULT_PORT),
                      topic=args.mqtt_topic, qos=args.mqtt_qos, client_id=args.mqtt_client_id,
                      username=args.mqtt_username, password=read_password(args.mqtt_password_file, environ),
                      tls=args.mqtt_tls, ca_file=args.mqtt_ca)
