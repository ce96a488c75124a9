"""RelayServer: forwards frames between nodes by public key; also a STUN server.

One asyncio process serves, on one TCP port, the relay upgrade (``/relay``),
``GET /metrics`` (JSON counters; Prometheus/OpenMetrics text to a client whose
``Accept`` asks for it, as Prometheus' does: :mod:`~wgmesh.relaynet.metrics`)
and ``GET /health``; on UDP (3478 by default)
it answers STUN Binding (:class:`~wgmesh.relaynet.stunserver.StunResponder`).

Forwarding a SEND costs a dict lookup and one frame build: the destination's
:class:`~wgmesh.relaynet.stream.FrameStream` batches it with the other frames of
the same loop iteration. Every way a client can misbehave ends in a counted
drop or a close, never in shared state changing: unauthenticated frames,
unknown types, oversize lengths, floods past the rate limit, silence past the
idle timeout, a socket nobody reads (write timeout).

Memory is bounded under abuse (any self-made key may connect when there is no
allow-list): connections in total (``max_connections``) and per source address
(``max_per_source``; an IPv6 source counts by its /64) are capped, and so is
what one connection can make the server hold: ``max_destinations`` keys it is
remembered to have talked to, ``queue_bytes`` queued for it while it does not
read; ``queue_budget`` caps what the queues of all connections hold together.
Everything a connection holds is dropped with it.

Presence is told only to those with a reason to know: a node hears that ``K``
came, left or is not here only if it sent to ``K`` and ``K`` sent to it during
its connection (mesh peers, which route by presence, hear every local node).
So a stranger cannot watch arbitrary keys come and go. ``GET /metrics`` answers
only ``metrics_allow`` networks (default: loopback and this host's own address).

Mesh: with ``mesh_key`` and ``mesh_peers``, the server dials each peer relay
as a client that proves the mesh key, learns which nodes are connected there,
and forwards packets for them in one hop (:mod:`wgmesh.relaynet.mesh`).

Workers: a relay of several processes (:mod:`wgmesh.relaynet.workers`) runs one
server per process; :meth:`RelayServer.serve_siblings` meshes it with the others over
UNIX sockets the same way, with a key of their own. A node reaches a node of a sibling
in one sibling hop, the region's other relays learn every worker's nodes from
whichever worker they dialled, the caps count across workers (``admission``) and
``GET /metrics`` sums every worker's numbers. A node that talks mostly with a node of
another worker has its connection moved there (:mod:`~wgmesh.relaynet.handoff`).

Allow-list (optional): with ``control_url`` and ``relay_credential`` (a
control API key of role ``relay``: ``wgmesh control apikey create --role
relay``) the server accepts only node keys the control service lists, polling
(see ``docs/control-api.yaml``)::

    GET {control_url}/v1/relay/nodes
    Authorization: Bearer <relay credential>
    -> 200 {"seq": N, "node_keys": ["<base64 node key>", ...]}

Until the first successful fetch it accepts nobody (fail closed); afterwards
it keeps the last list while control is unreachable, and disconnects nodes
that drop off it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl as _ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any

from wgmesh.errors import WgmeshError
from wgmesh.keys import KEY_LEN, Key, PrivateKey
from wgmesh.loopthread import LoopThread
from wgmesh.relay import (
    CHALLENGE_LEN,
    DELIVER_HEAD,
    GONE_DISCONNECTED,
    GONE_NOT_HERE,
    HEADER_LEN,
    MAX_FRAME,
    MAX_PACKET,
    NONCE_LEN,
    PROTOCOL_VERSION,
    UPGRADE_TOKEN,
    ClientHello,
    FrameError,
    FrameType,
    SendRun,
    encode_frame,
    frame_deliver,
    frame_forward,
    frame_peer,
    frame_recv,
    frame_server_hello,
    frame_server_info,
    open_client_hello,
    parse_deliver,
    parse_forward,
    split_frames,
)
from wgmesh.relaynet.admission import Admission, LocalAdmission
from wgmesh.relaynet.connection import OnPeer, RelayConnection
from wgmesh.relaynet.handoff import MAX_MESSAGE, Handoff, HandoffError, decode, encode, partner
from wgmesh.relaynet.mesh import MeshLink, RegionMesh
from wgmesh.relaynet.metrics import exposition, relay_registry, wants_prometheus
from wgmesh.relaynet.stream import QUEUE_BYTES, FrameStream, QueueBudget
from wgmesh.relaynet.stunserver import StunResponder
from wgmesh.urls import check_credential_url

__all__ = ["RelayServer"]

log = logging.getLogger("wgmesh.relay")

_RECV_OVERHEAD = HEADER_LEN + KEY_LEN  # a RECV frame's bytes beyond its packet
#: The header a worker's request for a sibling's own ``/metrics`` carries its token in.
WORKER_HEADER = b"x-wgmesh-worker"
#: /metrics of several workers: gauges that are the most of any worker's, not the sum
_WORKER_MAX = frozenset({"uptime", "remote_clients", "queue_max_bytes"})
#: ... and figures every worker already gives for the whole relay (the shared caps)
_WORKER_SAME = frozenset({"server_key", "connections", "sources", "allow_list_size"})
#: seconds a connection moved to another worker stays there whatever its traffic does, and
#: (shorter) that the worker it left still passes on a sibling's packets for it
MOVE_PIN, MOVED_FORWARD = 10.0, 5.0
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address, IPv4-mapped IPv6 read as IPv4; None if it is none (a UNIX socket)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _source_of(ip: str) -> str:
    """The unit a per-source cap counts: the address, or its /64 for IPv6 (one subscriber
    holds a whole /64)."""
    addr = _address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr or ip)


class _TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate_bytes: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate_bytes, burst, burst, time.monotonic()

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class _Client(FrameStream):
    """One inbound connection: HTTP, then handshake, then a node or a mesh peer."""

    def __init__(self, server: RelayServer, internal: bool = False) -> None:
        super().__init__(queue_frames=server.queue_frames, queue_bytes=server.queue_bytes,
                         budget=server.queue_budget, write_timeout=server.write_timeout,
                         on_drop=server._drop)
        self.server = server
        self.internal = internal  # came in on the workers' UNIX listener
        self.sibling = False  # a mesh link from another worker of this relay
        self.state = "http"  # -> "hello" -> "node" | "mesh"
        self.key: bytes = b""
        self.challenge = b""
        self.source = ""  # what the per-source cap counts; "" until admitted
        self.peer_ip = self.local_ip = ""
        self.preferred = False
        self.bucket = (_TokenBucket(server.rate_limit_bytes, server.rate_burst)
                       if server.rate_limit_bytes else None)
        self.interest: set[bytes] = set()  # peers this client sent to
        self.heard_from: set[bytes] = set()  # peers that sent to this client
        self.told_not_here: dict[bytes, float] = {}  # absent peer -> when we last said so
        self.since = 0  # monotonic ns when its hello was accepted (newest of a key wins)
        # affinity (workers): packets this interval, and those with nodes of other workers
        self.traffic = 0
        self.crossing: dict[bytes, int] = {}
        self.pinned_until = 0.0  # not moved to another worker before then
        self.adopted: bytes | None = None  # moved here: the frame it was in the middle of

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.adopted is not None:  # registered when it was handed over; frames only
            pending, self.adopted = self.adopted, None
            self.flush_output()
            if pending:
                self.data_received(pending)
            return
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        self.peer_ip = str(peer[0]) if peer else ""
        self.local_ip = str(local[0]) if local else ""
        self.server._admit(self)

    def knows(self, key: bytes) -> bool:
        """Has this client a reason to hear about ``key``: have they talked both ways?"""
        return key in self.heard_from and key in self.interest

    def on_preamble(self, head: bytes) -> bool:
        return self.server._http(self, head)

    def on_bytes(self, data: bytes) -> None:
        if self.state == "node" and self.bucket is None:  # the hot path: runs, not frames
            items = self.decoder.feed_relayed(data, self.key)
            if items:
                self.server._node_items(self, items)
        else:
            super().on_bytes(data)

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        srv = self.server
        if self.state == "node":
            srv._node_frames(self, frames)
        elif self.state == "mesh":
            srv._mesh_frames(self, frames)
        else:
            srv._hello(self, frames)

    def on_closed(self) -> None:
        self.server._closed(self)


class RelayServer:
    """A relay: ``await start()``, then ``await close()``; or ``with RelayServer(...) as srv:``
    on its own loop thread (scripts, notebooks, tests); or the CLI ``wgmesh relay serve``.

    ``host``/``port`` (0: any free port), ``ssl`` and ``stun_port`` (UDP port for
    STUN; ``None``: no STUN, 0: any free port) say where :meth:`start` listens
    unless it is told otherwise. ``rate_limit_bps`` limits what each node may
    *send*, in bits per second (``None``: unlimited). Timeouts are in seconds.
    The ``max_*`` and ``queue_*`` caps bound memory (module docstring);
    ``metrics_allow``: CIDRs that may read ``/metrics`` (``None``: this host only).
    ``admission`` counts the connection caps (default: in this process; a relay of
    several workers shares one across them). ``affinity_packets``: a worker of a relay of
    several moves a node's connection to the worker of the node it talks with once they
    exchange that many packets a second (0: never; :mod:`~wgmesh.relaynet.handoff`).
    """

    def __init__(self, private_key: PrivateKey | None = None, *,
                 host: str = "0.0.0.0", port: int = 0, ssl: _ssl.SSLContext | None = None,
                 stun_port: int | None = None,
                 mesh_key: bytes | None = None, mesh_peers: Sequence[str] = (),
                 mesh_ssl: _ssl.SSLContext | None = None,
                 control_url: str | None = None, relay_credential: str | None = None,
                 control_ssl: _ssl.SSLContext | None = None,
                 allow_refresh: float = 10.0,
                 rate_limit_bps: float | None = None, queue_frames: int = 256,
                 queue_bytes: int = QUEUE_BYTES, queue_budget: int = 256 * 1024 * 1024,
                 max_connections: int = 10_000, max_per_source: int = 1024,
                 max_destinations: int = 1024,
                 metrics_allow: Sequence[str] | None = None,
                 admission: Admission | None = None, affinity_packets: int = 500,
                 write_timeout: float = 5.0, keepalive: float = 20.0,
                 idle_timeout: float = 65.0, handshake_timeout: float = 10.0,
                 software: str = "wgmesh-relay") -> None:
        if mesh_peers and not mesh_key:
            raise WgmeshError("mesh peers need a mesh key")
        if control_url and not relay_credential:
            raise WgmeshError("an allow-list from control needs a relay credential")
        if control_url:
            check_credential_url(control_url, "control")  # the relay credential is a bearer token
        self.private_key = private_key or PrivateKey.generate()
        self.public_key = self.private_key.public
        self.host = host
        self.port = port
        self.ssl = ssl
        self._stun_listen = stun_port
        self.mesh_key = mesh_key
        self.mesh_peer_urls = list(mesh_peers)
        self.mesh_ssl = mesh_ssl
        self.control_url = control_url.rstrip("/") if control_url else None
        self._credential = relay_credential
        self._control_ssl = control_ssl  # a private CA for https:// control (None: system CAs)
        self.allow_refresh = allow_refresh
        self.allowed: frozenset[bytes] | None = None
        self.rate_limit_bytes = (rate_limit_bps or 0) / 8
        self.rate_burst = max(self.rate_limit_bytes / 4, 2 * MAX_PACKET)
        self.queue_frames = queue_frames
        self.queue_bytes = max(queue_bytes, 2 * MAX_PACKET)
        self.queue_budget = QueueBudget(max(queue_budget, self.queue_bytes))
        self.admission: Admission = admission or LocalAdmission(max_connections,
                                                                max_per_source)
        self.max_destinations = max_destinations
        self.affinity_packets = affinity_packets
        try:
            self.metrics_allow: tuple[_Network, ...] | None = None if metrics_allow is None \
                else tuple(ipaddress.ip_network(n.strip(), strict=False) for n in metrics_allow)
        except ValueError as e:
            raise WgmeshError(f"metrics allow-list: {e}") from e
        self.write_timeout = write_timeout
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.software = software
        self.counters: collections.Counter[str] = collections.Counter()
        self.drops: collections.Counter[str] = collections.Counter()
        self.stun_port = 0
        self.mesh = RegionMesh(self._dial_mesh, self.public_key, self._on_remote, self.counters)
        self.siblings = RegionMesh(self._dial_sibling, None, self._on_sibling, self.counters,
                                   "sibling_links_up")
        self.sibling_key: bytes | None = None
        self.sibling_sockets: dict[str, str] = {}  # a sibling's URL -> its UNIX socket
        self._clients: dict[bytes, _Client] = {}
        self._handoff: dict[str, socket.socket] = {}  # a sibling's URL -> our channel to it
        self._moved: dict[bytes, tuple[MeshLink, float]] = {}  # moved away: where, until
        self._adopting: set[asyncio.Task[Any]] = set()
        self._mesh_in: set[_Client] = set()
        self._pending: set[_Client] = set()
        self._internal: set[_Client] = set()  # on the workers' listener, not yet siblings
        self._interested: dict[bytes, set[_Client]] = {}
        self._servers: list[asyncio.Server] = []
        self._answers: set[asyncio.Task[None]] = set()  # /metrics of several workers
        self._stun: StunResponder | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._thread: LoopThread | None = None
        self._started = time.monotonic()
        self.registry = relay_registry(self.metrics)

    # ---- life cycle ------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None, *,
                    ssl: _ssl.SSLContext | None = None, stun_port: int | None = None,
                    sockets: Sequence[socket.socket] = (),
                    stun_sock: socket.socket | None = None) -> None:
        """Listen on ``host:port`` (0: any free port; then see :attr:`port`); ``::``: every
        address of both families (STUN then answers both on one dual-stack socket).

        ``stun_port``: UDP port for STUN (``None``: no STUN; 0: any free port).
        Arguments left out (``None``) are the constructor's. A worker of a relay of
        several serves listening ``sockets`` and ``stun_sock`` (or none) made for it instead.
        """
        host = self.host if host is None else host
        port = self.port if port is None else port
        ssl = self.ssl if ssl is None else ssl
        stun_port = self._stun_listen if stun_port is None else stun_port
        loop = asyncio.get_running_loop()
        if sockets:
            for sock in sockets:
                self._servers.append(await loop.create_server(
                    lambda: _Client(self), sock=sock, ssl=ssl, backlog=1024))
        else:
            hosts: str | list[str] = host
            if host == "::":  # every address of both families, one socket each: native sources
                if not port:
                    raise WgmeshError("listening on [::] (both families) needs a fixed port")
                hosts = ["0.0.0.0", "::"]
            self._servers.append(await loop.create_server(
                lambda: _Client(self), hosts, port, ssl=ssl, reuse_address=True, backlog=1024))
        self.port = self._servers[0].sockets[0].getsockname()[1]
        if stun_sock is not None or (stun_port is not None and not sockets):
            self._stun = await StunResponder.listen(host, stun_port or 0, sock=stun_sock,
                                                    software=self.software,
                                                    counters=self.counters, drops=self.drops)
            self.stun_port = self._stun.port
        self._tasks.append(loop.create_task(self._sweep()))
        if self.control_url:
            self._tasks.append(loop.create_task(self._poll_allow_list()))
        for url in self.mesh_peer_urls:
            self.mesh.add(url)

    async def serve_siblings(self, sock: socket.socket, key: bytes, paths: Sequence[str],
                             handoff: Sequence[socket.socket] = ()) -> None:
        """Be one worker of a relay of several: accept the other workers on the UNIX
        listener ``sock`` (proving ``key``, theirs and ours) and dial each of them at its
        UNIX socket in ``paths`` (a UNIX socket: cheaper per byte than TCP on loopback).
        ``handoff``: a ``SOCK_SEQPACKET`` channel to each of them, in the order of
        ``paths``, that node connections move over (:mod:`~wgmesh.relaynet.handoff`)."""
        self.sibling_key = key
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(
            lambda: _Client(self, internal=True), sock=sock, backlog=64))
        for i, path in enumerate(paths):
            url = f"http://worker{i}"
            self.sibling_sockets[url] = path
            self.siblings.add(url)
        for i, chan in enumerate(handoff):
            self._handoff[f"http://worker{i}"] = chan
            loop.add_reader(chan.fileno(), self._take_handoffs, chan)

    def add_mesh_peer(self, url: str) -> None:
        """Mesh with one more relay of the region (each relay dials every other one)."""
        if not self.mesh_key:
            raise WgmeshError("meshing needs a mesh key")
        self.mesh_peer_urls.append(url)
        self.mesh.add(url)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for chan in self._handoff.values():
            loop.remove_reader(chan.fileno())
        for t in [*self._tasks, *self._answers]:
            t.cancel()
        await self.mesh.close()
        await self.siblings.close()
        if self._stun is not None:
            self._stun.close()
        for server in self._servers:
            server.close()
        for c in [*self._clients.values(), *self._mesh_in, *self._pending, *self._internal]:
            c.abort("server_closing")
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)
        await asyncio.gather(*self._tasks, *self._answers, return_exceptions=True)

    async def __aenter__(self) -> RelayServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> RelayServer:
        """Start on a :class:`~wgmesh.loopthread.LoopThread` of its own; stop on exit."""
        thread = LoopThread("wgmesh-relay-server")
        thread.start_with(self.start(), timeout=30)
        self._thread = thread
        return self

    def __exit__(self, *exc: object) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop_with(self.close(), timeout=30)

    async def _dial_mesh(self, url: str, on_peer: OnPeer) -> RelayConnection:
        return await RelayConnection.open(
            url, self.private_key, mesh_key=self.mesh_key, ssl=self.mesh_ssl, on_peer=on_peer,
            keepalive=self.keepalive, idle_timeout=self.idle_timeout,
            queue_frames=self.queue_frames * 4, write_timeout=self.write_timeout)

    async def _dial_sibling(self, url: str, on_peer: OnPeer) -> RelayConnection:
        return await RelayConnection.open(
            url, self.private_key, mesh_key=self.sibling_key, on_peer=on_peer,
            unix=self.sibling_sockets[url],
            keepalive=self.keepalive, idle_timeout=self.idle_timeout,
            queue_frames=self.queue_frames * 4, write_timeout=self.write_timeout)

    def _on_remote(self, key: bytes, present: bool, since: int) -> None:
        if present or not self._here(key):
            self._announce_to_interested(key, present=present)

    def _on_sibling(self, key: bytes, present: bool, since: int) -> None:
        """A node came to, or left, another worker of this relay."""
        old = self._clients.get(key) if present else None
        if old is not None and old.since < since:  # it connected again, to a sibling
            self._close_with(old, "replaced by a newer connection", "replaced")
        if present or (key not in self._clients and key not in self.mesh.remote):
            self._announce_to_interested(key, present=present)
        if present or key not in self._clients:  # the region sees the workers as one relay
            self._tell_mesh(key, present=present, siblings=False)

    def _here(self, key: bytes) -> bool:
        """Is ``key`` connected to this relay (this worker or another)?"""
        return key in self._clients or key in self.siblings.remote

    def _admit(self, c: _Client) -> None:
        """Count a new connection against the caps, or refuse it at once. The workers'
        UNIX listener is not capped: only their links and local readers of
        ``/metrics`` come there, and at most 64 at once."""
        if c.internal:
            if len(self._internal) >= 64:
                c.abort("too_many_connections")
            else:
                self._internal.add(c)
            return
        source = _source_of(c.peer_ip)
        refused = self.admission.admit(source)
        if refused:
            c.abort(refused)
        else:
            c.source = source
            self._pending.add(c)

    # ---- metrics ---------------------------------------------------------------------
    def _drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n

    def metrics(self) -> dict[str, Any]:
        """Counters for ``GET /metrics``: current gauges, totals, drops by reason."""
        return {
            "server_key": self.public_key.b64(),
            "uptime": round(time.monotonic() - self._started, 3),
            "clients": len(self._clients),
            "home_clients": sum(1 for c in self._clients.values() if c.preferred),
            "mesh_peers_connected_in": sum(1 for c in self._mesh_in if not c.sibling),
            "mesh_links_up": self.mesh.links_up,
            "remote_clients": len(self.mesh.remote),
            "pending_connections": len(self._pending),
            "connections": self.admission.connections,
            "sources": self.admission.sources,
            "destinations": sum(len(c.interest) + len(c.heard_from)
                                for c in self._clients.values()),
            "queued_bytes": self.queue_budget.used,
            "queue_max_bytes": max((c.queued_bytes for c in self._clients.values()), default=0),
            "allow_list_size": None if self.allowed is None else len(self.allowed),
            "counters": dict(self.counters),
            "drops": dict(self.drops),
        }

    def _worker_token(self) -> bytes:
        """What a sibling shows to read this worker's own ``/metrics`` over the workers'
        UNIX listener: derived from the run's sibling key, which only the workers hold."""
        if self.sibling_key is None:
            return secrets.token_hex(32).encode()  # matches nothing: no siblings
        return hmac.new(self.sibling_key, b"wgmesh worker metrics", hashlib.sha256
                        ).hexdigest().encode()

    async def _worker_metrics(self, path: str) -> dict[str, Any] | None:
        """Another worker's own ``/metrics`` from its UNIX listener (None: no answer)."""
        try:
            async with asyncio.timeout(2):
                r, w = await asyncio.open_unix_connection(path)
                w.write(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n" + WORKER_HEADER +
                        b": " + self._worker_token() + b"\r\n\r\n")
                data = await r.read(1 << 20)
                w.close()
            doc: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
        except (OSError, TimeoutError, ValueError):
            return None
        return doc

    async def relay_metrics(self) -> dict[str, Any]:
        """:meth:`metrics` of the whole relay: every worker's summed (``workers`` says how
        many answered), the caps' figures as every worker has them."""
        total = self.metrics()
        others = await asyncio.gather(*map(self._worker_metrics,
                                           self.sibling_sockets.values()))
        for m in others:
            if m is None:
                continue
            for k, v in m.items():
                if k in ("counters", "drops"):
                    total[k] = dict(collections.Counter(total[k]) + collections.Counter(v))
                elif k in _WORKER_MAX:
                    total[k] = max(total[k], v)
                elif k not in _WORKER_SAME:
                    total[k] += v
        total["workers"] = 1 + sum(m is not None for m in others)
        return total

    async def _answer_metrics(self, c: _Client, accept: str) -> None:
        m = await self.relay_metrics()
        if wants_prometheus(accept):
            self._respond(c, 200, *exposition(relay_registry(lambda: m), accept))
        else:
            self._respond(c, 200, json.dumps(m), "application/json")

    # ---- HTTP ------------------------------------------------------------------------
    def _http(self, c: _Client, head: bytes) -> bool:
        self.counters["http_requests"] += 1
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.drops["bad_http"] += 1
            self._respond(c, 400, "bad request")
            return False
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            self._respond(c, 405, "method not allowed")
            return False
        if path == b"/metrics":
            accept = headers.get(b"accept", b"").decode("latin-1")
            if c.internal:  # a sibling summing the workers' figures: this worker's own
                if hmac.compare_digest(headers.get(WORKER_HEADER, b""), self._worker_token()):
                    self._respond(c, 200, json.dumps(self.metrics()), "application/json")
                else:  # any local process can reach the abstract socket: siblings only
                    self.drops["metrics_forbidden"] += 1
                    self._respond(c, 403, "metrics are not served to this address")
            elif not self._metrics_allowed(c):
                self.drops["metrics_forbidden"] += 1
                self._respond(c, 403, "metrics are not served to this address")
            elif self.sibling_sockets:
                task = asyncio.get_running_loop().create_task(self._answer_metrics(c, accept))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            elif wants_prometheus(accept):
                self._respond(c, 200, *exposition(self.registry, accept))
            else:
                self._respond(c, 200, json.dumps(self.metrics()), "application/json")
            return False
        if path == b"/health":
            self._respond(c, 200, "ok")
            return False
        if path != b"/relay":
            self._respond(c, 404, "not found")
            return False
        if headers.get(b"upgrade", b"").lower() != UPGRADE_TOKEN.encode():
            self._respond(c, 426, f"upgrade to {UPGRADE_TOKEN} required")
            self.drops["bad_http"] += 1
            return False
        c.write_raw(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
                    "Connection: Upgrade\r\n\r\n".encode())
        c.state = "hello"
        c.challenge = secrets.token_bytes(CHALLENGE_LEN)
        c.write_frame(frame_server_hello(self.public_key, c.challenge))
        return True

    def _metrics_allowed(self, c: _Client) -> bool:
        ip = _address(c.peer_ip)
        if ip is None:
            return False
        if self.metrics_allow is None:  # this host: loopback, or from our own address
            return ip.is_loopback or c.peer_ip == c.local_ip
        return any(ip in n for n in self.metrics_allow)

    @staticmethod
    def _respond(c: _Client, status: int, body: str, ctype: str = "text/plain") -> None:
        raw = body.encode()
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                  405: "Method Not Allowed", 426: "Upgrade Required"}[status]
        c.write_raw(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode() + raw)
        c.close()

    # ---- handshake -------------------------------------------------------------------
    def _hello(self, c: _Client, frames: list[tuple[int, bytes]]) -> None:
        ftype, body = frames[0]
        if ftype != FrameType.CLIENT_HELLO:
            c.abort("unauthenticated")
            return
        try:
            hello = open_client_hello(self.private_key, c.challenge, body)
        except FrameError as e:  # a clear answer and a counter; no traceback, no log line
            self._close_with(c, f"hello refused: {e}", "auth_failed")
            return
        key = hello.key.raw
        self._pending.discard(c)
        self._internal.discard(c)
        c.key = key
        if hello.wants_mesh:
            mesh_key = self.sibling_key if c.internal else self.mesh_key
            if mesh_key is None or not hello.proves_mesh_key(mesh_key, self.public_key):
                self._close_with(c, "mesh key mismatch", "mesh_auth_failed")
                return
            c.state = "mesh"
            c.sibling = c.internal
            self._mesh_in.add(c)
            self._server_info(c, hello, mesh_key=mesh_key)
            # a sibling hears this worker's nodes; the region's relays the whole relay's
            for k, n in self._clients.items():
                c.write_frame(frame_peer(FrameType.PEER_PRESENT, k,
                                         since=n.since if c.sibling else 0))
            for k in () if c.sibling else self.siblings.remote.keys() - self._clients.keys():
                c.write_frame(frame_peer(FrameType.PEER_PRESENT, k))
        elif c.internal:
            self._close_with(c, "this listener is for the relay's own workers", "not_allowed")
            return
        else:
            if (self.allowed is None and self.control_url) or (
                    self.allowed is not None and key not in self.allowed):
                self._close_with(c, "node not allowed by control", "not_allowed")
                return
            old = self._clients.get(key)
            if old is not None:
                self._close_with(old, "replaced by a newer connection", "replaced")
            c.state = "node"
            c.since = time.monotonic_ns()
            self._clients[key] = c
            self.counters["clients_accepted"] += 1
            self._server_info(c, hello)
            self._tell_mesh(key, present=True, since=c.since)
            self._announce_to_interested(key, present=True)
        if len(frames) > 1:
            c.on_frames(frames[1:])

    def _server_info(self, c: _Client, hello: ClientHello, *,
                     mesh_key: bytes | None = None) -> None:
        info = {"v": PROTOCOL_VERSION, "max_packet": MAX_PACKET, "keepalive": self.keepalive,
                "rate_limit_bps": self.rate_limit_bytes * 8 or None}
        c.write_frame(frame_server_info(self.private_key, hello, info,
                                        nonce=secrets.token_bytes(NONCE_LEN),
                                        mesh_key=mesh_key))

    def _close_with(self, c: _Client, reason: str, counter: str) -> None:
        c.write_frame(encode_frame(FrameType.CLOSE, reason.encode()))
        self._drop(counter)
        c.close()

    # ---- forwarding ------------------------------------------------------------------
    def _node_items(self, c: _Client, items: list[SendRun | tuple[int, bytes]]) -> None:
        """A node's frames as :meth:`FrameDecoder.feed_relayed` gives them: runs of
        packets for one destination go out in one write each."""
        for item in items:
            if c.closed:
                return
            if isinstance(item, SendRun):
                self._node_run(c, item)
            else:
                self._node_frames(c, [item])

    def _node_run(self, c: _Client, run: SendRun) -> None:
        dst, counters = run.dst, self.counters
        target = self._clients.get(dst)
        link = None if target is not None else self.siblings.route(dst)
        if target is None and link is None and self.mesh.route(dst) is None:
            self._nobody(c, run)
            return
        if target is None and (link is None or len(run.frames) + DELIVER_HEAD > MAX_FRAME):
            # another relay of the region: packet by packet, as without runs
            self._node_frames(c, [(FrameType.SEND, dst + frame[_RECV_OVERHEAD:])
                                  for frame in split_frames(run.frames)])
            return
        counters["packets_in"] += run.count
        counters["bytes_in"] += run.payload
        cap = self.max_destinations
        if dst not in c.interest and len(c.interest) < cap:
            c.interest.add(dst)
            self._interested.setdefault(dst, set()).add(c)
        c.traffic += run.count
        if target is not None:
            if c.key not in target.heard_from and len(target.heard_from) < cap:
                target.heard_from.add(c.key)
            target.write_frames(run.frames, run.count)
            target.traffic += run.count
            counters["packets_out"] += run.count
            counters["bytes_out"] += run.payload
        elif link is not None:
            link.write_frames(frame_deliver(c.key, dst, run.count, run.frames), run.count)
            counters["packets_sibling_out"] += run.count
            c.crossing[dst] = c.crossing.get(dst, 0) + run.count
            link.hold(c)  # while the other worker falls behind, read this node no further

    def _nobody(self, c: _Client, run: SendRun) -> None:
        """A run for a key connected nowhere in the region: dropped whole, counted as its
        packets (no per-packet work for a flood at a node that left)."""
        self.counters["packets_in"] += run.count
        self.counters["bytes_in"] += run.payload
        self.drops["unknown_dest"] += run.count
        self._not_here(c, run.dst, time.monotonic())

    def _not_here(self, c: _Client, dst: bytes, now: float) -> None:
        """Tell ``c`` that ``dst`` is not here, at most once a second, if they talked."""
        cap = self.max_destinations
        if dst not in c.interest and len(c.interest) < cap:
            c.interest.add(dst)
            self._interested.setdefault(dst, set()).add(c)
        if c.knows(dst) and now - c.told_not_here.get(dst, -1.0) >= 1.0:
            if len(c.told_not_here) >= cap:
                c.told_not_here.clear()
            c.told_not_here[dst] = now
            c.write_frame(frame_peer(FrameType.PEER_GONE, dst, GONE_NOT_HERE))

    def _node_frames(self, c: _Client, frames: list[tuple[int, bytes]]) -> None:
        counters = self.counters
        clients = self._clients
        cap = self.max_destinations
        now = time.monotonic()
        for ftype, body in frames:
            if c.closed:
                return
            if ftype == FrameType.SEND:
                n = len(body) - KEY_LEN
                if n < 0 or n > MAX_PACKET:
                    c.abort("bad_frame")
                    return
                counters["packets_in"] += 1
                counters["bytes_in"] += n
                c.traffic += 1
                if c.bucket is not None and not c.bucket.take(n, now):
                    self.drops["rate_limited"] += 1
                    continue
                dst = body[:KEY_LEN]
                if dst not in c.interest and len(c.interest) < cap:
                    c.interest.add(dst)
                    self._interested.setdefault(dst, set()).add(c)
                target = clients.get(dst)
                if target is not None:
                    if c.key not in target.heard_from and len(target.heard_from) < cap:
                        target.heard_from.add(c.key)
                    target.write_frame(frame_recv(c.key, memoryview(body)[KEY_LEN:]))
                    target.traffic += 1
                    counters["packets_out"] += 1
                    counters["bytes_out"] += n
                    continue
                sibling = self.siblings.route(dst)
                if sibling is not None:
                    sibling.write_frame(frame_forward(c.key, dst, memoryview(body)[KEY_LEN:]))
                    counters["packets_sibling_out"] += 1
                    c.crossing[dst] = c.crossing.get(dst, 0) + 1
                    continue
                hop = self.mesh.route(dst)
                if hop is not None:
                    hop.write_frame(frame_forward(c.key, dst, memoryview(body)[KEY_LEN:]))
                    counters["packets_mesh_out"] += 1
                    continue
                self.drops["unknown_dest"] += 1
                self._not_here(c, dst, now)
            elif ftype == FrameType.KEEPALIVE:
                pass
            elif ftype == FrameType.PING:
                c.write_frame(encode_frame(FrameType.PONG, body[:8]))
            elif ftype == FrameType.NOTE_PREFERRED:
                c.preferred = body[:1] == b"\x01"
            elif ftype == FrameType.PONG:
                pass
            else:
                c.abort("bad_frame")
                return

    def _mesh_frames(self, c: _Client, frames: list[tuple[int, bytes]]) -> None:
        """FORWARD from the region's relays, FORWARD and DELIVER from this relay's other
        workers: for our own nodes only, but for a sibling's node when a region relay
        sent it to us (the region sees the workers as one relay)."""
        counters = self.counters
        for ftype, body in frames:
            if c.closed:
                return
            if ftype == FrameType.FORWARD:
                try:
                    src, dst, packet = parse_forward(body)
                except FrameError:
                    c.abort("bad_frame")
                    return
                counters["packets_sibling_in" if c.sibling else "packets_mesh_in"] += 1
                target = self._local(dst, c)
                if target is None:
                    link = self._moved_to(dst) if c.sibling else self.siblings.route(dst)
                    if link is not None:
                        link.write_frame(encode_frame(FrameType.FORWARD, body))
                        counters["packets_sibling_out"] += 1
                    else:
                        self.drops["mesh_unknown_dest"] += 1  # never re-forwarded further
                    continue
                self._deliver(target, src, 1, len(packet), frame_recv(src, packet),
                              c.sibling)
            elif ftype == FrameType.DELIVER and c.sibling:
                try:
                    src, dst, count, run = parse_deliver(body)
                except FrameError:
                    c.abort("bad_frame")
                    return
                counters["packets_sibling_in"] += count
                target = self._local(dst, c)
                if target is None:
                    link = self._moved_to(dst)
                    if link is not None:  # it moved on a moment ago: one hop more
                        link.write_frame(encode_frame(FrameType.DELIVER, body))
                        counters["packets_sibling_out"] += count
                    else:
                        self.drops["mesh_unknown_dest"] += count
                    continue
                self._deliver(target, src, count, len(run) - count * _RECV_OVERHEAD, run, True)
            elif ftype == FrameType.PING:
                c.write_frame(encode_frame(FrameType.PONG, body[:8]))
            elif ftype not in (FrameType.KEEPALIVE, FrameType.PONG):
                c.abort("bad_frame")
                return

    def _deliver(self, target: _Client, src: bytes, count: int, payload: int,
                 frames: bytes, from_sibling: bool) -> None:
        """``count`` RECV frames from ``src``, that came over a mesh link, to a node here."""
        if src not in target.heard_from and len(target.heard_from) < self.max_destinations:
            target.heard_from.add(src)
        target.write_frames(frames, count)
        target.traffic += count
        if from_sibling:
            target.crossing[src] = target.crossing.get(src, 0) + count
        self.counters["packets_out"] += count
        self.counters["bytes_out"] += payload

    def _local(self, dst: bytes, link: _Client) -> _Client | None:
        """Our node ``dst``, including one a sibling has just handed over whose handoff
        we have not read yet (it was sent before any packet for it; ``link`` is where the
        packet came from)."""
        target = self._clients.get(dst)
        if target is None and link.sibling and self._handoff:
            for chan in self._handoff.values():
                self._take_handoffs(chan)
            target = self._clients.get(dst)
        return target

    def _moved_to(self, key: bytes) -> RelayConnection | None:
        """The link to the worker our node ``key`` moved to in the last MOVED_FORWARD
        seconds (a third worker may still send its packets here)."""
        moved = self._moved.get(key)
        return None if moved is None else moved[0].conn

    # ---- affinity: a node's connection moves to the worker of the node it talks with ---
    def _rebalance(self, now: float) -> None:
        """Once an interval: every node that talked mostly with one node of another worker
        and is the one of the pair to move (:func:`~wgmesh.relaynet.handoff.partner`)
        goes to that worker."""
        for k in [k for k, (_, until) in self._moved.items() if until < now]:
            del self._moved[k]
        for c in list(self._clients.values()):
            crossing, c.crossing = c.crossing, {}
            traffic, c.traffic = c.traffic, 0
            if not crossing or now < c.pinned_until or not self.affinity_packets:
                continue
            peer = partner(c.key, crossing, traffic, self.affinity_packets)
            link = None if peer is None else self.siblings.remote.get(peer)
            if link is not None:
                self._hand_over(c, link, now)

    def _hand_over(self, c: _Client, link: MeshLink, now: float) -> None:
        """Move node ``c``'s connection to the worker at the other end of ``link``: its
        socket and state over the handoff channel, then its packets over ``link`` until
        that worker says the node is there. Not a connection over TLS (its session cannot
        leave this process) nor one with output not yet written (tried again later)."""
        chan, t, conn = self._handoff.get(link.url), c.transport, link.conn
        if chan is None or t is None or conn is None or c.closed:
            return
        if t.get_extra_info("ssl_object") is not None:
            self.counters["clients_kept_tls"] += 1
            return
        if not c.flush_output():
            return
        conn.flush_output()  # what it sent before goes first, as far as we can help it
        msg = encode(Handoff(c.key, c.preferred, c.decoder.pending, tuple(c.interest),
                             tuple(c.heard_from)))
        try:
            socket.send_fds(chan, [msg], [t.get_extra_info("socket").fileno()])
        except OSError as e:  # the channel is full or gone: the node stays here
            self.drops["handoff_failed"] += 1
            log.debug("handing %s over failed: %s", Key(c.key).b64(), e)
            return
        c.state = "moved"
        del self._clients[c.key]
        link.keys.add(c.key)
        self.siblings.remote[c.key] = link
        self._moved[c.key] = (link, now + MOVED_FORWARD)
        self.counters["clients_moved_out"] += 1
        c.closed = True
        t.abort()  # closes our descriptor only: the connection lives on in the sibling

    def _take_handoffs(self, chan: socket.socket) -> None:
        """Adopt every connection a sibling handed us over ``chan``."""
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("handoff channel: %s", e)
                return
            if not msg and not fds:  # the supervisor is gone; we follow it soon
                asyncio.get_running_loop().remove_reader(chan.fileno())
                return
            self._adopt(msg, fds)

    def _adopt(self, msg: bytes, fds: list[int]) -> None:
        try:
            h = decode(msg)
            if len(fds) != 1:
                raise HandoffError("a handoff carries one connection")
        except HandoffError:
            for fd in fds:
                os.close(fd)
            self.drops["bad_handoff"] += 1
            return
        sock = socket.socket(fileno=fds[0])
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                      socket.AF_INET6):
                raise HandoffError("not a TCP connection")
            peer, local = sock.getpeername(), sock.getsockname()
        except (HandoffError, OSError):  # OSError: the node hung up on the way
            sock.close()
            self.drops["bad_handoff"] += 1
            return
        if h.key in self._clients:  # it connected again meanwhile: the newer one wins
            sock.close()
            self._drop("replaced")
            return
        sock.setblocking(False)
        c = _Client(self)
        c.adopted, c.key, c.state, c.preferred = h.pending, h.key, "node", h.preferred
        c.skip_preamble()
        c.peer_ip, c.local_ip = str(peer[0]), str(local[0])
        c.source = _source_of(c.peer_ip)
        self.admission.admit(c.source, force=True)  # admitted once: moving is no new connection
        c.heard_from.update(h.heard_from[:self.max_destinations])
        c.interest.update(h.interest[:self.max_destinations])
        for dst in c.interest:
            self._interested.setdefault(dst, set()).add(c)
        c.since = time.monotonic_ns()
        c.pinned_until = time.monotonic() + MOVE_PIN
        self._clients[h.key] = c
        self.counters["clients_moved_in"] += 1
        self._tell_mesh(h.key, present=True, since=c.since)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: c, sock))
        self._adopting.add(task)
        task.add_done_callback(lambda t: self._adopted(t, c, sock))

    def _adopted(self, task: asyncio.Task[Any], c: _Client, sock: socket.socket) -> None:
        self._adopting.discard(task)
        if task.cancelled() or task.exception() is not None:
            log.warning("adopting a connection failed: %s", task.exception()
                        if not task.cancelled() else "cancelled")
            sock.close()
            c.closed = True
            self._closed(c)

    def _tell_mesh(self, key: bytes, *, present: bool, region: bool = True,
                   siblings: bool = True, since: int = 0) -> None:
        """Presence of ``key`` to the ``region``'s relays and the ``siblings`` (workers)
        that dialled us; the siblings hear ``since`` too."""
        frame = (frame_peer(FrameType.PEER_PRESENT, key) if present
                 else frame_peer(FrameType.PEER_GONE, key, GONE_DISCONNECTED))
        to_siblings = frame_peer(FrameType.PEER_PRESENT, key, since=since) if since else frame
        for m in self._mesh_in:
            if siblings if m.sibling else region:
                m.write_frame(to_siblings if m.sibling else frame)

    def _announce_to_interested(self, key: bytes, *, present: bool) -> None:
        frame = (frame_peer(FrameType.PEER_PRESENT, key) if present
                 else frame_peer(FrameType.PEER_GONE, key, GONE_DISCONNECTED))
        for c in self._interested.get(key, ()):
            if c.knows(key):
                c.write_frame(frame)

    def _closed(self, c: _Client) -> None:
        self._pending.discard(c)
        self._internal.discard(c)
        if c.source:
            self.admission.release(c.source)
        if c.state == "mesh":
            self._mesh_in.discard(c)
            return
        if c.state not in ("node", "moved"):
            return
        for dst in c.interest:
            s = self._interested.get(dst)
            if s is not None:
                s.discard(c)
                if not s:
                    del self._interested[dst]
        if c.state == "node" and self._clients.get(c.key) is c:
            del self._clients[c.key]
            # the region still reaches a node that is on a sibling too through us
            self._tell_mesh(c.key, present=False, region=c.key not in self.siblings.remote)
            if not self._here(c.key) and c.key not in self.mesh.remote:
                self._announce_to_interested(c.key, present=False)

    # ---- timers ----------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Once a second: handshake and idle timeouts; keepalives to quiet clients."""
        keepalive = encode_frame(FrameType.KEEPALIVE)
        last_keepalive = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.keepalive / 2))
            now = time.monotonic()
            for c in [*self._pending, *self._internal]:
                if now - c.created > self.handshake_timeout:
                    self._pending.discard(c)
                    self._internal.discard(c)
                    c.abort("handshake_timeout")
            for c in [*self._clients.values(), *self._mesh_in]:
                if now - c.last_rx > self.idle_timeout:
                    c.abort("idle_timeout")
            if self._handoff:
                self._rebalance(now)
            if now - last_keepalive >= self.keepalive:
                last_keepalive = now
                for c in [*self._clients.values(), *self._mesh_in]:
                    c.write_frame(keepalive)

    async def _poll_allow_list(self) -> None:
        import aiohttp

        url = f"{self.control_url}/v1/relay/nodes"
        headers = {"Authorization": f"Bearer {self._credential}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while True:
                try:
                    async with http.get(url, headers=headers,
                                        ssl=self._control_ssl or True) as r:
                        r.raise_for_status()
                        doc = await r.json()
                    self.set_allowed(Key(k) for k in doc["node_keys"])
                    self.counters["allow_list_fetches"] += 1
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
                    self.drops["allow_list_fetch_failed"] += 1
                    log.warning("allow-list fetch from %s failed: %s", url, e)
                await asyncio.sleep(self.allow_refresh)

    def set_allowed(self, keys: Iterable[Key] | None) -> None:
        """Accept only ``keys`` from now on (``None``: everyone); drop nodes not in it."""
        self.allowed = None if keys is None else frozenset(k.raw for k in keys)
        if self.allowed is None:
            return
        for k, c in list(self._clients.items()):
            if k not in self.allowed:
                self._close_with(c, "node no longer allowed by control", "not_allowed")
