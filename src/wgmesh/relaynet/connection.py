"""One authenticated client connection to one relay (nodes and mesh links use it).

:meth:`RelayConnection.open` does TCP (+TLS), the HTTP upgrade and the
challenge handshake, and returns once the server has accepted our key and
proved its own (the one pinned by ``#KEY`` in the URL, if any: a relay that
names another key is refused before we send a byte of the hello). After
that, frames are delivered to the callbacks synchronously from the event loop;
the connection sends keepalives and aborts itself when the server falls silent
(a half-open TCP connection looks alive forever otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl as _ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import (
    NONCE_LEN,
    FrameError,
    FrameType,
    RelayURL,
    encode_frame,
    frame_client_hello,
    frame_send,
    open_server_info,
    parse_peer,
    parse_server_hello,
    split_key,
)
from wgmesh.relaynet.stream import FrameStream
from wgmesh.sockaddr import plain_ip

__all__ = ["MakeSocket", "OnPeer", "RelayConnectError", "RelayConnection", "connect_socket"]

OnRecv = Callable[[Key, bytes], None]
MakeSocket = Callable[[int], socket.socket]
OnPeer = Callable[[Key, bool, int], None]  # key, present, reason (PRESENT: since, see relay.py)


async def connect_socket(make_socket: MakeSocket, host: str, port: int) -> socket.socket:
    """A TCP socket from ``make_socket``, connected without blocking the loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = make_socket(family)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class RelayConnectError(WgmeshError):
    """The relay could not be reached, or refused us."""


class ConnectionKeeper:
    """Something that runs a task keeping one :class:`RelayConnection` up (a client's
    region link, a relay's mesh link); closing stops the task, then the connection."""

    task: asyncio.Task[None]
    conn: RelayConnection | None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.conn is not None:
            self.conn.close()


class RelayConnection(FrameStream):
    """A client's connection to one relay. Create with :meth:`open`."""

    def __init__(self, url: RelayURL, private_key: PrivateKey, mesh_key: bytes | None, *,
                 on_recv: OnRecv | None, on_peer: OnPeer | None, keepalive: float,
                 idle_timeout: float, queue_frames: int, write_timeout: float,
                 drops: Counter[str] | None = None) -> None:
        super().__init__(queue_frames=queue_frames, write_timeout=write_timeout,
                         on_drop=self._count_drop)
        self.url = url
        self.drops: Counter[str] = Counter() if drops is None else drops
        self.server_key: Key | None = None
        self.server_info: dict[str, Any] = {}
        self.close_reason = ""
        self.on_recv = on_recv
        self.on_peer = on_peer
        self.on_lost: Callable[[RelayConnection], None] | None = None
        self._key = private_key
        self._mesh_key = mesh_key
        self._hello_nonce = os.urandom(NONCE_LEN)
        self._keepalive = keepalive
        self._idle_timeout = idle_timeout
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()

    def _count_drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n

    @property
    def local_ip(self) -> str | None:
        """The address this connection goes out from (IPv4-mapped and scoped forms made
        plain, as an interface lists it); ``None`` before it is made."""
        name = self.transport.get_extra_info("sockname") if self.transport else None
        return plain_ip(name[0]) if name else None

    @classmethod
    async def open(cls, url: str | RelayURL, private_key: PrivateKey, *,
                   mesh_key: bytes | None = None, ssl: _ssl.SSLContext | None = None,
                   on_recv: OnRecv | None = None, on_peer: OnPeer | None = None,
                   timeout: float = 10.0, keepalive: float = 20.0, idle_timeout: float = 65.0,
                   queue_frames: int = 256, write_timeout: float = 5.0,
                   make_socket: MakeSocket | None = None,
                   unix: str | None = None,
                   drops: Counter[str] | None = None) -> RelayConnection:
        """Connect, upgrade and authenticate; raises :class:`RelayConnectError`.

        ``make_socket(family)`` supplies the unconnected TCP socket, e.g. one
        created inside another network namespace (the kernel bridge's case).
        ``unix``: reach the relay at this UNIX socket instead (the workers of one relay).
        ``mesh_key``: we are a relay dialling a mesh peer; both sides prove it.
        ``drops``: count frames dropped and aborts here (an owner's counter kept across
        reconnects) rather than in a counter of this connection's own.
        """
        u = url if isinstance(url, RelayURL) else RelayURL.parse(url)
        if u.tls and ssl is None:
            ssl = _ssl.create_default_context()
        loop = asyncio.get_running_loop()

        def factory() -> RelayConnection:
            return cls(u, private_key, mesh_key, on_recv=on_recv, on_peer=on_peer,
                       keepalive=keepalive, idle_timeout=idle_timeout,
                       queue_frames=queue_frames, write_timeout=write_timeout, drops=drops)

        conn: RelayConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                ctx, hostname = (ssl, u.host) if u.tls else (None, None)
                if unix is not None:
                    _, conn = await loop.create_unix_connection(factory, unix)
                elif make_socket is None:
                    _, conn = await loop.create_connection(
                        factory, u.host, u.port, ssl=ctx, server_hostname=hostname)
                else:
                    sock = await connect_socket(make_socket, u.host, u.port)
                    _, conn = await loop.create_connection(
                        factory, sock=sock, ssl=ctx, server_hostname=hostname)
                await conn._ready
        except (OSError, TimeoutError, RelayConnectError) as e:  # SSLError is an OSError
            if conn is not None:
                conn.abort("connect_failed")
            if isinstance(e, RelayConnectError):
                raise
            raise RelayConnectError(f"relay {u}: {e or type(e).__name__}") from e
        return conn

    # ---- protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.write_raw(self.url.upgrade_request())

    def on_preamble(self, head: bytes) -> bool:
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 101"):
            self._fail(f"no upgrade: {status.decode(errors='replace')}")
            return False
        return True

    def _fail(self, why: str) -> None:
        if not self._ready.done():
            self._ready.set_exception(RelayConnectError(f"relay {self.url}: {why}"))
        self.abort("handshake_failed")

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        for ftype, body in frames:
            if self.closed:
                return
            try:
                self._on_frame(ftype, body)
            except FrameError as e:
                self._fail(str(e))
                return

    def _on_frame(self, ftype: int, body: bytes) -> None:
        if not self._ready.done():
            self._handshake(ftype, body)
        elif ftype == FrameType.RECV:
            if self.on_recv is not None:
                src, data = split_key(body)
                self.on_recv(Key.from_raw(src), data)
        elif ftype in (FrameType.PEER_GONE, FrameType.PEER_PRESENT):
            key, reason = parse_peer(ftype, body)
            if self.on_peer is not None:
                self.on_peer(key, ftype == FrameType.PEER_PRESENT, reason)
        elif ftype == FrameType.PING:
            self.write_frame(encode_frame(FrameType.PONG, body[:8]))
        elif ftype == FrameType.PONG:
            fut = self._pings.pop(body, None)
            if fut is not None and not fut.done():
                fut.set_result(time.monotonic())
        elif ftype == FrameType.CLOSE:
            self._closed_by_relay(body)
        elif ftype != FrameType.KEEPALIVE:
            raise FrameError(f"unexpected frame {ftype} from relay")

    def _handshake(self, ftype: int, body: bytes) -> None:
        """Until the relay has proved its key, it may only say hello, prove, or refuse."""
        if ftype == FrameType.SERVER_HELLO and self.server_key is None:
            key, challenge = parse_server_hello(body)
            if self.url.key is not None and key != self.url.key:
                raise FrameError(f"the relay presented key {key}, not its pinned key "
                                 f"{self.url.key}: refusing it")
            self.server_key = key
            self.write_frame(frame_client_hello(self._key, key, challenge,
                                                nonce=self._hello_nonce,
                                                mesh_key=self._mesh_key))
        elif ftype == FrameType.SERVER_INFO and self.server_key is not None:
            self.server_info = open_server_info(self._key, self.server_key, self._hello_nonce,
                                                body, mesh_key=self._mesh_key)
            self._ready.set_result(None)
            self._arm_timer()
        elif ftype == FrameType.CLOSE:
            self._closed_by_relay(body)
        elif ftype != FrameType.KEEPALIVE:
            raise FrameError(f"frame {ftype} before the relay proved its key")

    def _closed_by_relay(self, body: bytes) -> None:
        self.close_reason = body.decode(errors="replace")[:200]
        self._fail(f"closed by relay: {self.close_reason}")

    def _arm_timer(self) -> None:
        self._timer = self._loop.call_later(self._keepalive, self._tick)

    def _tick(self) -> None:
        if self.closed:
            return
        if time.monotonic() - self.last_rx > self._idle_timeout:
            self.abort("idle_timeout")
            return
        # A PING, not a bare keepalive: the relay's PONG proves the path still works both
        # ways, so a connection a NAT silently forgot dies after idle_timeout, not never.
        self.write_frame(encode_frame(FrameType.PING, os.urandom(8)))
        self._arm_timer()

    def on_closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._ready.done():
            self._ready.set_exception(RelayConnectError(
                f"relay {self.url}: connection closed during handshake"
                + (f" ({self.close_reason})" if self.close_reason else "")))
        for fut in self._pings.values():
            if not fut.done():
                fut.cancel()
        if not self._lost.done():
            self._lost.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self)

    # ---- API -------------------------------------------------------------------------
    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)

    def send(self, dst: Key, data: bytes) -> None:
        """Queue ``data`` for ``dst`` (drop-oldest when the socket is backed up)."""
        self.write_frame(frame_send(dst, data))

    def note_preferred(self, home: bool) -> None:
        self.write_frame(encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if home else b"\x00"))

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a PING through the relay's frame loop, in seconds."""
        token = os.urandom(8)
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pings[token] = fut
        start = time.monotonic()
        self.write_frame(encode_frame(FrameType.PING, token))
        try:
            async with asyncio.timeout(timeout):
                return await fut - start
        finally:
            self._pings.pop(token, None)
