"""The node's data-plane driver: one WireGuard backend, one relay client, traversal for all peers.

This is the thin asyncio driver around the sans-I/O :class:`~wgmesh.traversal.Traversal`:
it feeds it disco from the WireGuard port and the relay, WireGuard stats once a
second, and its timers, and carries out the actions it returns against the
backend's :class:`~wgmesh.wireguard.backend.Port`, which hides how that backend
shares its WireGuard port with disco, STUN and the relay.

Everything here runs on the node's loop thread, but the stats read (see
:meth:`DataPlane._poll_stats`); backend callbacks from other threads hop onto it with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

import attrs

from wgmesh import disco, pmtu, stun, traversal
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key
from wgmesh.node.netcheck import NetcheckProbe, NetcheckReport, StunServer, local_addresses
from wgmesh.relaynet.client import RelayClient
from wgmesh.traversal import RELAY, Traversal
from wgmesh.wireguard.backend import Backend, Port

log = logging.getLogger("wgmesh.node.dataplane")

__all__ = ["DataPlane", "PeerPathStatus"]

Addr = tuple[str, int]
STATS_INTERVAL = 1.0


@attrs.define
class PeerPathStatus:
    path: str = "relay"  # "direct" | "relay"
    endpoint: Addr | None = None
    rtt: float | None = None
    changed_at: float = 0.0
    reason: str = "start"
    first_direct_at: float | None = None


class DataPlane:
    """Drives traversal for every peer of one node over a backend, a port and a relay client."""

    def __init__(self, backend: Backend, port: Port, relay: RelayClient, trav: Traversal, *,
                 on_path_changed: Callable[[Key, PeerPathStatus], None] | None = None,
                 on_candidates_stale: Callable[[str], None] | None = None,
                 on_observed: Callable[[Addr], None] | None = None,
                 on_pin_failed: Callable[[Key, str, str], None] | None = None,
                 mtu: int | None = None) -> None:
        self.backend = backend
        self.port = port
        self.relay = relay
        self.trav = trav
        self.paths: dict[Key, PeerPathStatus] = {}
        #: The user's MTU (the ceiling), and the interface's now (lowered to fit the
        #: narrowest measured path in use).
        self.mtu = self.interface_mtu = mtu or trav.local.mtu
        trav.local.mtu = self.mtu
        self._relay_ingress: dict[Key, bool] = {}
        self._probes: list[NetcheckProbe] = []  # running
        self._extra: dict[int, socket.socket] = {}
        self._extra_owner: dict[int, Key] = {}
        self._on_path_changed = on_path_changed
        self._on_candidates_stale = on_candidates_stale
        self._on_observed = on_observed
        self._on_pin_failed = on_pin_failed
        #: The user's pins: "direct", "relay" or a relay region id; and peers' home regions.
        self.pins: dict[Key, str | int] = {}
        self._homes: dict[Key, int | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.counters: dict[str, int] = {"relay_wg_in": 0, "relay_wg_out": 0,
                                         "relay_wg_dropped_direct": 0, "not_for_us": 0}

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        self.port.start(self._on_datagram, self._wireguard_to_relay)
        self.relay.on_packet = self._on_relay_packet
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for s in self._extra.values():
            s.close()
        self._extra.clear()
        self.port.close()

    async def _run(self) -> None:
        next_stats = 0.0
        while True:
            if time.monotonic() >= next_stats:
                await self._poll_stats()
                # From the poll's end: a slow read must not leave the loop polling back to back.
                next_stats = time.monotonic() + STATS_INTERVAL
            now = time.monotonic()
            self._do(self.trav.tick(now))
            wake = min(filter(None, [self.trav.next_wakeup(), next_stats]))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.005, wake - time.monotonic()))

    # ---- peers ---------------------------------------------------------------------
    def upsert_peer(self, node_key: Key, disco_key: Key, endpoints: list[Addr],
                    home_region: int | None) -> None:
        self._homes[node_key] = home_region or None
        pin = self.pins.get(node_key)
        self.relay.set_peer_region(node_key, pin if isinstance(pin, int) else home_region or None)
        new = node_key not in self.trav.peers
        if node_key not in self.paths:
            self.paths[node_key] = PeerPathStatus(changed_at=time.monotonic())
        self._do(self.trav.upsert_peer(node_key, disco_key, endpoints, time.monotonic()))
        if new and pin is not None:
            self._do(self.trav.pin(node_key, "relay" if isinstance(pin, int) else pin,
                                   time.monotonic()))

    def pin(self, node_key: Key, mode: str | int | None) -> None:
        """Pin a peer to ``direct``, ``relay`` or a relay region id; ``None`` unpins.

        A region forces the relay path through that region's relay (it must be in
        the relay map). A ``direct`` pin that a probing round cannot honour
        reports through ``on_pin_failed``; the relay keeps the peer reachable meanwhile.
        """
        if isinstance(mode, int) and mode not in self.relay.regions:
            raise WgmeshError(f"no relay region {mode} in the relay map "
                              f"(regions: {', '.join(map(str, sorted(self.relay.regions)))})")
        if mode is None:
            self.pins.pop(node_key, None)
        else:
            self.pins[node_key] = mode
        self.relay.set_peer_region(node_key, mode if isinstance(mode, int)
                                   else self._homes.get(node_key))
        self._do(self.trav.pin(node_key, "relay" if isinstance(mode, int) else mode,
                               time.monotonic()))

    def remove_peer(self, node_key: Key) -> None:
        self._do(self.trav.remove_peer(node_key))
        self._homes.pop(node_key, None)
        self.paths.pop(node_key, None)
        self._relay_ingress.pop(node_key, None)
        self.relay.set_peer_region(node_key, None)

    def set_local(self, candidates: list[Addr], hard_nat: bool, udp: bool | None = None) -> None:
        self._do(self.trav.set_local(candidates, time.monotonic(), hard_nat=hard_nat, udp=udp))

    def set_tunneled(self, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        """What our routing sends into the tunnel: never a candidate for a direct path."""
        self.trav.set_tunneled(nets)

    def network_changed(self) -> None:
        self._do(self.trav.network_changed(time.monotonic()))

    # ---- netcheck from the WireGuard port -------------------------------------------
    async def netcheck(self, servers: list[StunServer], timeout: float = 3.0
                       ) -> NetcheckReport:
        """A netcheck measured from the WireGuard port itself, so the mapping it reports
        is the one WireGuard's packets get."""
        probe = NetcheckProbe(servers, time.monotonic())
        self._probes.append(probe)
        try:
            for addr, data in probe.start():
                self.port.send(data, addr)
            deadline = time.monotonic() + timeout
            while not probe.done and time.monotonic() < deadline:
                nd = probe.next_deadline
                await asyncio.sleep(max(0.005, min(0.05, (nd or deadline) - time.monotonic())))
                for addr, data in probe.on_timeout(time.monotonic()):
                    self.port.send(data, addr)
        finally:
            self._probes.remove(probe)
        return probe.report(local=await asyncio.to_thread(local_addresses))

    # ---- inputs --------------------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: Addr, sock: int = 0) -> None:
        if disco.is_disco(data):
            self._do(self.trav.on_udp(data, addr, time.monotonic(), sock))
        elif stun.is_stun(data):
            for probe in self._probes:
                for dst, out in probe.receive(data, addr, time.monotonic()):
                    self.port.send(out, dst)
        elif sock and sock in self._extra_owner:
            # WireGuard on a port-search socket: it carries that peer's direct path.
            self.port.inject(self._extra_owner[sock], data)
        else:
            self.counters["not_for_us"] += 1

    def _on_relay_packet(self, src: Key, data: bytes) -> None:
        if disco.is_disco(data):
            self._do(self.trav.on_relay(src, data, time.monotonic()))
            return
        if src not in self.paths:
            self.counters["not_for_us"] += 1
            return
        if not self._relay_ingress.get(src, True):
            self.counters["relay_wg_dropped_direct"] += 1
            return
        self.counters["relay_wg_in"] += 1
        self.port.inject(src, data)

    def _wireguard_to_relay(self, key: Key, data: bytes) -> None:
        self.counters["relay_wg_out"] += 1
        self.relay.send_nowait(key, data)

    async def _poll_stats(self) -> None:
        """Feed every peer's WireGuard stats to traversal, read off the loop thread.

        A kernel dump of 500 peers is about 0.1 s of netlink decoding (seconds under
        emulation). Read on the loop, it held back the disco pongs that came in
        meanwhile, so their RTTs grew at random; traversal then switched between a
        peer's equally good paths, and kernel WireGuard re-adds the peer on every switch
        (to force a handshake), so its session and counters started over."""
        sampled = time.monotonic()  # the reading shows the peers as of this or later
        try:
            stats = await asyncio.to_thread(self.backend.stats)
        except Exception as e:  # a vanished interface must not kill the loop
            log.warning("reading WireGuard stats failed: %s", e)
            return
        now = time.monotonic()
        for key, st in stats.items():
            if key not in self.paths:
                continue
            ep = self.port.seen_endpoint(st.endpoint, self.paths[key].path)
            self._do(self.trav.on_wg_stats(key, now, ep, st.last_handshake, st.rx_bytes,
                                           st.tx_bytes, sampled))
        self._sync_mtu()

    def _sync_mtu(self) -> None:
        """Set the interface MTU to what every peer's current path carries (paths not
        measured yet, or whose peer cannot answer probes, count as the ceiling), never
        above the user's MTU nor below IPv6's 1280. Packets bigger than a path are then
        never made, so nothing depends on fragments or ICMP getting through."""
        known = [i.mtu for k in self.paths
                 if (i := self.trav.path(k)) is not None and i.mtu is not None]
        want = min(self.mtu, max(pmtu.MIN_MTU, min(known, default=self.mtu)))
        if want == self.interface_mtu:
            return
        try:
            self.backend.set_mtu(want)
        except Exception as e:  # a vanished interface must not kill the loop
            log.warning("setting the interface MTU to %d failed: %s", want, e)
            return
        log.info("interface MTU %d -> %d (narrowest path in use; ceiling %d)",
                 self.interface_mtu, want, self.mtu)
        self.interface_mtu = want

    # ---- actions -------------------------------------------------------------------
    def _do(self, actions: list[traversal.Action]) -> None:
        for a in actions:
            try:
                self._act(a)
            except Exception:
                log.exception("carrying out %r failed", a)
        if actions:
            self._wake.set()

    def _act(self, a: traversal.Action) -> None:
        if isinstance(a, traversal.SendDisco):
            if a.sock == 0:
                self.port.send(a.data, a.addr)
            elif (s := self._extra.get(a.sock)) is not None:
                with contextlib.suppress(OSError):
                    s.sendto(a.data, a.addr)
        elif isinstance(a, traversal.SendViaRelay):
            self.relay.send_nowait(a.key, a.data)
        elif isinstance(a, traversal.SetEndpoint):
            if a.endpoint is RELAY:
                self.port.use_relay(a.key)
            elif a.sock and (s := self._extra.get(a.sock)) is not None:
                self._route_via_socket(a.key, s, a.endpoint)
            else:
                self.port.use_direct(a.key, a.endpoint, a.handshake)
        elif isinstance(a, traversal.RelayIngress):
            self._relay_ingress[a.key] = a.enabled
        elif isinstance(a, traversal.OpenPorts):
            self._open_ports(a.key, a.socks)
        elif isinstance(a, traversal.ClosePorts):
            for sid in a.socks:
                s = self._extra.pop(sid, None)
                self._extra_owner.pop(sid, None)
                if s is not None:
                    asyncio.get_running_loop().remove_reader(s.fileno())
                    s.close()
        elif isinstance(a, traversal.PathChanged):
            st = self.paths.setdefault(a.key, PeerPathStatus())
            st.path, st.endpoint, st.rtt, st.reason = a.path, a.endpoint, a.rtt, a.reason
            st.changed_at = time.monotonic()
            if a.path == "direct" and st.first_direct_at is None:
                st.first_direct_at = st.changed_at
            log.info("peer %s now %s %s (%s)", a.key.short(), a.path, a.endpoint or "", a.reason)
            if self._on_path_changed:
                self._on_path_changed(a.key, st)
        elif isinstance(a, traversal.ObservedAddr):
            if a.sock == 0 and self._on_observed:
                self._on_observed(a.addr)
        elif isinstance(a, traversal.RefreshCandidates) and self._on_candidates_stale:
            self._on_candidates_stale(a.reason)
        elif isinstance(a, traversal.PinFailed):
            log.warning("peer %s: pinned %s, but %s", a.key.short(), a.mode, a.reason)
            if self._on_pin_failed:
                self._on_pin_failed(a.key, a.mode, a.reason)

    def _open_ports(self, key: Key, socks: tuple[int, ...]) -> None:
        loop = asyncio.get_running_loop()
        for sid in socks:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind(("0.0.0.0", 0))
            self._extra[sid] = s
            self._extra_owner[sid] = key
            loop.add_reader(s.fileno(), self._read_extra, sid, s)

    def _read_extra(self, sid: int, s: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, OSError):
                return
            self._on_datagram(data, (addr[0], addr[1]), sid)

    def _route_via_socket(self, key: Key, s: socket.socket, addr: Addr) -> None:
        """A direct path found from a port-search socket: WireGuard rides that socket."""

        def send(data: bytes) -> None:
            with contextlib.suppress(OSError):
                s.sendto(data, addr)

        self.port.use_socket(key, send)
