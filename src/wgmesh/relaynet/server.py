"""RelayServer: forwards frames between nodes by public key; also a STUN server.

One asyncio process serves, on one TCP port, the relay upgrade (``/relay``),
``GET /metrics`` (JSON counters) and ``GET /health``; on UDP (3478 by default)
it answers STUN Binding with :func:`wgmesh.stun.binding_response`.

Forwarding a SEND costs a dict lookup and one frame build: the destination's
:class:`~wgmesh.relaynet.stream.FrameStream` batches it with the other frames of
the same loop iteration. Every way a client can misbehave ends in a counted
drop or a close, never in shared state changing: unauthenticated frames,
unknown types, oversize lengths, floods past the rate limit, silence past the
idle timeout, a socket nobody reads (write timeout).

Mesh: with ``mesh_key`` and ``mesh_peers``, the server dials each peer relay
as a client that proves the mesh key, learns which nodes are connected there,
and forwards packets for them in one hop (see :mod:`wgmesh.relay`).

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

import argparse
import asyncio
import collections
import contextlib
import hmac
import json
import logging
import resource
import secrets
import ssl as _ssl
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from wgmesh import stun
from wgmesh.errors import WgmeshError
from wgmesh.keys import KEY_LEN, Key, PrivateKey, load_or_create_private_key
from wgmesh.relay import (
    CHALLENGE_LEN,
    GONE_DISCONNECTED,
    GONE_NOT_HERE,
    MAX_PACKET,
    PROTOCOL_VERSION,
    UPGRADE_TOKEN,
    FrameError,
    FrameType,
    encode_frame,
    frame_forward,
    frame_peer,
    frame_recv,
    frame_server_hello,
    open_client_hello,
    parse_forward,
)
from wgmesh.relaynet.connection import ConnectionKeeper, RelayConnectError, RelayConnection
from wgmesh.relaynet.stream import FrameStream

__all__ = ["RelayServer", "add_parser", "load_mesh_key"]

log = logging.getLogger("wgmesh.relay")

_RECV = bytes((FrameType.RECV,))
_MAX_INTEREST = 4096  # peers one client is told about when they come and go


def load_mesh_key(path: str | Path) -> bytes:
    """A region's mesh key: at least 32 bytes of hex in a file (``openssl rand -hex 32``)."""
    text = Path(path).read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError as e:
        raise WgmeshError(f"{path}: mesh key must be hex") from e
    if len(raw) < 32:
        raise WgmeshError(f"{path}: mesh key must be at least 32 bytes")
    return raw


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

    def __init__(self, server: RelayServer) -> None:
        super().__init__(queue_frames=server.queue_frames, write_timeout=server.write_timeout,
                         on_drop=server._drop)
        self.server = server
        self.state = "http"  # -> "hello" -> "node" | "mesh"
        self.key: bytes = b""
        self.challenge = b""
        self.preferred = False
        self.bucket = (_TokenBucket(server.rate_limit_bytes, server.rate_burst)
                       if server.rate_limit_bytes else None)
        self.interest: set[bytes] = set()  # peers this client sent to
        self.told_not_here: dict[bytes, float] = {}  # absent peer -> when we last said so

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._pending.add(self)

    def on_preamble(self, head: bytes) -> bool:
        return self.server._http(self, head)

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


class _MeshLink(ConnectionKeeper):
    """Our outbound connection to one mesh peer: presence in, FORWARD out."""

    def __init__(self, server: RelayServer, url: str) -> None:
        self.server = server
        self.url = url
        self.conn: RelayConnection | None = None
        self.keys: set[bytes] = set()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        srv = self.server
        backoff = 0.1
        while True:
            try:
                conn = await RelayConnection.open(
                    self.url, srv.private_key, mesh_key=srv.mesh_key, ssl=srv.mesh_ssl,
                    on_peer=self._on_peer, keepalive=srv.keepalive,
                    idle_timeout=srv.idle_timeout, queue_frames=srv.queue_frames * 4,
                    write_timeout=srv.write_timeout)
            except RelayConnectError as e:
                log.debug("mesh %s: %s", self.url, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if conn.server_key == srv.public_key:
                conn.close()
                log.info("mesh peer %s is this relay; not meshing with myself", self.url)
                return
            backoff = 0.1
            self.conn = conn
            srv.counters["mesh_links_up"] += 1
            await conn.wait_closed()
            self.conn = None
            for k in list(self.keys):
                self._forget(k)

    def _on_peer(self, key: Key, present: bool, reason: int) -> None:
        if present:
            self.keys.add(key.raw)
            self.server._remote[key.raw] = self
            self.server._announce_to_interested(key.raw, present=True)
        else:
            self._forget(key.raw)

    def _forget(self, raw: bytes) -> None:
        self.keys.discard(raw)
        srv = self.server
        if srv._remote.get(raw) is self:
            del srv._remote[raw]
            if raw not in srv._clients:
                srv._announce_to_interested(raw, present=False)



class RelayServer:
    """A relay. ``await start(...)``, then ``await close()``; or the CLI ``wgmesh relay serve``.

    ``rate_limit_bps`` limits what each node may *send*, in bits per second
    (``None``: unlimited). Timeouts are in seconds.
    """

    def __init__(self, private_key: PrivateKey | None = None, *,
                 mesh_key: bytes | None = None, mesh_peers: Sequence[str] = (),
                 mesh_ssl: _ssl.SSLContext | None = None,
                 control_url: str | None = None, relay_credential: str | None = None,
                 allow_refresh: float = 10.0,
                 rate_limit_bps: float | None = None, queue_frames: int = 256,
                 write_timeout: float = 5.0, keepalive: float = 20.0,
                 idle_timeout: float = 65.0, handshake_timeout: float = 10.0,
                 software: str = "wgmesh-relay") -> None:
        if mesh_peers and not mesh_key:
            raise WgmeshError("mesh peers need a mesh key")
        if control_url and not relay_credential:
            raise WgmeshError("an allow-list from control needs a relay credential")
        self.private_key = private_key or PrivateKey.generate()
        self.public_key = self.private_key.public
        self.mesh_key = mesh_key
        self.mesh_peer_urls = list(mesh_peers)
        self.mesh_ssl = mesh_ssl
        self.control_url = control_url.rstrip("/") if control_url else None
        self._credential = relay_credential
        self.allow_refresh = allow_refresh
        self.allowed: frozenset[bytes] | None = None
        self.rate_limit_bytes = (rate_limit_bps or 0) / 8
        self.rate_burst = max(self.rate_limit_bytes / 4, 2 * MAX_PACKET)
        self.queue_frames = queue_frames
        self.write_timeout = write_timeout
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.software = software
        self.counters: collections.Counter[str] = collections.Counter()
        self.drops: collections.Counter[str] = collections.Counter()
        self.port = 0
        self.stun_port = 0
        self._clients: dict[bytes, _Client] = {}
        self._mesh_in: set[_Client] = set()
        self._pending: set[_Client] = set()
        self._remote: dict[bytes, _MeshLink] = {}
        self._interested: dict[bytes, set[_Client]] = {}
        self._links: list[_MeshLink] = []
        self._server: asyncio.Server | None = None
        self._stun: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()

    # ---- life cycle ------------------------------------------------------------------
    async def start(self, host: str = "0.0.0.0", port: int = 0, *,
                    ssl: _ssl.SSLContext | None = None, stun_port: int | None = None) -> None:
        """Listen on ``host:port`` (0: any free port; see :attr:`port`).

        ``stun_port``: UDP port for STUN (``None``: no STUN; 0: any free port).
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host, port, ssl=ssl,
                                                reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        if stun_port is not None:
            self._stun, _ = await loop.create_datagram_endpoint(
                lambda: _StunResponder(self), local_addr=(host, stun_port))
            self.stun_port = self._stun.get_extra_info("sockname")[1]
        self._tasks.append(loop.create_task(self._sweep()))
        if self.control_url:
            self._tasks.append(loop.create_task(self._poll_allow_list()))
        self._links = [_MeshLink(self, u) for u in self.mesh_peer_urls]

    def add_mesh_peer(self, url: str) -> None:
        """Mesh with one more relay of the region (each relay dials every other one)."""
        if not self.mesh_key:
            raise WgmeshError("meshing needs a mesh key")
        self.mesh_peer_urls.append(url)
        self._links.append(_MeshLink(self, url))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for link in self._links:
            await link.close()
        if self._stun is not None:
            self._stun.close()
        if self._server is not None:
            self._server.close()
        for c in [*self._clients.values(), *self._mesh_in, *self._pending]:
            c.abort("server_closing")
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> RelayServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- metrics ---------------------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def metrics(self) -> dict[str, Any]:
        """Counters for ``GET /metrics``: current gauges, totals, drops by reason."""
        return {
            "server_key": self.public_key.b64(),
            "uptime": round(time.monotonic() - self._started, 3),
            "clients": len(self._clients),
            "home_clients": sum(1 for c in self._clients.values() if c.preferred),
            "mesh_peers_connected_in": len(self._mesh_in),
            "mesh_links_up": sum(1 for lk in self._links if lk.conn is not None),
            "remote_clients": len(self._remote),
            "pending_connections": len(self._pending),
            "allow_list_size": None if self.allowed is None else len(self.allowed),
            "counters": dict(self.counters),
            "drops": dict(self.drops),
        }

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

    @staticmethod
    def _respond(c: _Client, status: int, body: str, ctype: str = "text/plain") -> None:
        raw = body.encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  426: "Upgrade Required"}[status]
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
        except FrameError:
            c.abort("auth_failed")
            return
        key = hello.key.raw
        self._pending.discard(c)
        c.key = key
        mesh = hello.mesh_key
        if mesh is not None:
            if self.mesh_key is None or not hmac.compare_digest(mesh, self.mesh_key):
                self._close_with(c, "mesh key mismatch", "mesh_auth_failed")
                return
            c.state = "mesh"
            self._mesh_in.add(c)
            self._server_info(c)
            for k in self._clients:
                c.write_frame(frame_peer(FrameType.PEER_PRESENT, k))
        else:
            if (self.allowed is None and self.control_url) or (
                    self.allowed is not None and key not in self.allowed):
                self._close_with(c, "node not allowed by control", "not_allowed")
                return
            old = self._clients.get(key)
            if old is not None:
                self._close_with(old, "replaced by a newer connection", "replaced")
            c.state = "node"
            self._clients[key] = c
            self.counters["clients_accepted"] += 1
            self._server_info(c)
            self._broadcast_mesh(frame_peer(FrameType.PEER_PRESENT, key))
            self._announce_to_interested(key, present=True)
        if len(frames) > 1:
            c.on_frames(frames[1:])

    def _server_info(self, c: _Client) -> None:
        info = {"v": PROTOCOL_VERSION, "max_packet": MAX_PACKET, "keepalive": self.keepalive,
                "rate_limit_bps": self.rate_limit_bytes * 8 or None}
        c.write_frame(encode_frame(FrameType.SERVER_INFO, json.dumps(info).encode()))

    def _close_with(self, c: _Client, reason: str, counter: str) -> None:
        c.write_frame(encode_frame(FrameType.CLOSE, reason.encode()))
        self._drop(counter)
        c.close()

    # ---- forwarding ------------------------------------------------------------------
    def _node_frames(self, c: _Client, frames: list[tuple[int, bytes]]) -> None:
        counters = self.counters
        clients = self._clients
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
                if c.bucket is not None and not c.bucket.take(n, now):
                    self.drops["rate_limited"] += 1
                    continue
                dst = body[:KEY_LEN]
                if dst not in c.interest and len(c.interest) < _MAX_INTEREST:
                    c.interest.add(dst)
                    self._interested.setdefault(dst, set()).add(c)
                target = clients.get(dst)
                if target is not None:
                    target.write_frame(frame_recv(c.key, memoryview(body)[KEY_LEN:]))
                    counters["packets_out"] += 1
                    counters["bytes_out"] += n
                    continue
                link = self._remote.get(dst)
                if link is not None and link.conn is not None:
                    link.conn.write_frame(frame_forward(c.key, dst, memoryview(body)[KEY_LEN:]))
                    counters["packets_mesh_out"] += 1
                    continue
                self.drops["unknown_dest"] += 1
                if now - c.told_not_here.get(dst, -1.0) >= 1.0:  # one notice a second
                    if len(c.told_not_here) >= _MAX_INTEREST:
                        c.told_not_here.clear()
                    c.told_not_here[dst] = now
                    c.write_frame(frame_peer(FrameType.PEER_GONE, dst, GONE_NOT_HERE))
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
                target = self._clients.get(dst)
                counters["packets_mesh_in"] += 1
                if target is None:
                    self.drops["mesh_unknown_dest"] += 1  # never re-forwarded: one hop only
                    continue
                target.write_frame(frame_recv(src, packet))
                counters["packets_out"] += 1
                counters["bytes_out"] += len(packet)
            elif ftype == FrameType.PING:
                c.write_frame(encode_frame(FrameType.PONG, body[:8]))
            elif ftype not in (FrameType.KEEPALIVE, FrameType.PONG):
                c.abort("bad_frame")
                return

    def _broadcast_mesh(self, frame: bytes) -> None:
        for m in self._mesh_in:
            m.write_frame(frame)

    def _announce_to_interested(self, key: bytes, *, present: bool) -> None:
        frame = (frame_peer(FrameType.PEER_PRESENT, key) if present
                 else frame_peer(FrameType.PEER_GONE, key, GONE_DISCONNECTED))
        for c in self._interested.get(key, ()):
            c.write_frame(frame)

    def _closed(self, c: _Client) -> None:
        self._pending.discard(c)
        if c.state == "mesh":
            self._mesh_in.discard(c)
            return
        if c.state != "node":
            return
        for dst in c.interest:
            s = self._interested.get(dst)
            if s is not None:
                s.discard(c)
                if not s:
                    del self._interested[dst]
        if self._clients.get(c.key) is c:
            del self._clients[c.key]
            self._broadcast_mesh(frame_peer(FrameType.PEER_GONE, c.key, GONE_DISCONNECTED))
            if c.key not in self._remote:
                self._announce_to_interested(c.key, present=False)

    # ---- timers ----------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Once a second: handshake and idle timeouts; keepalives to quiet clients."""
        keepalive = encode_frame(FrameType.KEEPALIVE)
        last_keepalive = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.keepalive / 2))
            now = time.monotonic()
            for c in list(self._pending):
                if now - c.created > self.handshake_timeout:
                    self._pending.discard(c)
                    c.abort("handshake_timeout")
            for c in [*self._clients.values(), *self._mesh_in]:
                if now - c.last_rx > self.idle_timeout:
                    c.abort("idle_timeout")
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
                    async with http.get(url, headers=headers) as r:
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


class _StunResponder(asyncio.DatagramProtocol):
    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        srv = self.server
        srv.counters["stun_requests"] += 1
        reply = stun.binding_response(data, (addr[0], addr[1]), software=srv.software)
        if reply is None:
            srv.drops["stun_invalid"] += 1
            return
        srv.counters["stun_replies"] += 1
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.drops["stun_send_error"] += 1


# ---- CLI ---------------------------------------------------------------------------------
def _serve(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one fd per client
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    key = load_or_create_private_key(a.key_file)
    mesh_key = load_mesh_key(a.mesh_key_file) if a.mesh_key_file else None
    credential = (Path(a.relay_credential_file).read_text().strip()
                  if a.relay_credential_file else None)
    ssl_ctx = None
    if a.tls_cert or a.tls_key:
        if not (a.tls_cert and a.tls_key):
            raise WgmeshError("--tls-cert and --tls-key go together")
        ssl_ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(a.tls_cert, a.tls_key)
    mesh_ssl = _ssl.create_default_context(cafile=a.mesh_ca) if a.mesh_ca else None
    host, _, port = a.listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    async def run() -> None:
        srv = RelayServer(key, mesh_key=mesh_key, mesh_peers=a.mesh_peer, mesh_ssl=mesh_ssl,
                          control_url=a.control, relay_credential=credential,
                          rate_limit_bps=a.rate_limit * 1e6 if a.rate_limit else None)
        await srv.start(host, int(port), ssl=ssl_ctx,
                        stun_port=None if a.stun_port < 0 else a.stun_port)
        print(json.dumps({"listening": f"{host}:{srv.port}", "stun_port": srv.stun_port,
                          "server_key": srv.public_key.b64(), "tls": ssl_ctx is not None}),
              flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await srv.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wgmesh relay serve``."""
    relay = sub.add_parser("relay", help="encrypted-packet relay server (DERP-like) with STUN")
    rs = relay.add_subparsers(dest="relay_cmd", required=True)
    s = rs.add_parser("serve", help="run a relay (and STUN server) in the foreground")
    s.add_argument("--listen", default="0.0.0.0:3340", metavar="HOST:PORT",
                   help="TCP address for the relay and /metrics (default %(default)s)")
    s.add_argument("--stun-port", type=int, default=stun.DEFAULT_PORT,
                   help="UDP port for STUN on the same host (-1: off; default %(default)s)")
    s.add_argument("--key-file", default="/var/lib/wgmesh/relay.key",
                   help="the relay's long-term private key, created 0600 if missing")
    s.add_argument("--tls-cert", help="PEM certificate chain: serve https (e.g. on 443)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--mesh-key-file", help="hex mesh key shared by the relays of this region")
    s.add_argument("--mesh-peer", nargs="+", action="extend", default=[], metavar="URL",
                   help="the other relays of this region, e.g. http://203.0.113.11:3340"
                        " (list every other one: each relay dials each)")
    s.add_argument("--mesh-ca", help="CA bundle to verify https mesh peers")
    s.add_argument("--control", metavar="URL",
                   help="control service: accept only the nodes it lists")
    s.add_argument("--relay-credential-file", help="bearer credential for --control")
    s.add_argument("--rate-limit", type=float, metavar="MBIT/S",
                   help="per-node send limit in Mbit/s (default: none)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=_serve)
