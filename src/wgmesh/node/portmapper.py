"""The node's port mapper: holds a gateway mapping of its WireGuard port, on asyncio.

Why: behind an endpoint-dependent ("symmetric") NAT no reflexive address works
for a peer, but most home routers open a port on request; the mapped endpoint
is then a candidate like a STUN one. All protocol work lives elsewhere: PCP and
NAT-PMP in :mod:`wgmesh.portmap` (sans-I/O), UPnP-IGD in the ``miniupnpc``
binding. This module moves their datagrams, runs the blocking UPnP calls in a
thread under a deadline, and decides what to try:

* PCP, then NAT-PMP, then UPnP-IGD, each until one maps; a held mapping that
  fails (lease expired, gateway gone) withdraws its endpoint at once and the
  round starts again after a back-off (1 s doubling up to ``retry_interval``);
* leases are renewed, and re-mapped after a gateway reboot, by
  :class:`~wgmesh.portmap.Lease` (epochs in replies and in the multicast
  announcements on 224.0.0.1:5350); UPnP, which has neither, is checked every
  ``check_interval`` and re-added when the gateway forgot it;
* a new default gateway or local address ends the mapping and starts a round;
* :meth:`PortMapper.close` deletes the mapping. What deleting needs (protocol,
  gateway, ports, PCP nonce) is written to ``state_file`` while a mapping is
  held, so the next start after a ``kill -9`` deletes the stale one first.

The gateway is untrusted: only replies from its address are read, only
:class:`~wgmesh.portmap.Lease`-checked replies (or a UPnP mapping read back as
pointing at us) become an endpoint, and a flood of datagrams is bounded by a
fixed-size inbox. Clock and randomness are injected.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import attrs

from wgmesh.portmap import (
    ANNOUNCE_GROUP_V4,
    ANNOUNCE_PORT,
    DEFAULT_LIFETIME,
    NONCE_LEN,
    SERVER_PORT,
    Address,
    Event,
    Failed,
    Lease,
    Mapped,
    Mapping,
    Method,
    PortmapError,
    Removed,
    unreachable,
)

__all__ = ["METHODS", "Attempt", "PortMapper", "default_gateway", "probe"]

log = logging.getLogger(__name__)

METHODS: tuple[Method, ...] = ("pcp", "natpmp", "upnp")
DESCRIPTION = "wgmesh"  # the UPnP mapping's description, shown in router UIs
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2
_INBOX = 256  # datagrams queued from the gateway; a flood drops the oldest
_DELETE_WAIT = 2.0  # seconds a deletion may take on close
_UPNP_CONFLICT = "Conflict"  # miniupnpc's message for UPnP error 718
_UPNP_PERMANENT_ONLY = "OnlyPermanentLeases"  # error 725: the gateway wants lease 0
_UPNP_PORT_TRIES = 3


def default_gateway(route_table: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this process's network namespace (lowest metric)."""
    best: tuple[int, str] | None = None
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) < 7 or f[1] != "00000000" or f[7] != "00000000":
            continue
        flags, metric = int(f[3], 16), int(f[6])
        if flags & _RTF_UP and flags & _RTF_GATEWAY and (best is None or metric < best[0]):
            best = (metric, socket.inet_ntoa(struct.pack("<I", int(f[2], 16))))
    return best[1] if best else None


def _source_ip(gateway: str) -> str:
    """The local address this host uses towards ``gateway`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, SERVER_PORT))
        return str(s.getsockname()[0])


def _text(addr: Address | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


@attrs.define
class Attempt:
    """One protocol's latest outcome: mapped (``external``) or ``error``, why not."""

    ok: bool = False
    external: Address | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "external": _text(self.external), "error": self.error}


class _Channel(asyncio.DatagramProtocol):
    """Datagrams from the gateway: replies on a socket connected to its port 5351 (so
    an ICMP "port unreachable" arrives as an error) and, optionally, its multicast
    announcements on port 5350. Anything from another source is dropped."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.client_ip = ""
        #: (datagram, came to the announcement group) or a socket error
        self._inbox: collections.deque[tuple[bytes, bool] | OSError] = collections.deque(
            maxlen=_INBOX)
        self._waiter: asyncio.Future[None] | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._request: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, gateway: str, *, announcements: bool) -> _Channel:
        loop = asyncio.get_running_loop()
        ch = cls(gateway)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: ch, remote_addr=(gateway, SERVER_PORT), family=socket.AF_INET)
        ch._request = transport
        ch.client_ip = transport.get_extra_info("sockname")[0]
        if announcements:
            try:
                sock = ch._announce_socket()
            except OSError as e:  # another listener without SO_REUSEADDR: go without
                log.info("port mapping: no gateway announcements (%s)", e)
            else:
                await loop.create_datagram_endpoint(lambda: _Announcements(ch), sock=sock)
        return ch

    def _announce_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ANNOUNCE_GROUP_V4, ANNOUNCE_PORT))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack(
                "4s4s", socket.inet_aton(ANNOUNCE_GROUP_V4), socket.inet_aton(self.client_ip)))
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transports.append(transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.put(data, addr, announced=False)

    def put(self, data: bytes, addr: tuple[Any, ...], *, announced: bool) -> None:
        if addr[0] == self.gateway:
            self._inbox.append((data, announced))
            self._wake()

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self._inbox.append(exc)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def interrupt(self) -> None:
        """End a pending :meth:`get` early (it returns None)."""
        self._wake()

    def send(self, datagrams: Sequence[bytes]) -> None:
        if self._request is not None:
            for d in datagrams:
                self._request.sendto(d)

    async def get(self, timeout: float) -> tuple[bytes, bool] | OSError | None:
        """The next datagram or socket error; None after ``timeout`` or an interrupt."""
        if not self._inbox and timeout > 0:
            self._waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiter, timeout)
            self._waiter = None
        return self._inbox.popleft() if self._inbox else None

    def close(self) -> None:
        for t in self._transports:
            t.close()
        self._transports.clear()


class _Announcements(asyncio.DatagramProtocol):
    """The multicast group's datagrams into the channel, marked as announcements."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.channel.connection_made(transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.channel.put(data, addr, announced=True)


class _Igd:
    """The gateway's UPnP-IGD through miniupnpc; every method blocks (run it in a thread)."""

    def __init__(self, discover_ms: int) -> None:
        import miniupnpc  # a C extension: loaded only when UPnP is tried

        u = miniupnpc.UPnP()
        u.discoverdelay = discover_ms
        if not u.discover():
            raise PortmapError("no UPnP device answered SSDP discovery")
        try:
            u.selectigd()
        except Exception as e:  # the binding raises bare Exception
            raise PortmapError(f"no UPnP-IGD among the devices found: {e}") from None
        self.u = u
        self.lanaddr = str(u.lanaddr)

    def external_ip(self) -> str:
        ip = str(self.u.externalipaddress() or "")
        why = unreachable(ip) if ip else "gateway reports no external address"
        if why is not None:
            raise PortmapError(why)
        return ip

    def ours(self, external_port: int, internal_port: int) -> bool:
        """Whether the gateway forwards ``external_port`` to us, at ``internal_port``."""
        got = self.u.getspecificportmapping(external_port, "UDP")
        return bool(got) and got[0] == self.lanaddr and int(got[1]) == internal_port

    def add(self, external_port: int, internal_port: int, lifetime: int) -> int:
        """Map and read the mapping back; the lifetime granted (0: permanent)."""
        try:
            self.u.addportmapping(external_port, "UDP", self.lanaddr, internal_port,
                                  DESCRIPTION, "", lifetime)
        except Exception as e:
            if _UPNP_PERMANENT_ONLY not in str(e) or lifetime == 0:
                raise
            return self.add(external_port, internal_port, 0)
        if not self.ours(external_port, internal_port):
            raise PortmapError(f"gateway reports port {external_port} mapped elsewhere "
                               "after granting it")
        return lifetime

    def map(self, suggested: Sequence[int], internal_port: int, lifetime: int,
            ) -> tuple[Address, int]:
        """The first of ``suggested`` external ports the gateway grants, and the lifetime."""
        ip = self.external_ip()
        error: Exception | None = None
        for port in suggested:
            try:
                return (ip, port), self.add(port, internal_port, lifetime)
            except Exception as e:
                if _UPNP_CONFLICT not in str(e):
                    raise
                error = e
        raise PortmapError(f"every external port tried is taken ({error})")

    def delete(self, external_port: int, internal_port: int) -> None:
        """Delete the mapping if it is still ours (never another host's)."""
        if self.ours(external_port, internal_port):
            self.u.deleteportmapping(external_port, "UDP")


Endpoint = Callable[[Address | None], None]


class PortMapper:
    """Maps ``internal_port`` (UDP) on the default gateway and keeps the mapping alive.

    :attr:`endpoint` is the mapped ``(ip, port)`` or None; ``on_change`` hears every
    change (None: withdraw it). :meth:`report` says what each protocol tried gave.
    """

    def __init__(self, internal_port: int, *, state_file: Path | None = None,
                 on_change: Endpoint | None = None, methods: Sequence[Method] = METHODS,
                 gateway: str | None = None, lifetime: int = DEFAULT_LIFETIME,
                 retry_interval: float = 60.0, check_interval: float = 10.0,
                 upnp_timeout: float = 8.0, upnp_discover_ms: int = 2000,
                 remap_spread: float = 5.0, announcements: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 urandom: Callable[[int], bytes] = os.urandom,
                 rand: Callable[[], float] = random.random) -> None:
        self.internal_port, self.methods, self.lifetime = internal_port, tuple(methods), lifetime
        self.state_file, self.on_change = state_file, on_change
        self._fixed_gateway = gateway
        self._retry, self._check = retry_interval, check_interval
        self._upnp_timeout, self._discover_ms = upnp_timeout, upnp_discover_ms
        self._spread, self._announcements = remap_spread, announcements
        self._clock, self._urandom, self._rand = clock, urandom, rand
        self.gateway: str | None = gateway
        self.endpoint: Address | None = None
        self.method: Method | None = None
        self.attempts: dict[Method, Attempt] = {}
        self.gateway_resets = 0
        self._nonce = urandom(NONCE_LEN)
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()
        self._channel: _Channel | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Start mapping in the background (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_settled(self) -> None:
        """Until the first round ended: a mapping held, or every protocol failed."""
        await self._settled.wait()

    async def close(self) -> None:
        """Delete the mapping (best effort, bounded) and stop."""
        self._stop.set()
        if self._channel is not None:
            self._channel.interrupt()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task),
                                   self._upnp_timeout + _DELETE_WAIT + 1)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._publish(None)

    def report(self) -> dict[str, Any]:
        """For netcheck and status: the mapping held, and each protocol tried."""
        return {"gateway": self.gateway, "method": self.method,
                "external": _text(self.endpoint), "gateway_resets": self.gateway_resets,
                "protocols": {m: a.to_json() for m, a in self.attempts.items()}}

    # ------------------------------------------------------------------ rounds

    async def _run(self) -> None:
        try:
            await self._delete_stale()
        except Exception as e:  # the stale mapping then expires with its lease
            log.info("port mapping: could not delete the earlier run's mapping: %s", e)
        backoff = 1.0
        while not self._stop.is_set():
            held = False
            try:
                held = await self._round()
            except Exception as e:  # a bug must not end port mapping for the node's life
                log.exception("port mapping round failed")
                self._publish(None)
                self.attempts.setdefault(self.methods[0], Attempt()).error = f"internal: {e}"
            self._settled.set()
            backoff = 1.0 if held else min(self._retry, backoff * 2)
            await self._sleep(backoff)

    async def _round(self) -> bool:
        """Each protocol in turn until one maps; True if a mapping was held (now ended)."""
        gw = self._fixed_gateway or default_gateway()
        self.gateway = gw
        if gw is None:
            for m in self.methods:
                self.attempts[m] = Attempt(error="no IPv4 default gateway")
            return False
        for method in self.methods:
            if self._stop.is_set():
                return False
            hold = self._hold_upnp(gw) if method == "upnp" else self._hold_pmp(method, gw)
            if await hold:
                return True
        return False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ------------------------------------------------------------ PCP, NAT-PMP

    async def _hold_pmp(self, method: Literal["pcp", "natpmp"], gw: str) -> bool:
        try:
            ch = await _Channel.open(gw, announcements=self._announcements)
        except OSError as e:
            return self._failed(method, f"cannot reach gateway {gw}: {e}", held=False)
        self._channel = ch
        lease = Lease(method, internal_port=self.internal_port, client_ip=ch.client_ip,
                      nonce=self._nonce, lifetime=self.lifetime,
                      remap_delay=self._rand() * self._spread)
        held, resets = False, 0
        try:
            ch.send(lease.start(self._clock()))
            next_check = self._clock() + self._check
            while not self._stop.is_set():
                got = await self._exchange(ch, lease, next_check)
                if isinstance(got, OSError):
                    if held:  # e.g. the gateway restarting: the lease keeps trying
                        continue
                    why = ("gateway port 5351 closed (ICMP port unreachable)"
                           if isinstance(got, ConnectionRefusedError) else f"socket: {got}")
                    return self._failed(method, why, held=False)
                for ev in got or ():
                    if isinstance(ev, Mapped):
                        held = True
                        self.gateway_resets += lease.gateway_resets - resets
                        resets = lease.gateway_resets
                        self._mapped(ev.mapping, gw, ch.client_ip)
                    elif isinstance(ev, Failed):
                        return self._failed(method, ev.failure.reason, held=held)
                if self._clock() >= next_check:
                    next_check = self._clock() + self._check
                    if (moved := self._moved(gw, ch.client_ip)) is not None:
                        await self._delete_pmp(ch, lease)
                        return self._failed(method, moved, held=held)
            if lease.state in ("mapping", "mapped"):
                await self._delete_pmp(ch, lease)
            return held
        finally:
            self._channel = None
            ch.close()

    async def _exchange(self, ch: _Channel, lease: Lease, until: float,
                        ) -> list[Event] | OSError | None:
        """Drive ``lease`` until it has events, the socket an error, or ``until`` (or a
        stop) comes: then None."""
        while not (self._stop.is_set() and ch is self._channel):
            now = self._clock()
            deadline = min(until, lease.next_deadline or until)
            got = await ch.get(deadline - now)
            now = self._clock()
            if isinstance(got, OSError):
                return got
            if got is not None:
                ch.send(lease.receive(got[0], now, announcement=got[1]))
            if (due := lease.next_deadline) is not None and now >= due:
                ch.send(lease.on_timeout(now))  # also under a flood of datagrams
            if events := lease.events():
                return events
            if now >= until:
                return None
        return None

    async def _delete_pmp(self, ch: _Channel, lease: Lease) -> None:
        self._channel = None  # a stop no longer interrupts: the deletion must finish
        ch.send(lease.delete(self._clock()))
        until = self._clock() + _DELETE_WAIT
        while self._clock() < until:
            got = await self._exchange(ch, lease, until)
            if isinstance(got, list) and any(isinstance(e, Removed) for e in got):
                self._forget()
                return
            if isinstance(got, list) and any(isinstance(e, Failed) for e in got):
                break
        log.info("port mapping: %s deletion unconfirmed", lease.method)

    # ------------------------------------------------------------------ UPnP

    async def _upnp(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self._upnp_timeout)
        except TimeoutError:
            raise PortmapError(f"UPnP-IGD: no answer within {self._upnp_timeout:g} s") from None

    async def _hold_upnp(self, gw: str) -> bool:
        ports = [self.internal_port, *(1024 + int(self._rand() * 64000)
                                       for _ in range(_UPNP_PORT_TRIES - 1))]
        try:
            igd: _Igd = await self._upnp(_Igd, self._discover_ms)
            external, lifetime = await self._upnp(igd.map, ports, self.internal_port,
                                                  self.lifetime)
        except Exception as e:
            return self._failed("upnp", f"UPnP-IGD: {e}", held=False)
        self._mapped(Mapping("upnp", self.internal_port, external, lifetime, 0), gw,
                     igd.lanaddr)
        renew_at = self._clock() + lifetime / 2 if lifetime else None
        try:
            while not self._stop.is_set():
                now = self._clock()
                await self._sleep(min(self._check, (renew_at or now + self._check) - now))
                if self._stop.is_set():
                    break
                if (moved := self._moved(gw, igd.lanaddr)) is not None:
                    await self._upnp(igd.delete, external[1], self.internal_port)
                    return self._failed("upnp", moved, held=True)
                # UPnP has no epoch: read the mapping back to see whether the gateway
                # forgot it (a reboot, or a user in its web UI), and re-add it then.
                forgotten = not await self._upnp(igd.ours, external[1], self.internal_port)
                self.gateway_resets += forgotten
                if forgotten or (renew_at is not None and self._clock() >= renew_at):
                    lifetime = await self._upnp(igd.add, external[1], self.internal_port,
                                                self.lifetime)
                    renew_at = self._clock() + lifetime / 2 if lifetime else None
                if (ip := await self._upnp(igd.external_ip)) != external[0]:
                    external = (ip, external[1])
                    self._mapped(Mapping("upnp", self.internal_port, external, lifetime, 0),
                                 gw, igd.lanaddr)
            await self._upnp(igd.delete, external[1], self.internal_port)
            self._forget()
            return True
        except Exception as e:
            return self._failed("upnp", f"UPnP-IGD: {e}", held=True)

    # --------------------------------------------------------------- outcomes

    def _mapped(self, mapping: Mapping, gw: str, client_ip: str) -> None:
        self.attempts[mapping.method] = Attempt(True, mapping.external)
        self.method = mapping.method
        if self.state_file is not None:
            self._write_state({"method": mapping.method, "gateway": gw, "client_ip": client_ip,
                               "internal_port": self.internal_port,
                               "external": list(mapping.external), "nonce": self._nonce.hex()})
        self._publish(mapping.external)

    def _failed(self, method: Method, why: str, *, held: bool) -> bool:
        log.info("port mapping: %s: %s", method, why)
        self.attempts[method] = Attempt(error=why)
        if self.method == method:
            self.method = None
        self._publish(None)
        return held

    def _publish(self, endpoint: Address | None) -> None:
        if endpoint is not None:
            self._settled.set()
        if endpoint == self.endpoint:
            return
        self.endpoint = endpoint
        if self.on_change is not None:
            try:
                self.on_change(endpoint)
            except Exception:
                log.exception("port mapping: on_change failed")

    def _moved(self, gw: str, client_ip: str) -> str | None:
        """Why the mapping no longer fits this host's network, or None."""
        now_gw = self._fixed_gateway or default_gateway()
        if now_gw != gw:
            return f"default gateway changed from {gw} to {now_gw}"
        try:
            ip = _source_ip(gw)
        except OSError as e:
            return f"gateway {gw} unreachable: {e}"
        return None if ip == client_ip else f"local address changed from {client_ip} to {ip}"

    # ------------------------------------------------------------- state file

    def _write_state(self, state: dict[str, Any]) -> None:
        assert self.state_file is not None
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _forget(self) -> None:
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    async def _delete_stale(self) -> None:
        """Delete the mapping an earlier run (killed before ``close``) left behind."""
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            st = json.loads(self.state_file.read_text())
            method = cast(Method, st["method"])
            gw, port = str(st["gateway"]), int(st["internal_port"])
            log.info("port mapping: deleting the %s mapping of port %d left by an earlier run",
                     method, port)
            if method == "upnp":
                igd: _Igd = await self._upnp(_Igd, self._discover_ms)
                await self._upnp(igd.delete, int(st["external"][1]), port)
            else:
                ch = await _Channel.open(gw, announcements=False)
                try:
                    lease = Lease(method, internal_port=port,
                                  client_ip=ch.client_ip, nonce=bytes.fromhex(st["nonce"]))
                    await self._delete_pmp(ch, lease)
                finally:
                    ch.close()
        finally:
            self._forget()


async def probe(*, gateway: str | None = None, methods: Sequence[Method] = METHODS,
                timeout: float = 12.0, upnp_discover_ms: int = 1000) -> dict[str, Any]:
    """Ask the gateway with every protocol at once for a mapping of a throwaway port, then
    delete it: which protocols map, the external address each gave, why the others fail.

    For ``netcheck`` and ``wgmesh lab check``; a running node's :meth:`PortMapper.report`
    says what it holds."""
    gateway = gateway or default_gateway()

    async def one(method: Method) -> dict[str, Any]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", 0))
            pm = PortMapper(s.getsockname()[1], methods=(method,), gateway=gateway,
                            lifetime=120, announcements=False, retry_interval=timeout,
                            upnp_discover_ms=upnp_discover_ms)
            pm.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pm.wait_settled(), timeout)
            await pm.close()
        got = pm.attempts.get(method, Attempt(error=f"no outcome within {timeout:g} s"))
        return got.to_json()

    results = await asyncio.gather(*(one(m) for m in methods))
    return {"gateway": gateway, "protocols": dict(zip(methods, results, strict=True))}
