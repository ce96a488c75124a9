"""RelayClient: a node's relay connections (home relay plus peers' home regions).

A node keeps one *home* region, chosen by the lowest TCP round-trip time with
hysteresis (:class:`HomeSelector`), and within it connects to the first
reachable relay in the map's order; when that relay dies it fails over to the next one of the
region, whose mesh delivers to peers still on the others. For a peer whose
home region differs (:meth:`RelayClient.set_peer_region`, from the netmap),
it opens a connection to that region on demand and closes it when idle.

Packets are opaque bytes (WireGuard ciphertext or sealed disco messages).
Asyncio API::

    client = RelayClient(private_key, relay_map)      # RelayMap or [urls] (one region)
    await client.start()
    await client.send(peer_key, data)                 # backpressure; or send_nowait()
    async for src_key, data in client: ...            # or on_packet=callback
    await client.close()

:class:`RelayClientThread` runs one on its own loop thread for blocking code
(the kernel loopback bridge, the userspace device).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import Any

from wgmesh.keys import Key, PrivateKey
from wgmesh.loopthread import LoopThread
from wgmesh.netmap import RelayMap
from wgmesh.relay import RelayURL
from wgmesh.relaynet.connection import (
    ConnectionKeeper,
    MakeSocket,
    RelayConnectError,
    RelayConnection,
    connect_socket,
)

__all__ = ["HomeSelector", "RelayClient", "RelayClientThread", "regions_of"]

log = logging.getLogger("wgmesh.relay")

OnPacket = Callable[[Key, bytes], None]
OnPeer = Callable[[Key, bool, int], None]


def regions_of(relays: RelayMap | Sequence[str] | Mapping[int, Sequence[str]]
               ) -> dict[int, list[str]]:
    """Region id -> relay URLs. A plain list of URLs is one region (id 1). A relay map
    node's key pins its URL (``URL#KEY``, see :class:`~wgmesh.relay.RelayURL`)."""
    if isinstance(relays, RelayMap):
        return {r.region_id: [n.url if n.key is None
                              else f"{n.url.partition('#')[0]}#{n.key.b64()}" for n in r.nodes]
                for r in relays.regions if r.nodes}
    if isinstance(relays, Mapping):
        return {int(k): list(v) for k, v in relays.items() if v}
    return {1: list(relays)} if relays else {}


class HomeSelector:
    """Lowest latency wins, but only by a clear margin (sans-I/O).

    A challenger replaces the current home only when its RTT is below
    ``ratio`` x the home's and at least ``min_gain`` seconds better, so noise
    between similar relays never flaps the home (and the node's published
    ``home_relay``). An unreachable home is replaced at once.
    """

    def __init__(self, *, ratio: float = 2 / 3, min_gain: float = 0.001) -> None:
        self.ratio = ratio
        self.min_gain = min_gain
        self.rtt: dict[int, float | None] = {}
        self.home: int | None = None

    def update(self, region: int, rtt: float | None) -> None:
        """A measurement; ``None`` = unreachable."""
        self.rtt[region] = rtt

    def choose(self) -> int | None:
        alive = {r: t for r, t in self.rtt.items() if t is not None}
        if not alive:
            return self.home
        best = min(alive, key=lambda r: alive[r])
        cur = alive.get(self.home) if self.home is not None else None
        if cur is None or (alive[best] < cur * self.ratio and cur - alive[best] >= self.min_gain):
            self.home = best
        return self.home


async def relay_rtt(url: str, timeout: float = 2.0, make_socket: MakeSocket | None = None,
                    ssl: _ssl.SSLContext | None = None) -> float | None:
    """Round trip of ``GET /health`` on an open connection to the relay (TCP, so it works
    where UDP is blocked; the relay's answer, so it is the latency of the service itself, as
    Tailscale's HTTPS latency check). None if the relay does not answer in time."""
    u = RelayURL.parse(url)
    try:
        async with asyncio.timeout(timeout):
            sock = await connect_socket(make_socket or _plain_socket, u.host, u.port)
            ctx = (ssl or _ssl.create_default_context()) if u.tls else None
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx, server_hostname=u.host if ctx else None)
            try:
                start = time.monotonic()
                writer.write(f"GET /health HTTP/1.1\r\nHost: {u.host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                status = await reader.readline()
                rtt = time.monotonic() - start
            finally:
                writer.close()
    except (OSError, TimeoutError, _ssl.SSLError):
        return None
    return rtt if status.startswith(b"HTTP/1.1 200") else None


def _plain_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


class _RegionLink(ConnectionKeeper):
    """The connection to one region: nearest node first, fail over, back off."""

    def __init__(self, client: RelayClient, region: int, home: bool) -> None:
        self.client = client
        self.region = region
        if home:
            client._home = self
        self.conn: RelayConnection | None = None
        self.ready = asyncio.Event()
        self.last_used = time.monotonic()
        self.connects = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _ordered_urls(self) -> list[str]:
        """The region's listed order (as DERP's), relays that last failed moved last.

        A fixed order puts a region's nodes on the same relay when they can, so
        the mesh hop is the exception, and it makes failover predictable.
        """
        urls = self.client.regions.get(self.region, [])
        rtt = self.client.node_rtt
        return sorted(urls, key=lambda u: u in rtt and rtt[u] is None)

    async def _run(self) -> None:
        c = self.client
        backoff = c.backoff_min
        while True:
            conn = None
            for url in self._ordered_urls():
                try:
                    conn = await RelayConnection.open(
                        url, c.private_key, ssl=c.ssl, on_recv=c._on_recv,
                        on_peer=c._on_peer, keepalive=c.keepalive, idle_timeout=c.idle_timeout,
                        queue_frames=c.queue_frames, timeout=c.connect_timeout,
                        make_socket=c.make_socket, drops=c.drops)
                    break
                except RelayConnectError as e:
                    c.node_rtt[url] = None
                    log.info("relay %s: %s", url, e)
            if conn is None:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, c.backoff_max)
                continue
            self.conn = conn
            self.connects += 1
            conn.note_preferred(self.home)
            self.ready.set()
            connected_at = time.monotonic()
            c._link_up(self)
            await conn.wait_closed()
            self.ready.clear()
            self.conn = None
            if time.monotonic() - connected_at > 10:
                backoff = c.backoff_min
            else:  # a relay that keeps dropping us (or a twin with our key): don't spin
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, c.backoff_max)

    @property
    def home(self) -> bool:
        return self.client._home is self

    def set_home(self, home: bool) -> None:
        if home:
            self.client._home = self
        elif self.home:
            self.client._home = None
        if self.conn is not None:
            self.conn.note_preferred(home)



class RelayClient:
    """A node's relay connections. See the module docstring for the API.

    ``on_packet(src, data)`` and ``on_peer(key, present, reason)`` run on the
    event loop and must not block; without ``on_packet``, packets queue
    (bounded, oldest dropped) for ``async for``. ``make_socket(family)``
    creates the TCP sockets (e.g. inside a network namespace).
    """

    def __init__(self, private_key: PrivateKey,
                 relays: RelayMap | Sequence[str] | Mapping[int, Sequence[str]], *,
                 home_region: int | None = None, on_packet: OnPacket | None = None,
                 on_peer: OnPeer | None = None,
                 on_home_change: Callable[[int], None] | None = None,
                 ssl: _ssl.SSLContext | None = None, keepalive: float = 20.0,
                 idle_timeout: float = 65.0, connect_timeout: float = 5.0,
                 queue_frames: int = 1024, probe_interval: float = 60.0,
                 idle_close: float = 120.0, backoff_min: float = 0.1,
                 backoff_max: float = 10.0, rx_queue: int = 4096,
                 make_socket: MakeSocket | None = None) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.regions = regions_of(relays)
        self.on_packet = on_packet
        self.on_peer = on_peer
        self.on_home_change = on_home_change
        self.ssl = ssl
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.queue_frames = queue_frames
        self.probe_interval = probe_interval
        self.idle_close = idle_close
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.make_socket = make_socket
        self.selector = HomeSelector()
        self.node_rtt: dict[str, float | None] = {}
        self.drops: collections.Counter[str] = collections.Counter()
        self._fixed_home = home_region
        self._links: dict[int, _RegionLink] = {}
        # The home link, kept apart: every packet sent looks it up.
        self._home: _RegionLink | None = None
        self._peer_region: dict[Key, int] = {}
        self._rx: collections.deque[tuple[Key, bytes]] = collections.deque(maxlen=rx_queue)
        self._rx_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ---- life cycle ------------------------------------------------------------------
    async def start(self, *, wait: float | None = 10.0) -> None:
        """Probe, pick the home region, connect; with ``wait``, until connected."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._maintain()))
        if not self.regions:
            raise RelayConnectError("relay map is empty (set_relays() will connect)")
        await self._probe()
        home = self._pick_home()
        self._links[home] = _RegionLink(self, home, home=True)
        if wait:
            await self.wait_connected(wait)

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
        self._home = None
        self._rx_event.set()

    async def __aenter__(self) -> RelayClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Until the home relay has accepted us; raises :class:`RelayConnectError`."""
        try:
            async with asyncio.timeout(timeout):
                while (link := self._home_link()) is None:
                    await asyncio.sleep(0.05)
                await link.ready.wait()
        except TimeoutError as e:
            raise RelayConnectError(f"no home relay within {timeout}s") from e

    # ---- home region -----------------------------------------------------------------
    async def _probe(self) -> None:
        urls = [u for us in self.regions.values() for u in us]
        rtts = await asyncio.gather(*(relay_rtt(u, make_socket=self.make_socket, ssl=self.ssl)
                                      for u in urls))
        self.node_rtt.update(zip(urls, rtts, strict=True))
        for region, us in self.regions.items():
            alive = [t for u in us if (t := self.node_rtt.get(u)) is not None]
            self.selector.update(region, min(alive) if alive else None)

    def _pick_home(self) -> int:
        if self._fixed_home is not None and self._fixed_home in self.regions:
            self.selector.home = self._fixed_home
            return self._fixed_home
        return self.selector.choose() or next(iter(self.regions))

    @property
    def home_region(self) -> int | None:
        return self._home.region if self._home is not None else None

    def _home_link(self) -> _RegionLink | None:
        """``None`` before :meth:`start` or while the relay map is empty."""
        return self._home

    async def _maintain(self) -> None:
        """Re-probe now and then; move home only past the hysteresis; close idle links."""
        last_probe = time.monotonic()
        while True:
            await asyncio.sleep(min(5.0, self.probe_interval))
            now = time.monotonic()
            if self.regions and now - last_probe >= self.probe_interval:
                last_probe = now
                await self._probe()
                self._move_home(self._pick_home())
            for region, link in list(self._links.items()):
                if not link.home and now - link.last_used > self.idle_close:
                    del self._links[region]
                    await link.close()

    def _move_home(self, region: int) -> None:
        old = self.home_region
        if region == old:
            return
        if old is not None:
            self._links[old].set_home(False)
        link = self._links.get(region)
        if link is None:
            self._links[region] = _RegionLink(self, region, home=True)
        else:
            link.set_home(True)
        if self.on_home_change is not None:
            self.on_home_change(region)

    async def set_relays(self, relays: RelayMap | Sequence[str] | Mapping[int, Sequence[str]]
                         ) -> None:
        """A new relay map (netmap delta): drop vanished regions, re-home if ours went."""
        self.regions = regions_of(relays)
        for region in [r for r in self._links if r not in self.regions]:
            link = self._links.pop(region)
            if self._home is link:
                self._home = None
            await link.close()
        self.selector.rtt = {r: t for r, t in self.selector.rtt.items() if r in self.regions}
        if self.regions and self.home_region is None:
            await self._probe()
            home = self._pick_home()
            self._links[home] = _RegionLink(self, home, home=True)
            if self.on_home_change is not None:
                self.on_home_change(home)

    def addresses_changed(self, local: Collection[str]) -> None:
        """This host's addresses are now ``local``: a connection going out from one it no
        longer has is dead (the relay's answers cannot come back), so drop it and dial
        again now rather than at the idle timeout."""
        for link in self._links.values():
            conn = link.conn
            if conn is not None and not conn.closed and conn.local_ip not in local:
                log.info("relay %s: our address %s is gone; reconnecting", conn.url,
                         conn.local_ip)
                conn.abort("address_gone")

    def _link_up(self, link: _RegionLink) -> None:
        if link.home and link.connects > 1:
            log.info("home relay region %s reconnected via %s", link.region, link.conn
                     and link.conn.url)

    # ---- sending ---------------------------------------------------------------------
    def set_peer_region(self, key: Key, region: int | None) -> None:
        """Where ``key`` is homed (netmap ``home_relay``); ``None``/0 = reach it via ours."""
        if region:
            self._peer_region[key] = region
        else:
            self._peer_region.pop(key, None)

    def _link_for(self, dst: Key) -> _RegionLink | None:
        region = self._peer_region.get(dst)
        if region is None or region not in self.regions:
            return self._home_link()
        link = self._links.get(region)
        if link is None:
            link = self._links[region] = _RegionLink(self, region, home=False)
        link.last_used = time.monotonic()
        return link

    def send_nowait(self, dst: Key, data: bytes) -> bool:
        """Queue ``data`` for ``dst``; False (and a drop counted) if no relay is connected."""
        link = None if self._closed else self._link_for(dst)
        conn = link.conn if link is not None else None
        if conn is None or conn.closed:
            self.drops["not_connected"] += 1
            return False
        conn.send(dst, data)
        return True

    async def send(self, dst: Key, data: bytes, *, timeout: float = 5.0) -> bool:
        """Send with backpressure: waits for a connection and for socket space."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    link = self._link_for(dst)
                    if link is None:
                        await asyncio.sleep(0.05)
                        continue
                    await link.ready.wait()
                    conn = link.conn
                    if conn is not None and not conn.closed:
                        await conn.drain()
                        if not conn.closed:
                            conn.send(dst, data)
                            return True
                    await asyncio.sleep(0)
        except TimeoutError:
            self.drops["send_timeout"] += 1
            return False

    async def ping(self, timeout: float = 5.0) -> float:
        """Round trip through the home relay, in seconds."""
        await self.wait_connected(timeout)
        link = self._home_link()
        if link is None or link.conn is None:
            raise RelayConnectError("home relay connection lost")
        return await link.conn.ping(timeout)

    # ---- receiving -------------------------------------------------------------------
    def _on_recv(self, src: Key, data: bytes) -> None:
        if self.on_packet is not None:
            try:
                self.on_packet(src, data)
            except Exception:  # the caller's bug must not cost the relay connection
                self.drops["on_packet_error"] += 1
                log.exception("relay on_packet callback failed")
            return
        if len(self._rx) == self._rx.maxlen:
            self.drops["rx_queue_full"] += 1
        self._rx.append((src, data))
        self._rx_event.set()

    def _on_peer(self, key: Key, present: bool, reason: int) -> None:
        if self.on_peer is not None:
            try:
                self.on_peer(key, present, reason)
            except Exception:
                self.drops["on_peer_error"] += 1
                log.exception("relay on_peer callback failed")

    def __aiter__(self) -> AsyncIterator[tuple[Key, bytes]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[tuple[Key, bytes]]:
        while not self._closed:
            while self._rx:
                yield self._rx.popleft()
            self._rx_event.clear()
            await self._rx_event.wait()

    def status(self) -> dict[str, Any]:
        return {
            "home_region": self.home_region,
            "links": {r: {"url": str(lk.conn.url) if lk.conn else None, "home": lk.home,
                          "connects": lk.connects} for r, lk in self._links.items()},
            "rtt": dict(self.node_rtt),
            "drops": dict(self.drops),
        }


class RelayClientThread:
    """A :class:`RelayClient` on its own :class:`~wgmesh.loopthread.LoopThread`, for
    blocking callers.

    :meth:`send` is thread-safe and never blocks: packets are batched into the
    loop with one wake-up per burst, not one per packet. ``on_packet`` runs on
    the relay thread; hand packets to your own thread if it must not.
    """

    def __init__(self, private_key: PrivateKey,
                 relays: RelayMap | Sequence[str] | Mapping[int, Sequence[str]],
                 *, on_packet: OnPacket, **kw: Any) -> None:
        self._args = (private_key, relays)
        self._kw = {**kw, "on_packet": on_packet}
        self._thread = LoopThread("wgmesh-relay")
        self._out: collections.deque[tuple[Key, bytes]] = collections.deque()
        self._wake = False
        self.client: RelayClient | None = None

    def start(self, timeout: float = 10.0) -> RelayClientThread:
        async def boot() -> RelayClient:
            c = RelayClient(*self._args, **self._kw)
            await c.start(wait=timeout)
            return c

        # a failed start stops the loop, which cancels whatever the client had started
        self.client = self._thread.start_with(boot(), timeout + 5)
        return self

    def send(self, dst: Key, data: bytes) -> None:
        self._out.append((dst, data))
        if not self._wake:
            self._wake = True
            self._thread.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._wake = False  # before draining: a send after this line schedules again
        out, client = self._out, self.client
        while out:
            dst, data = out.popleft()
            if client is not None:
                client.send_nowait(dst, data)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the relay loop (e.g. ``client.set_peer_region``)."""
        self._thread.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        if self.client is None:
            self._thread.stop()
        else:
            self._thread.stop_with(self.client.close(), 10)

    def __enter__(self) -> RelayClientThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
