"""File drop: send files peer to peer, inside the WireGuard tunnel only.

Each node runs a **peer API**, an HTTP server bound only to its tunnel
addresses and, given the interface, to the WireGuard device itself: Linux
accepts a packet for any local address on any interface, so without the
device binding a neighbour on the underlay could route the tunnel address to
us and connect around WireGuard. Files never touch the control service, and a
relay only ever carries them as WireGuard ciphertext.

Who is sending is decided by the receiver alone, from the source address of
the TCP connection: WireGuard's cryptokey routing only admits a source address
through the peer whose allowed IPs contain it, so the address names the key.
The node supplies ``identify(remote_ip)`` (its netmap's allowed IPs) and
``authorize(identity)`` (the policy's ``file-send`` capability); see
:func:`netmap_identify` and :func:`netmap_authorize`.

Protocol (version 1, JSON errors ``{"error": "..."}``)::

    GET /v1/whoami                                   -> {"name", "key", "may_send"}
    GET /v1/offset?name=N&size=S&sha256=H            -> {"offset": K}   (admission check)
    PUT /v1/files?name=N&size=S&sha256=H&offset=K    body: bytes K..S  -> 201 {"name", ...}

``offset`` is how much of this exact offer (sender, name, size, digest) the
receiver already holds, so an interrupted transfer resumes where it stopped;
the receiver re-hashes what it kept and checks the whole file's SHA-256 before
the file appears. Refusals: 400 bad name or request, 403 not a peer or not
allowed, 409 offset ahead of the receiver, 413 over quota, 422 digest mismatch,
500 the receiver could not write, 507 disk full.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs

from wgmesh.drop.inbox import BadName, Inbox, check_name
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key
from wgmesh.netmap import CAP_FILE_SEND, Netmap

__all__ = [
    "DEFAULT_PORT",
    "DropError",
    "DropRefused",
    "Offer",
    "PeerAPIServer",
    "PeerIdentity",
    "SendResult",
    "add_parser",
    "file_digest",
    "netmap_authorize",
    "netmap_identify",
    "parse_offer",
    "send_file",
]

#: The peer API's TCP port on every node's tunnel addresses.
DEFAULT_PORT = 4173
CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a malformed request, not a big file


class DropError(WgmeshError):
    """A file could not be sent; the message says why, for a person."""


class DropRefused(DropError):
    """The receiver answered with an error status (kept in ``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ identity seam


@attrs.frozen
class PeerIdentity:
    """Who a connection comes from, as the receiver's WireGuard config says."""

    name: str
    node_key: Key


Identify = Callable[[str], "PeerIdentity | None"]
Authorize = Callable[[PeerIdentity], bool]


def netmap_identify(get_netmap: Callable[[], Netmap | None]) -> Identify:
    """``identify`` for a node: the peer whose allowed IPs hold the address (longest prefix).

    Allowed IPs are exactly what WireGuard enforces on inbound packets, so this
    is the key the packets were authenticated with, never a sender's claim.
    """

    def identify(remote_ip: str) -> PeerIdentity | None:
        nm = get_netmap()
        if nm is None:
            return None
        ip = ipaddress.ip_address(remote_ip)
        best: tuple[int, PeerIdentity] | None = None
        for p in nm.peers.values():
            for cidr in (*p.allowed_ips, p.ipv4, p.ipv6):
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(cidr, strict=False)
                    if ip in net and (best is None or net.prefixlen > best[0]):
                        best = (net.prefixlen, PeerIdentity(p.name, p.node_key))
        return None if best is None else best[1]

    return identify


def netmap_authorize(get_netmap: Callable[[], Netmap | None]) -> Authorize:
    """``authorize`` for a node: does the current policy give the peer ``file-send`` here?"""

    def authorize(who: PeerIdentity) -> bool:
        nm = get_netmap()
        peer = None if nm is None else nm.peer_by_key(who.node_key)
        return peer is not None and nm is not None and nm.peer_has_cap(peer, CAP_FILE_SEND)

    return authorize


# ------------------------------------------------------------------ the offer (pure)


@attrs.frozen
class Offer:
    """One request to deliver ``name`` (``size`` bytes, SHA-256 ``sha256``) from ``offset``."""

    name: str
    size: int
    sha256: str
    offset: int = 0


class BadRequest(DropError):
    """A malformed peer API request: answered 400."""


def _int_param(q: Mapping[str, str], key: str, default: int | None = None) -> int:
    v = q.get(key)
    if v is None:
        if default is None:
            raise BadRequest(f"missing parameter {key!r}")
        return default
    if not v.isascii() or not v.isdigit() or len(v) > 16:
        raise BadRequest(f"parameter {key!r} must be a non-negative integer")
    return int(v)


def parse_offer(q: Mapping[str, str], *, with_offset: bool) -> Offer:
    """Validate query parameters into an :class:`Offer`; raise :class:`BadRequest`/``BadName``."""
    name = q.get("name")
    if name is None:
        raise BadRequest("missing parameter 'name'")
    check_name(name)
    size = _int_param(q, "size")
    if size > _MAX_SIZE:
        raise BadRequest("size is implausibly large")
    sha = q.get("sha256", "")
    if not _SHA_RE.match(sha):
        raise BadRequest("sha256 must be 64 lowercase hex digits")
    offset = _int_param(q, "offset") if with_offset else 0
    if offset > size:
        raise BadRequest("offset is beyond the end of the file")
    return Offer(name, size, sha, offset)


# ------------------------------------------------------------------ receiver


class _Refusal(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@attrs.define(eq=False)
class _Active:
    """A transfer being written, so a newer connection for the same offer can take over."""

    task: asyncio.Task[Any]
    done: asyncio.Event
    reserved: int


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _listen_socket(addr: str, port: int, interface: str | None,
                   netns: str | None) -> socket.socket:
    from wgmesh.wireguard.netns import socket_in

    fam = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    s = socket_in(netns, fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(64)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class PeerAPIServer:
    """The node's peer API (asyncio, aiohttp): receives file drops into ``inbox``.

    ``addresses`` are the node's tunnel addresses; ``interface`` the WireGuard
    device they live on (strongly recommended: the listener is then bound to
    the device too); ``netns`` the namespace to listen in (``None``: ours).
    ``quota`` caps what the inbox may hold in total (completed and partial),
    ``reserve`` is disk space always left free. A transfer silent for
    ``idle_timeout`` seconds is treated as interrupted (its bytes are kept).
    """

    def __init__(self, inbox: Inbox | str | os.PathLike[str], addresses: Sequence[str], *,
                 identify: Identify, authorize: Authorize, port: int = DEFAULT_PORT,
                 interface: str | None = None, netns: str | None = None,
                 quota: int | None = None, reserve: int = 64 << 20, fsync: bool = True,
                 partial_max_age: float = 7 * 86400, idle_timeout: float = 60.0) -> None:
        if not addresses:
            raise ValueError("the peer API needs at least one tunnel address")
        for a in addresses:
            if ipaddress.ip_address(a).is_unspecified:
                raise ValueError(f"the peer API binds only to tunnel addresses, never {a}")
        self.inbox = inbox if isinstance(inbox, Inbox) else Inbox(inbox)
        self.addresses = list(addresses)
        self.identify, self.authorize = identify, authorize
        self.port, self.interface, self.netns = port, interface, netns
        self.quota, self.reserve, self.fsync = quota, reserve, fsync
        self.partial_max_age, self.idle_timeout = partial_max_age, idle_timeout
        self.counters: dict[str, int] = {"received": 0, "refused": 0, "interrupted": 0}
        self._active: dict[Path, _Active] = {}
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        self.inbox.create()
        self.inbox.prune_partials(self.partial_max_age)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/v1/whoami", self._whoami)
        app.router.add_get("/v1/offset", self._offset)
        app.router.add_put("/v1/files", self._put)
        # A deep read buffer: fewer pause/resume cycles per megabyte on a fast tunnel.
        runner = web.AppRunner(app, access_log=None, read_bufsize=4 * CHUNK,
                               shutdown_timeout=2.0)
        await runner.setup()
        try:
            for addr in self.addresses:
                sock = _listen_socket(addr, self.port, self.interface, self.netns)
                self.port = sock.getsockname()[1]  # port 0: the first address picks one
                await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PeerAPIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- request plumbing ------------------------------------------------------------
    def _identify(self, request: Any) -> PeerIdentity:
        """The WireGuard peer behind the connection's source address, or 403."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip = str(peer[0]).split("%", 1)[0] if peer else ""
        who = self.identify(ip) if ip else None
        if who is None:
            raise _Refusal(403, f"{ip or 'this address'} is not a peer of this node's mesh")
        return who

    def _sender(self, request: Any) -> PeerIdentity:
        who = self._identify(request)
        if not self.authorize(who):
            raise _Refusal(403, f"{who.name} may not send files to this node"
                                " (the policy grants no file-send capability)")
        return who

    async def _handle(self, request: Any, fn: Callable[..., Any]) -> Any:
        from aiohttp import web

        try:
            status, body = await fn(request)
        except (BadRequest, BadName) as e:
            status, body = 400, {"error": str(e)}
        except _Refusal as e:
            status, body = e.status, {"error": e.message, **e.extra}
        except _Interrupted:
            # Cut or silent: nobody reads an answer; hang up so nothing lingers.
            if request.protocol is not None:
                request.protocol.force_close()
            return web.Response(status=400)
        resp = web.json_response(body, status=status)
        if status >= 400:
            self.counters["refused"] += 1
            if not request.content.is_eof() and request.protocol is not None:
                # Refused mid-body: answer, then hang up rather than drain (aiohttp's
                # lingering close) the rest of a possibly huge file.
                with contextlib.suppress(ConnectionError):
                    await resp.prepare(request)
                    await resp.write_eof()
                request.protocol.force_close()
        return resp

    async def _whoami(self, request: Any) -> Any:
        async def fn(req: Any) -> tuple[int, dict[str, Any]]:
            who = self._identify(req)
            return 200, {"name": who.name, "key": who.node_key.b64(),
                         "may_send": bool(self.authorize(who))}
        return await self._handle(request, fn)

    def _admit(self, offer: Offer, partial: Path, have: int) -> int:
        """Check quota and disk for the bytes still to come; returns them."""
        remaining = offer.size - have
        if self.quota is not None:
            held = self.inbox.usage(exclude=partial) + self._reserved(exclude=partial)
            if held + offer.size > self.quota:
                raise _Refusal(413, f"{offer.name} ({_human(offer.size)}) exceeds the"
                                    f" receiver's inbox quota ({_human(self.quota)},"
                                    f" {_human(max(0, self.quota - held))} free)")
        free = self.inbox.free_bytes() - self._reserved(exclude=partial) - self.reserve
        if remaining > free:
            raise _Refusal(507, f"the receiver's disk has no room for {offer.name}"
                                f" ({_human(remaining)} needed, {_human(max(0, free))} free)")
        return remaining

    def _reserved(self, exclude: Path) -> int:
        return sum(a.reserved for p, a in self._active.items() if p != exclude)

    async def _offset(self, request: Any) -> Any:
        async def fn(req: Any) -> tuple[int, dict[str, Any]]:
            who = self._sender(req)
            offer = parse_offer(req.query, with_offset=False)
            partial = self.inbox.partial_path(who.node_key.b64(), offer.name, offer.size,
                                              offer.sha256)
            have = _size_or_zero(partial)
            self._admit(offer, partial, have)
            return 200, {"offset": have}
        return await self._handle(request, fn)

    async def _put(self, request: Any) -> Any:
        return await self._handle(request, self._receive)

    async def _receive(self, req: Any) -> tuple[int, dict[str, Any]]:
        who = self._sender(req)
        offer = parse_offer(req.query, with_offset=True)
        if req.content_length != offer.size - offer.offset:
            raise BadRequest("Content-Length must be exactly size - offset")
        partial = self.inbox.partial_path(who.node_key.b64(), offer.name, offer.size,
                                          offer.sha256)
        old = self._active.get(partial)
        if old is not None:  # the sender reconnected before we saw the old connection die
            old.task.cancel()
            await old.done.wait()
        have = _size_or_zero(partial)
        if offer.offset > have:
            raise _Refusal(409, f"the receiver holds only {have} bytes of {offer.name}",
                           offset=have)
        remaining = self._admit(offer, partial, offer.offset)
        me = _Active(asyncio.current_task(), asyncio.Event(), remaining)  # type: ignore[arg-type]
        self._active[partial] = me
        try:
            return await self._write(req, who, offer, partial)
        finally:
            if self._active.get(partial) is me:
                del self._active[partial]
            me.done.set()

    async def _write(self, req: Any, who: PeerIdentity, offer: Offer,
                     partial: Path) -> tuple[int, dict[str, Any]]:
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        try:
            os.ftruncate(fd, offer.offset)
            digest = await asyncio.to_thread(_hash_prefix, partial, offer.offset)
            os.lseek(fd, offer.offset, os.SEEK_SET)
            got = offer.offset
            lowat = _LowWater(req, offer.size - offer.offset)
            lowat.update()
            while got < offer.size:
                try:
                    async with asyncio.timeout(lowat.GATHER if lowat.high else
                                               self.idle_timeout):
                        chunk = await req.content.readany()
                except TimeoutError:
                    if lowat.high:  # the sender paused: take what the kernel holds
                        lowat.set(1)
                        continue
                    chunk = b""
                except OSError:
                    chunk = b""
                if not chunk:
                    # The sender is gone (killed, or the path died): nobody is left to
                    # answer, and what arrived stays in the resume area.
                    self.counters["interrupted"] += 1
                    raise _Interrupted
                got += len(chunk)
                digest.update(chunk)
                _write_all(fd, chunk)
                lowat.update()
            if digest.hexdigest() != offer.sha256:
                os.unlink(partial)
                raise _Refusal(422, f"{offer.name}: the bytes received hash to"
                                    f" {digest.hexdigest()}, not the sender's {offer.sha256}")
            if self.fsync:
                await asyncio.to_thread(os.fsync, fd)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        finally:
            os.close(fd)
        try:
            final = self.inbox.commit(partial, offer.name)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        self.counters["received"] += 1
        return 201, {"name": final.name, "size": offer.size, "sha256": offer.sha256,
                     "from": who.name}


def _disk_refusal(e: OSError, offer: Offer, partial: Path) -> _Refusal:
    """A write failure as an answer. A full disk keeps nothing; other errors keep the partial."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        return _Refusal(507, f"the receiver's disk filled up while receiving {offer.name};"
                             " nothing was kept")
    return _Refusal(500, f"the receiver could not store {offer.name}: {e.strerror}")


class _Interrupted(Exception):
    pass


class _LowWater:
    """Wake for the body only once ``LOWAT`` bytes wait in the socket (``SO_RCVLOWAT``).

    Through a tunnel TCP data trickles in as many small reads; each costs a
    loop wake-up and a Python iteration. Letting the kernel gather 256 KiB first
    cuts the receiver's CPU per byte. The mark never exceeds what is still to
    come, and if the sender pauses for ``GATHER`` seconds it drops to one byte,
    so no byte waits in the kernel for long.
    """

    LOWAT = 256 << 10
    GATHER = 0.05

    def __init__(self, req: Any, body: int) -> None:
        self.content, self.body, self.mark = req.content, body, 1
        self.sock = req.transport.get_extra_info("socket") if req.transport else None

    @property
    def high(self) -> bool:
        return self.mark > 1

    def update(self) -> None:
        self.set(max(1, min(self.LOWAT, self.body - self.content.total_bytes)))

    def set(self, mark: int) -> None:
        if self.sock is not None and mark != self.mark:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
                self.mark = mark


def _size_or_zero(p: Path) -> int:
    try:
        return os.stat(p, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _hash_prefix(path: Path, n: int) -> Any:
    """SHA-256 state over the first ``n`` bytes already on disk (the resumed part)."""
    h = hashlib.sha256()
    if n:
        with open(path, "rb") as f:
            while n > 0:
                b = f.read(min(CHUNK, n))
                if not b:
                    raise OSError(errno.EIO, f"{path} shrank while resuming")
                h.update(b)
                n -= len(b)
    return h


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------ sender


@attrs.frozen
class SendResult:
    """What a finished drop reports: the name the receiver kept it under, and the bytes."""

    name: str
    size: int
    sha256: str
    resumed_from: int
    sent: int
    seconds: float


Progress = Callable[[int, int], None]


def file_digest(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _target(dest: str, port: int) -> tuple[str, int]:
    """``100.64.0.2``, ``fd7a::2``, ``[fd7a::2]:4173``, ``host:port`` or ``http://...``."""
    if "://" in dest:
        u = urlsplit(dest)
        if u.scheme != "http" or not u.hostname:
            raise DropError(f"{dest}: the peer API speaks plain http inside the tunnel")
        return u.hostname, u.port or port
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(dest)
        return dest, port
    host, sep, p = dest.rpartition(":")
    if sep and p.isdigit():
        return host.strip("[]"), int(p)
    return dest, port


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose socket is made inside ``netns`` (``None``: ours)."""

    def __init__(self, host: str, port: int, timeout: float, netns: str | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        from wgmesh.wireguard.netns import socket_in

        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket_in(self.netns, fam, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect((self.host, self.port))
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             q: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    conn.request(method, f"{path}?{urlencode(q)}")
    return _response(conn)


def _response(conn: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    r = conn.getresponse()
    raw = r.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"error": raw[:200].decode(errors="replace")}
    return r.status, body if isinstance(body, dict) else {}


def send_file(dest: str, path: str | os.PathLike[str], *, port: int = DEFAULT_PORT,
              name: str | None = None, progress: Progress | None = None,
              retries: int = 5, timeout: float = 30.0,
              netns: str | None = None) -> SendResult:
    """Send one file to a peer's peer API at ``dest`` (its tunnel address). Blocking.

    The file streams from disk (``sendfile(2)``, never read whole into
    memory), with its size and SHA-256 announced first. If the connection
    breaks, it asks the receiver how much it kept and sends the rest, up to
    ``retries`` times; a later call with the same file resumes the same way,
    as after a killed process. ``progress(done, total)`` is called as bytes go
    out. ``netns``: connect from that network namespace (a Node living in
    one). Async callers: ``await asyncio.to_thread(send_file, ...)``.
    Raises :class:`DropRefused` with the receiver's reason, or :class:`DropError`.
    """
    path = Path(path)
    name = path.name if name is None else name
    check_name(name)
    host, port = _target(dest, port)
    t0 = time.monotonic()
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below, used across retries
    except OSError as e:
        raise DropError(f"{path}: {e.strerror}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        sha = hashlib.file_digest(f, "sha256").hexdigest()
        q = {"name": name, "size": size, "sha256": sha}
        first_offset: int | None = None
        sent = 0
        for attempt in range(retries + 1):
            conn = _Connection(host, port, timeout, netns)
            try:
                status, body = _request(conn, "GET", "/v1/offset", q)
                if status != 200:
                    raise DropRefused(status, _refusal_text(status, body, host))
                offset = int(body.get("offset", 0))
                first_offset = offset if first_offset is None else first_offset
                if progress:
                    progress(offset, size)
                n, status, body = _put(conn, f, q, offset, size, progress)
                sent += n
                if status == 201:
                    return SendResult(str(body.get("name", name)), size, sha,
                                      first_offset, sent, time.monotonic() - t0)
                if status != 409:  # 409: the receiver holds less than it said; ask again
                    raise DropRefused(status, _refusal_text(status, body, host))
            except (OSError, http.client.HTTPException) as e:
                if attempt == retries:
                    raise DropError(f"sending {name} to {host} failed: {e}") from e
                time.sleep(min(2.0, 0.1 * 2 ** attempt))  # back off before reconnecting
            finally:
                conn.close()
        raise DropError(f"sending {name} to {host}: gave up after {retries + 1} attempts")


def _put(conn: http.client.HTTPConnection, f: Any, q: Mapping[str, Any], offset: int,
         size: int, progress: Progress | None) -> tuple[int, int, dict[str, Any]]:
    """Stream bytes ``offset..size``; returns (bytes sent, status, body)."""
    conn.putrequest("PUT", f"/v1/files?{urlencode({**q, 'offset': offset})}")
    conn.putheader("Content-Length", str(size - offset))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    sock = conn.sock
    assert sock is not None
    pos = offset
    try:
        while pos < size:
            n = sock.sendfile(f, pos, min(8 * CHUNK, size - pos))
            if n == 0:
                raise ConnectionError("the receiver closed the connection")
            pos += n
            if progress:
                progress(pos, size)
    except OSError:
        # The receiver may have refused mid-stream (quota, disk full) and closed;
        # its answer is still readable. If not, it is a real interruption.
        try:
            status, body = _response(conn)
        except (OSError, http.client.HTTPException):
            raise
        return pos - offset, status, body
    status, body = _response(conn)
    return pos - offset, status, body


def _refusal_text(status: int, body: Mapping[str, Any], host: str) -> str:
    reason = body.get("error") or http.client.responses.get(status, "error")
    return f"{host} refused the file ({status}): {reason}"


# ------------------------------------------------------------------ CLI


def _progress_bar(name: str, stream: Any = None) -> Progress:
    """A one-line progress bar on a terminal."""
    stream = sys.stderr if stream is None else stream
    t0 = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        rate = done / max(now - t0, 1e-6)
        bar = "#" * int(frac * 30)
        stream.write(f"\r{name[:30]:<30} [{bar:<30}] {frac:4.0%} {_human(rate)}/s ")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


ResolvePeer = Callable[[str], str]


def _literal_peer(peer: str) -> str:
    try:
        return str(ipaddress.ip_address(peer.strip("[]")))
    except ValueError:
        raise DropError(f"{peer}: give the peer's tunnel address (peer names need the"
                        " running node agent)") from None


def cmd_send(a: argparse.Namespace, resolve_peer: ResolvePeer = _literal_peer) -> int:
    """``wgmesh file send PEER PATH...``: each file in turn; stops at the first refusal."""
    addr = resolve_peer(a.peer)
    for p in a.paths:
        bar = _progress_bar(Path(p).name) if sys.stderr.isatty() and not a.json else None
        r = send_file(addr, p, port=a.port, progress=bar)
        if a.json:
            print(json.dumps({"peer": a.peer, **attrs.asdict(r)}), flush=True)
        else:
            resumed = f", resumed at {_human(r.resumed_from)}" if r.resumed_from else ""
            print(f"sent {p} to {a.peer} as {r.name} ({_human(r.size)}, sha256 ok{resumed})",
                  flush=True)
    return 0


def cmd_receive(a: argparse.Namespace) -> int:
    """``wgmesh file receive [DIR]``: list the inbox, or (with DIR) move everything there."""
    inbox = Inbox(Path(a.state_dir) / "inbox")
    files = inbox.wait(a.timeout) if a.wait else inbox.list()
    if a.wait and not files:
        raise DropError(f"no file arrived within {a.timeout:g} s")
    if a.dir is None:
        if a.json:
            print(json.dumps([{"name": f.name, "size": f.size, "mtime": f.mtime}
                              for f in files]))
        else:
            from wgmesh.cli.main import print_table

            print_table([{"name": f.name, "size": _human(f.size),
                          "received": time.strftime("%Y-%m-%d %H:%M:%S",
                                                    time.localtime(f.mtime))}
                         for f in files], ["name", "size", "received"])
        return 0
    dest = Path(a.dir)
    if not dest.is_dir():
        raise DropError(f"{dest}: not a directory")
    moved = inbox.move_to(dest, files)
    if a.json:
        print(json.dumps([str(p) for p in moved]))
    else:
        for p in moved:
            print(f"{p}")
        if not moved:
            print("inbox is empty", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               resolve_peer: ResolvePeer = _literal_peer,
               state_dir: str = "/var/lib/wgmesh") -> None:
    """Register ``file send`` / ``file receive``.

    ``resolve_peer`` turns PEER (a name or address) into a tunnel address;
    the node agent supplies one that asks the running node. Sending happens in
    the CLI process itself, straight through the tunnel, so the progress bar is
    local; receiving reads ``STATE_DIR/inbox``.
    """
    f = sub.add_parser("file", help="send files to peers, receive dropped files")
    fs = f.add_subparsers(dest="file_cmd", required=True)
    s = fs.add_parser("send", help="send files to a peer through the tunnel")
    s.add_argument("peer", metavar="PEER", help="peer name or tunnel address")
    s.add_argument("paths", metavar="PATH", nargs="+", help="files to send")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="the peer's peer API port")
    s.add_argument("--json", action="store_true", help="one JSON object per file")
    s.set_defaults(func=lambda a: cmd_send(a, resolve_peer))
    r = fs.add_parser("receive", help="list the inbox, or move its files to DIR")
    r.add_argument("dir", metavar="DIR", nargs="?", help="move received files here")
    r.add_argument("--wait", action="store_true", help="wait until a file has arrived")
    r.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    r.add_argument("--state-dir", default=state_dir, help=f"node state (default {state_dir})")
    r.add_argument("--json", action="store_true", help="machine output")
    r.set_defaults(func=cmd_receive)
