"""The receiving side of a file drop: the node's peer API (asyncio, aiohttp).

It listens only on the node's tunnel addresses and, given the interface, on
the WireGuard device itself: Linux accepts a packet for any local address on
any interface, so without the device binding a neighbour on the underlay could
route the tunnel address to us and connect around WireGuard. Files never touch
the control service, and a relay only ever carries them as WireGuard
ciphertext. What is said on the wire is :mod:`wgmesh.drop.protocol`; this
module does the sockets and the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from wgmesh.drop import protocol as p
from wgmesh.drop.inbox import Inbox

__all__ = ["DEFAULT_QUOTA", "PeerAPIServer"]

log = logging.getLogger(__name__)

#: What an inbox may hold unless told otherwise: a peer can fill it, not the disk.
DEFAULT_QUOTA = 8 << 30


@attrs.define(eq=False)
class _Active:
    """A transfer being written, so a newer connection for the same offer can take over."""

    task: asyncio.Task[Any]
    done: asyncio.Event
    reserved: int
    sender: str


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
    """The node's peer API: receives file drops into ``inbox``.

    ``addresses`` are the node's tunnel addresses; ``interface`` the WireGuard
    device they live on (strongly recommended: the listener is then bound to
    the device too); ``netns`` the namespace to listen in (``None``: ours).
    ``quota`` caps what the inbox may hold in total (completed and partial;
    default :data:`DEFAULT_QUOTA`). ``sender_quota`` bounds one sender's unfinished
    transfers (partials and bytes in flight, default a quarter of the quota): a
    single offer may use the whole quota, but a sender holding anything unfinished
    may add only up to ``sender_quota``, so one peer's abandoned partials cannot
    lock the others out. ``reserve`` is disk space always left free. A transfer
    silent for ``idle_timeout`` seconds is treated as interrupted (its bytes are
    kept); partials untouched for ``partial_max_age`` are pruned at start and
    every ``prune_interval`` seconds after. With ``fsync`` (the default) a file is
    on disk before its 201; every ``write_behind`` bytes the server already starts
    flushing what it holds, in a thread while the transfer goes on, so the final
    ``fsync`` waits only for the tail and dirty memory stays bounded.
    """

    def __init__(self, inbox: Inbox | str | os.PathLike[str], addresses: Sequence[str], *,
                 identify: p.Identify, authorize: p.Authorize, port: int = p.DEFAULT_PORT,
                 interface: str | None = None, netns: str | None = None,
                 quota: int | None = DEFAULT_QUOTA, sender_quota: int | None = None,
                 reserve: int = 64 << 20, fsync: bool = True,
                 partial_max_age: float = 7 * 86400, prune_interval: float = 3600.0,
                 idle_timeout: float = 60.0, write_behind: int = 32 << 20) -> None:
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
        if sender_quota is None and quota is not None:
            sender_quota = quota // 4
        self.sender_quota = sender_quota
        self.partial_max_age, self.idle_timeout = partial_max_age, idle_timeout
        self.prune_interval = prune_interval
        self.write_behind = write_behind
        self._pruner: asyncio.Task[None] | None = None
        self.counters: dict[str, int] = {"received": 0, "refused": 0, "interrupted": 0,
                                         "early_flushes": 0}
        self._active: dict[Path, _Active] = {}
        # Complete streamed partials awaiting their commit: the digest taken as the bytes
        # arrived, valid while the file is unchanged (else the commit hashes it again).
        self._held: dict[Path, _Held] = {}
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        self.inbox.create()
        self.inbox.prune_partials(self.partial_max_age)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/v1/whoami", self._whoami)
        app.router.add_get("/v1/offset", self._offset)
        app.router.add_put("/v1/files", self._put)
        app.router.add_post("/v1/commit", self._commit)
        # A deep read buffer: fewer pause/resume cycles per megabyte on a fast tunnel.
        runner = web.AppRunner(app, access_log=None, read_bufsize=4 * p.CHUNK,
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
        self._pruner = asyncio.create_task(self._prune_forever())

    async def _prune_forever(self) -> None:
        """Abandoned partials go while the node runs, not only when it restarts."""
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                await asyncio.to_thread(self.inbox.prune_partials, self.partial_max_age,
                                        keep=list(self._active))
                for path in [h for h in self._held if not h.exists()]:
                    del self._held[path]
            except OSError as e:  # a passing disk error must not end pruning for good
                log.warning("pruning %s: %s", self.inbox.partial_dir, e)

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PeerAPIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- request plumbing ------------------------------------------------------------
    def _identify(self, request: Any) -> p.PeerIdentity:
        """The WireGuard peer behind the connection's source address, or 403."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip = str(peer[0]).split("%", 1)[0] if peer else ""
        who = self.identify(ip) if ip else None
        if who is None:
            raise p.not_a_peer(ip)
        return who

    def _sender(self, request: Any) -> p.PeerIdentity:
        who = self._identify(request)
        if not self.authorize(who):
            raise p.not_allowed(who)
        return who

    async def _handle(self, request: Any, fn: Callable[..., Any]) -> Any:
        from aiohttp import web

        try:
            status, body = await fn(request)
        except (p.BadRequest, p.BadName) as e:
            status, body = 400, {"error": str(e)}
        except p.Refusal as e:
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

    def _admit(self, offer: p.Offer, partial: Path, have: int, sender: str) -> int:
        """Check the sender's share, quota and disk for the bytes still to come; returns
        them."""
        if self.sender_quota is not None:
            mine = (self.inbox.sender_usage(sender, exclude=partial)
                    + self._reserved(exclude=partial, sender=sender))
            if mine and mine + offer.size > self.sender_quota:
                raise p.over_sender_quota(offer, self.sender_quota, mine)
        held = 0
        if self.quota is not None:
            held = self.inbox.usage(exclude=partial) + self._reserved(exclude=partial)
        free = self.inbox.free_bytes() - self._reserved(exclude=partial) - self.reserve
        return p.admit(offer, have, free=free, quota=self.quota, held=held)

    def _reserved(self, exclude: Path, sender: str | None = None) -> int:
        return sum(a.reserved for path, a in self._active.items()
                   if path != exclude and sender in (None, a.sender))

    async def _offset(self, request: Any) -> Any:
        async def fn(req: Any) -> tuple[int, dict[str, Any]]:
            who = self._sender(req)
            offer = p.parse_offer(req.query, with_offset=False)
            partial = self.inbox.partial_path(who.node_key.b64(), offer.name, offer.size,
                                              offer.sha256)
            have = _size_or_zero(partial)
            self._admit(offer, partial, have, who.node_key.b64())
            return 200, {"offset": have}
        return await self._handle(request, fn)

    async def _put(self, request: Any) -> Any:
        return await self._handle(request, self._receive)

    async def _receive(self, req: Any) -> tuple[int, dict[str, Any]]:
        who = self._sender(req)
        offer = p.parse_offer(req.query, with_offset=True)
        if req.content_length != offer.size - offer.offset:
            raise p.BadRequest("Content-Length must be exactly size - offset")
        partial = self.inbox.partial_path(who.node_key.b64(), offer.name, offer.size,
                                          offer.sha256)
        old = self._active.get(partial)
        if old is not None:  # the sender reconnected before we saw the old connection die
            old.task.cancel()
            await old.done.wait()
        self._held.pop(partial, None)
        have = _size_or_zero(partial)
        if offer.offset > have:
            raise p.behind(offer, have)
        sender = who.node_key.b64()
        remaining = self._admit(offer, partial, offer.offset, sender)
        me = _Active(asyncio.current_task(), asyncio.Event(), remaining,  # type: ignore[arg-type]
                     sender)
        self._active[partial] = me
        try:
            digest = await self._write(req, offer, partial)
            if not offer.sha256:  # streamed: the digest comes in the commit
                try:
                    self._held[partial] = _Held.of(partial, digest)
                except OSError as e:
                    raise _disk_refusal(e, offer, partial) from e
                return 200, {"offset": offer.size}
            return self._publish(who, offer, partial, digest)
        finally:
            if self._active.get(partial) is me:
                del self._active[partial]
            me.done.set()

    async def _commit(self, request: Any) -> Any:
        async def fn(req: Any) -> tuple[int, dict[str, Any]]:
            who = self._sender(req)
            offer = p.parse_offer(req.query, with_offset=False, with_digest=True)
            partial = self.inbox.partial_path(who.node_key.b64(), offer.name, offer.size, "")
            have = _size_or_zero(partial)
            if have != offer.size or partial in self._active:
                raise p.behind(offer, have)
            held = self._held.pop(partial, None)
            digest = held.digest if held is not None and held.still(partial) else None
            try:
                if digest is None:  # the receiver restarted, or the file changed since
                    digest = (await asyncio.to_thread(_hash_prefix, partial, have)).hexdigest()
            except OSError as e:
                raise _disk_refusal(e, offer, partial) from e
            return self._publish(who, offer, partial, digest)
        return await self._handle(request, fn)

    def _publish(self, who: p.PeerIdentity, offer: p.Offer, partial: Path,
                 digest: str) -> tuple[int, dict[str, Any]]:
        """Check the whole file's digest and let it appear in the inbox: the 201."""
        if digest != offer.sha256:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise p.digest_mismatch(offer, digest)
        try:
            final = self.inbox.commit(partial, offer.name)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        self.counters["received"] += 1
        return 201, {"name": final.name, "size": offer.size, "sha256": offer.sha256,
                     "from": who.name}

    async def _write(self, req: Any, offer: p.Offer, partial: Path) -> str:
        """Take the body into ``partial`` (flushed when ``fsync``); the whole partial's
        SHA-256."""
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        flushing: asyncio.Future[None] | None = None
        try:
            os.ftruncate(fd, offer.offset)
            digest = await asyncio.to_thread(_hash_prefix, partial, offer.offset)
            os.lseek(fd, offer.offset, os.SEEK_SET)
            got = offer.offset
            unflushed = 0
            while got < offer.size:
                # Read as the bytes come, with no receive low-water mark: below its mark
                # Linux ACKs every segment at once (__tcp_ack_snd_check), and through a
                # tunnel every ACK is a packet to encrypt (benchmarks/README.md, file drop).
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        chunk = await req.content.readany()
                except (TimeoutError, OSError):
                    chunk = b""
                if not chunk:
                    # The sender is gone (killed, or the path died): nobody is left to
                    # answer, and what arrived stays in the resume area.
                    self.counters["interrupted"] += 1
                    raise _Interrupted
                got += len(chunk)
                digest.update(chunk)
                _write_all(fd, chunk)
                unflushed += len(chunk)
                if self.fsync and unflushed >= self.write_behind and \
                        (flushing is None or flushing.done()):
                    if flushing is not None:
                        flushing.result()  # a failed early flush fails the transfer
                    flushing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fd))
                    self.counters["early_flushes"] += 1
                    unflushed = 0
            if offer.sha256 and digest.hexdigest() != offer.sha256:
                return digest.hexdigest()  # refused unflushed: the partial goes
            if flushing is not None:
                await flushing
            if self.fsync:
                await asyncio.to_thread(os.fsync, fd)
        except OSError as e:
            raise _disk_refusal(e, offer, partial) from e
        finally:
            if flushing is not None:  # never close the fd under a flush still running
                with contextlib.suppress(BaseException):
                    await asyncio.shield(flushing)
            os.close(fd)
        return digest.hexdigest()


def _disk_refusal(e: OSError, offer: p.Offer, partial: Path) -> p.Refusal:
    """A write failure as an answer. A full disk keeps nothing; other errors keep the partial."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        return p.disk_filled(offer)
    return p.cannot_store(offer, e.strerror)


class _Interrupted(Exception):
    pass


@attrs.frozen
class _Held:
    """A complete streamed partial's digest, and the file state it was taken from."""

    digest: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, digest: str) -> _Held:
        st = os.stat(path, follow_symlinks=False)
        return cls(digest, st.st_size, st.st_mtime_ns)

    def still(self, path: Path) -> bool:
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


def _size_or_zero(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _hash_prefix(path: Path, n: int) -> Any:
    """SHA-256 state over the first ``n`` bytes already on disk (the resumed part)."""
    h = hashlib.sha256()
    if n:
        with open(path, "rb") as f:
            while n > 0:
                b = f.read(min(p.CHUNK, n))
                if not b:
                    raise OSError(errno.EIO, f"{path} shrank while resuming")
                h.update(b)
                n -= len(b)
    return h


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
