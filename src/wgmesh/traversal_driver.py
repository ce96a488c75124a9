"""The thin asyncio driver that runs a :class:`~wgmesh.traversal.Traversal` for real.

It owns only timers and the extra port-search sockets; everything else is a
callback, so it fits either backend:

* ``send_main(data, addr)`` sends from the WireGuard port: the userspace
  backend's ``send_other``, the kernel's ``sharedsock``, or :class:`UdpPort`.
* ``send_relay(key, data)``: ``RelayClient.send_nowait`` (or a thread's ``send``).
* ``on_action(action)`` gets every data-plane action (``SetEndpoint``,
  ``RelayIngress``, ``PathChanged``, ``ObservedAddr``, ``RefreshCandidates``)
  on the loop thread. Wiring for the userspace backend: ``SetEndpoint(RELAY)`` ->
  ``set_peer_relay(key, relay send)``; ``SetEndpoint(addr, sock=0)`` ->
  ``set_endpoint``; ``sock != 0`` -> ``set_peer_relay(key, lambda b:
  driver.send_from(sock, b, addr))`` and hand what ``on_extra`` reports for that
  socket to ``inject_from_relay``. Kernel: ``SetEndpoint`` is one netlink
  endpoint change (``handshake=True``: re-add the peer with a keepalive so a
  fresh handshake follows); ``RelayIngress(False)``: the loopback bridge drops
  that peer's relayed packets.
* Inputs are thread-safe: :meth:`feed_udp` (disco from the WireGuard port, e.g.
  from ``on_other``), :meth:`feed_relay`, :meth:`feed_stats`, and :meth:`submit`
  for anything else (``lambda now: t.upsert_peer(..., now)``).

``python -m wgmesh.traversal_driver`` runs one node over a plain UDP socket and
the real relay, printing JSON lines: the lab tests and the benchmark use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from wgmesh import disco
from wgmesh.keys import Key, PrivateKey
from wgmesh.traversal import (
    Action,
    ClosePorts,
    OpenPorts,
    SendDisco,
    SendViaRelay,
    Traversal,
)

__all__ = ["TraversalDriver", "UdpPort"]

Addr = tuple[str, int]


class TraversalDriver:
    """Timers, extra sockets and action dispatch for one Traversal on one event loop."""

    def __init__(self, traversal: Traversal, loop: asyncio.AbstractEventLoop, *,
                 send_main: Callable[[bytes, Addr], object],
                 send_relay: Callable[[Key, bytes], object],
                 on_action: Callable[[Action], object] | None = None,
                 on_extra: Callable[[int, bytes, Addr], object] | None = None) -> None:
        self.t = traversal
        self.loop = loop
        self.send_main = send_main
        self.send_relay = send_relay
        self.on_action = on_action
        self.on_extra = on_extra
        self._socks: dict[int, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # ---- thread-safe inputs -------------------------------------------------------
    def submit(self, fn: Callable[[float], list[Action]]) -> None:
        """Run ``fn(now)`` on the loop and carry out the actions it returns."""
        self.loop.call_soon_threadsafe(self._run, fn)

    def feed_udp(self, data: bytes, src: Addr, sock: int = 0) -> None:
        self.submit(lambda now: self.t.on_udp(data, src, now, sock))

    def feed_relay(self, src: Key, data: bytes) -> None:
        self.submit(lambda now: self.t.on_relay(src, data, now))

    def feed_stats(self, key: Key, endpoint: Any, last_handshake: float | None,
                   rx_bytes: int, tx_bytes: int) -> None:
        self.submit(lambda now: self.t.on_wg_stats(key, now, endpoint, last_handshake,
                                                   rx_bytes, tx_bytes))

    def send_from(self, sock: int, data: bytes, addr: Addr) -> None:
        """Send from an extra (port-search) socket; dropped if it is closed."""
        s = self._socks.get(sock)
        if s is not None:
            with contextlib.suppress(OSError):
                s.sendto(data, addr)

    def close(self) -> None:
        """Stop timers and close extra sockets (call on the loop)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for sid in list(self._socks):
            self._close_sock(sid)

    # ---- the loop side ------------------------------------------------------------
    def udp_on_loop(self, data: bytes, src: Addr, sock: int = 0) -> None:
        """:meth:`feed_udp` for callers already on the loop (no extra hop)."""
        self._run(lambda now: self.t.on_udp(data, src, now, sock))

    def relay_on_loop(self, src: Key, data: bytes) -> None:
        self._run(lambda now: self.t.on_relay(src, data, now))

    def _run(self, fn: Callable[[float], list[Action]]) -> None:
        if self._closed:
            return
        self._do(fn(self.loop.time()))

    def _do(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendDisco):
                if a.sock == 0:
                    with contextlib.suppress(OSError):
                        self.send_main(a.data, a.addr)
                else:
                    self.send_from(a.sock, a.data, a.addr)
            elif isinstance(a, SendViaRelay):
                self.send_relay(a.key, a.data)
            elif isinstance(a, OpenPorts):
                for sid in a.socks:
                    self._open_sock(sid)
            elif isinstance(a, ClosePorts):
                for sid in a.socks:
                    self._close_sock(sid)
            elif self.on_action is not None:
                self.on_action(a)
        self._schedule()

    def _schedule(self) -> None:
        wake = self.t.next_wakeup()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake is not None and not self._closed:
            self._timer = self.loop.call_at(max(wake, self.loop.time()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._run(self.t.tick)

    def _open_sock(self, sid: int) -> None:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind(("0.0.0.0", 0))
        except OSError:
            return  # out of descriptors: that socket just doesn't take part
        self._socks[sid] = s
        self.loop.add_reader(s.fileno(), self._readable, sid, s)

    def _close_sock(self, sid: int) -> None:
        s = self._socks.pop(sid, None)
        if s is not None:
            self.loop.remove_reader(s.fileno())
            s.close()

    def _readable(self, sid: int, s: socket.socket) -> None:
        for _ in range(64):
            try:
                data, src = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            addr = (src[0], src[1])
            if disco.is_disco(data):
                self.udp_on_loop(data, addr, sid)
            elif self.on_extra is not None:
                self.on_extra(sid, data, addr)


class UdpPort:
    """A plain UDP socket standing in for the WireGuard port: disco to the driver."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int = 0,
                 on_other: Callable[[bytes, Addr], object] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.loop = loop
        self.on_other = on_other
        self.driver: TraversalDriver | None = None
        loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, data: bytes, addr: Addr) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, addr)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, src = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError, OSError):
                return
            addr = (src[0], src[1])
            if disco.is_disco(data) and self.driver is not None:
                self.driver.udp_on_loop(data, addr, 0)
            elif self.on_other is not None:
                self.on_other(data, addr)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# ---------------------------------------------------------------- lab node


def _emit(**kw: Any) -> None:
    print(json.dumps({**kw, "wall": time.time()}), flush=True)


async def _node(a: argparse.Namespace) -> None:
    from wgmesh.netcheck import StunServer, local_addresses, netcheck
    from wgmesh.relay_client import RelayClient
    from wgmesh.traversal import Candidates, PathChanged, TraversalConfig

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    node = PrivateKey.load(a.key_file)
    disco_key = PrivateKey.load(a.disco_key_file)
    peer, peer_disco = Key(a.peer), Key(a.peer_disco)
    cfg = TraversalConfig(active_timeout=None, port_search=not a.no_port_search,
                          search_ports=a.search_ports)
    t = Traversal(disco_key, node.public, cfg)
    port = UdpPort(loop, a.port)
    servers = [StunServer((h, int(p))) for h, p in (s.rsplit(":", 1) for s in a.stun)]
    report = await loop.run_in_executor(None, lambda: netcheck(servers, sock=port.sock,
                                                               hairpin=False))
    cands = Candidates(port.port)
    cands.update(lan=local_addresses(), reflexive=[r for r in (report.ipv4,) if r],
                 hard_nat=report.hard_nat)
    _emit(event="netcheck", t=time.monotonic() - t0, ipv4=report.ipv4,
          hard_nat=report.hard_nat, candidates=[str(e) for e in cands.endpoints])

    driver: TraversalDriver | None = None

    def on_relay(src: Key, data: bytes) -> None:
        if driver is not None and disco.is_disco(data):
            driver.relay_on_loop(src, data)

    relay = RelayClient(node, [a.relay], on_packet=on_relay)
    await relay.start()
    _emit(event="relay", t=time.monotonic() - t0, rtt=await relay.ping())

    done = asyncio.Event()

    def on_action(act: Action) -> None:
        if isinstance(act, PathChanged):
            if act.path == "direct" and a.exit_after_direct is not None:
                loop.call_later(a.exit_after_direct, done.set)
            info = t.path(act.key)
            _emit(event="path", t=time.monotonic() - t0, path=act.path,
                  endpoint=act.endpoint, sock=act.sock, rtt=act.rtt, reason=act.reason,
                  state=info.state.value if info else None)

    driver = TraversalDriver(t, loop, send_main=port.send, send_relay=relay.send_nowait,
                             on_action=on_action)
    port.driver = driver
    driver.submit(lambda now: t.set_local(cands.addrs, now, hard_nat=report.hard_nat)
                  + t.upsert_peer(peer, peer_disco, [], now))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), a.duration)
    finally:
        info = t.path(peer)
        _emit(event="final", t=time.monotonic() - t0,
              path=info.state.value if info else None,
              endpoint=info.endpoint if info else None, rtt=info.rtt if info else None,
              counters=dict(t.peers[peer].counters) if peer in t.peers else {})
        driver.close()
        port.close()
        await relay.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.traversal_driver",
                                 description="one traversal node on a UDP port (lab use)")
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--disco-key-file", required=True)
    ap.add_argument("--peer", required=True, help="peer node key (base64)")
    ap.add_argument("--peer-disco", required=True, help="peer disco key (base64)")
    ap.add_argument("--relay", required=True, help="relay URL")
    ap.add_argument("--stun", action="append", default=[], help="HOST:PORT (repeat)")
    ap.add_argument("--port", type=int, default=41641)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--search-ports", type=int, default=256)
    ap.add_argument("--no-port-search", action="store_true")
    ap.add_argument("--exit-after-direct", type=float, metavar="SECONDS",
                    help="stop this long after the path went direct")
    a = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_node(a))


if __name__ == "__main__":
    main(sys.argv[1:])
