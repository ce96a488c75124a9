"""The ``userspace`` backend: the sans-I/O :class:`Device` driven over TUN and UDP.

One thread owns the data path. It ``poll``s the TUN fd and the UDP sockets and
drains each in batches with non-blocking ``readv``/``recvmsg_into`` into buffers
allocated once: on this machine that is several times faster than asyncio
datagram endpoints. A TUN drain is sealed in one call and a receive batch opened
in one (:meth:`Device.seal_many`, :meth:`Device.open_many`). Sends use UDP GSO
(one ``sendmsg`` per burst to a peer), receives UDP GRO, and TCP segments are
merged before the TUN write
(:mod:`wgmesh.wireguard.offload`); ``benchmarks/README.md`` has the figures.
Configuration (the :class:`Backend` API, or the stock ``wg`` tool over the UAPI
socket) takes the same lock for a moment. ``counters()`` reports every drop.

Hooks for the relay and NAT traversal, all safe to call from any thread:

* ``on_other(data, addr)``: every datagram on the WireGuard port that is not a
  WireGuard message (STUN, disco) is handed to this callback, on the device
  thread (it must not block).
* :meth:`UserspaceBackend.send_other`: send bytes from the WireGuard port.
* :meth:`UserspaceBackend.set_peer_relay` / :meth:`inject_from_relay`: route one
  peer's packets through a relay ``send_fn(bytes)`` (called on the device
  thread; must not block) and feed back what the relay delivers from that peer.
  Clearing the relay, or :meth:`set_endpoint`, returns the peer to UDP.

:class:`UserspacePort` is these hooks as the :class:`~wgmesh.wireguard.backend.Port`
that the node's traversal drives.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import attrs

from wgmesh.keys import Key
from wgmesh.netmap import FilterRule
from wgmesh.wireguard.backend import (
    Addr,
    BackendError,
    InterfaceConfig,
    IPInterface,
    PeerConfig,
    PeerDiff,
    PeerStats,
    diff_peers,
    routes_for,
)
from wgmesh.wireguard.device import Destination, Device, RelaySource, Sealed
from wgmesh.wireguard.filter import PacketFilter
from wgmesh.wireguard.offload import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_UNSUPPORTED,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    VNET_HDR_LEN,
    ZERO_HDR,
    Coalescer,
)
from wgmesh.wireguard.timers import Timing, timing_from_env
from wgmesh.wireguard.tun import Tun
from wgmesh.wireguard.uapi import DeviceSet, PeerStatus, UapiError, UapiServer, format_get

if TYPE_CHECKING:
    import asyncio

    from wgmesh.traversal import TraversalConfig, _Relay

__all__ = ["UserspaceBackend", "UserspacePort"]

log = logging.getLogger("wgmesh.userspace")

BATCH = 64
_MAX_IP = 65535
_SLOT = _MAX_IP + 16  # room to pad the largest packet to a multiple of 16
TICK = 0.1  # seconds between timer passes at most
SO_MARK = 36
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SOCKET_BUFFER = 4 << 20
IP_PKTINFO = 8  # Linux; the socket module lacks it
#: Linux: (level, option, DF always) per family, for disco's path MTU probes.
_PMTUDISC_DO = {socket.AF_INET: (socket.IPPROTO_IP, 10, 2),
                socket.AF_INET6: (socket.IPPROTO_IPV6, 23, 2)}
# Room for UDP_GRO's segment size and the larger of in_pktinfo / in6_pktinfo.
_CMSG_SPACE = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(20)
_ZERO_KEY = bytes(32)


class UserspaceBackend:
    """A WireGuard interface implemented in this process (see the module docstring).

    ``uapi``: serve the UAPI socket (True), not at all (False), or only if no device
    of the same name in another network namespace holds its path ("if-free", what a
    node needs: it drives the device directly).
    """

    kind = "userspace"
    #: Disco heartbeats keep paths and NAT mappings alive; the device needs no keepalive.
    keepalive = 0

    def __init__(self, name: str, *, timing: Timing | None = None,
                 uapi: bool | Literal["if-free"] = "if-free", gro: bool = True) -> None:
        self.name = name
        self.device = Device(timing=timing or timing_from_env())
        self.on_other: Callable[[bytes, tuple[str, int]], object] | None = None
        self.device.on_other = self._other
        self._serve_uapi = uapi
        # WGMESH_WG_OFFLOAD=0 turns TUN coalescing off (for comparison runs).
        self._vnet = gro and os.environ.get("WGMESH_WG_OFFLOAD", "1") != "0"
        self._lock = threading.RLock()
        self._tun: Tun | None = None
        self._socks: dict[int, socket.socket] = {}  # family -> socket
        self._port = 0
        self._fwmark = 0
        self._gen = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._uapi: UapiServer | None = None
        self._stopped = threading.Event()
        self._closed = False
        self._desired: dict[Key, PeerConfig] = {}
        self._addresses: tuple[IPInterface, ...] = ()
        self.io_errors = 0
        self.gso_too_big = 0  # GSO batches sent one by one: segments over the path MTU
        self._gso = True
        # A TUN drain lands in BATCH slots and is sealed back to back into _omv: each
        # slot and sealed packet has room for the largest IP packet, in anonymous maps
        # whose pages the kernel backs only when a packet touches them.
        slots = memoryview(mmap.mmap(-1, BATCH * _SLOT))
        self._slots = [slots[i * _SLOT:(i + 1) * _SLOT] for i in range(BATCH)]
        self._omv = memoryview(mmap.mmap(-1, BATCH * (_SLOT + 32)))
        self._rmv = memoryview(bytearray(1 << 16))
        self._tmv = memoryview(bytearray(1 << 16))
        self._hdrmv = memoryview(bytearray(VNET_HDR_LEN))
        self._coalescer = Coalescer(self._write_tun)
        self._tun_fd = -1
        self._tun_iovs: list[list[memoryview]] = []
        self._tun_skip = 0

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        """Create the TUN interface, bind UDP, start the data thread and UAPI."""
        self._tun = Tun(self.name, vnet=self._vnet)
        self._tun_fd = self._tun.fd
        # Each slot's read, with the virtio-net header landing apart when TUN has one.
        hdr = [self._hdrmv] if self._tun.vnet else []
        self._tun_iovs = [[*hdr, slot] for slot in self._slots]
        self._tun_skip = VNET_HDR_LEN if self._tun.vnet else 0
        try:
            self._bind(0)
            self._thread = threading.Thread(target=self._run, name=f"wg-{self.name}",
                                            daemon=True)
            self._thread.start()
            if self._serve_uapi:
                self._start_uapi()
        except BaseException:
            self.down()
            raise

    def _start_uapi(self) -> None:
        """Serve UAPI; a socket path taken by a device of the same name in another
        namespace (the directory is shared) stops the device only if UAPI is required."""
        try:
            self._uapi = UapiServer(self.name, self.uapi_get, self.uapi_set)
        except UapiError as e:
            if e.errno != errno.EADDRINUSE or self._serve_uapi is True:
                raise BackendError(str(e)) from None
            log.warning("%s: serving no UAPI (`wg` will not see this device): %s",
                        self.name, e)

    def up(self, config: InterfaceConfig) -> None:
        self.device.mtu = config.mtu
        self.start()
        assert self._tun is not None
        self._tun.configure(config.mtu, config.addresses)
        self._addresses = config.addresses
        with self._lock:
            self.device.set_private_key(config.private_key.raw())
            if config.listen_port:
                self._bind(config.listen_port)
            self._set_fwmark(config.fwmark)

    def down(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        self._wake()
        if self._uapi is not None:
            self._uapi.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            for s in self._socks.values():
                s.close()
            self._socks.clear()
            if self._tun is not None:
                self._tun.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the device stops (``down``, or its TUN interface is deleted)."""
        return self._stopped.wait(timeout)

    @property
    def listen_port(self) -> int:
        return self._port

    @property
    def traversal(self) -> TraversalConfig:
        from wgmesh.traversal import TraversalConfig

        return TraversalConfig.userspace()

    def open_port(self, loop: asyncio.AbstractEventLoop) -> UserspacePort:
        return UserspacePort(self, loop)

    # ---- Backend API --------------------------------------------------------------
    def set_peers(self, desired: Sequence[PeerConfig]) -> PeerDiff:
        with self._lock:
            # The device's own endpoints (set by traversal, roamed by WireGuard), so that
            # an update never puts back an endpoint an earlier set_peers gave.
            current = {Key.from_raw(k): attrs.evolve(
                           self._desired.get(Key.from_raw(k)) or self._config_of(k),
                           endpoint=p.endpoint)
                       for k, p in self.device.peers.items()}
            diff = diff_peers(current, desired)
            now = time.monotonic()
            for key in diff.remove:
                self.device.remove_peer(key.raw)
                self._desired.pop(key, None)
            for pc in (*diff.add, *diff.update):
                self._apply_peer(pc, now)
                self._desired[pc.public_key] = pc
            self._flush()
            if self._tun is not None and diff:
                self._tun.sync_routes(routes_for(self._desired.values(), self._addresses))
        self._wake()
        return diff

    def _apply_peer(self, pc: PeerConfig, now: float) -> None:
        dev = self.device
        peer = dev.add_peer(pc.public_key.raw)
        dev.set_preshared_key(peer, pc.preshared_key)
        if pc.endpoint is not None:
            dev.set_endpoint(peer, pc.endpoint)
        dev.allowed.replace(peer, pc.allowed_ips)
        if pc.persistent_keepalive != peer.persistent_keepalive:
            dev.set_persistent_keepalive(peer, pc.persistent_keepalive, now)

    def _config_of(self, raw: bytes) -> PeerConfig:
        p = self.device.peers[raw]
        return PeerConfig(Key.from_raw(raw), self.device.allowed.networks(p), p.endpoint,
                          p.persistent_keepalive,
                          None if p.preshared_key == _ZERO_KEY else p.preshared_key)

    def set_endpoint(self, key: Key, endpoint: tuple[str, int]) -> None:
        """Point the peer at a direct UDP endpoint; this also clears any relay route."""
        with self._lock:
            peer = self.device.peers.get(key.raw)
            if peer is None:
                raise BackendError(f"no peer {key.short()}")
            self.device.set_relay(peer, None)
            self.device.set_endpoint(peer, (str(endpoint[0]), int(endpoint[1])))

    def stats(self) -> dict[Key, PeerStats]:
        with self._lock:
            return {Key.from_raw(k): PeerStats(Key.from_raw(k), p.endpoint,
                                                p.last_handshake_wall, p.rx_bytes, p.tx_bytes,
                                                tuple(self.device.allowed.networks(p)),
                                                p.persistent_keepalive)
                    for k, p in self.device.peers.items()}

    def set_filter(self, rules: Sequence[FilterRule]) -> None:
        """Enforce the netmap's inbound ACL in the device (with connection tracking)."""
        with self._lock:
            if self.device.packet_filter is None:
                self.device.packet_filter = PacketFilter(rules)
            else:
                self.device.packet_filter.set_rules(rules)

    def counters(self) -> dict[str, int]:
        """Dropped packets by reason (bad MAC, replay, unknown index, cookie replies sent,
        ...), plus socket/TUN errors: hostile input shows up here, never as exceptions."""
        with self._lock:
            return {**self.device.drops, "io_errors": self.io_errors,
                    "gso_too_big": self.gso_too_big}

    # ---- hooks for NAT traversal and the relay -------------------------------------
    def _other(self, data: bytes, addr: tuple[str, int]) -> None:
        cb = self.on_other
        if cb is None:
            self.device.drops["not_wireguard"] += 1
        else:
            cb(data, addr)

    def send_other(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send a non-WireGuard datagram (STUN, disco) from the WireGuard port.

        With DF and no local fragmentation (``IP_PMTUDISC_DO``): a path MTU probe
        (:mod:`wgmesh.pmtu`) too large for a link on the way must die, not arrive in
        pieces. WireGuard's own packets keep the socket's default (fragment rather than
        drop), so the option is set only around this send."""
        family = socket.AF_INET6 if ":" in str(addr[0]) else socket.AF_INET
        s = self._socks.get(family)
        level, opt, do = _PMTUDISC_DO[family]
        try:
            before = s.getsockopt(level, opt) if s is not None else None
            if s is not None:
                s.setsockopt(level, opt, do)
        except OSError:
            before = None
        try:
            self._sendto(data, (str(addr[0]), int(addr[1])))
        finally:
            if s is not None and before is not None:
                with contextlib.suppress(OSError):
                    s.setsockopt(level, opt, before)

    def set_mtu(self, mtu: int) -> None:
        with self._lock:
            self.device.mtu = mtu
        if self._tun is not None:
            self._tun.set_mtu(mtu)

    def set_peer_relay(self, key: Key, send_fn: Callable[[bytes], object] | None) -> None:
        """Send ``key``'s WireGuard packets to ``send_fn(bytes)``; None returns to UDP."""
        with self._lock:
            peer = self.device.peers.get(key.raw)
            if peer is None:
                raise BackendError(f"no peer {key.short()}")
            self.device.set_relay(peer, send_fn)

    def inject_from_relay(self, key: Key, data: bytes) -> None:
        """A WireGuard packet the relay delivered from peer ``key``."""
        with self._lock:
            self.device.receive(data, RelaySource(key.raw), time.monotonic())
            self._flush()

    # ---- UAPI ----------------------------------------------------------------------
    def uapi_get(self) -> str:
        with self._lock:
            d = self.device
            peers = [PeerStatus(k, p.preshared_key, p.endpoint, p.last_handshake_wall,
                                p.tx_bytes, p.rx_bytes, p.persistent_keepalive,
                                tuple(d.allowed.networks(p))) for k, p in d.peers.items()]
            return format_get(d.local.private if d.local else None, self._port, self._fwmark,
                              peers)

    def uapi_set(self, ds: DeviceSet) -> None:
        with self._lock:
            dev, now = self.device, time.monotonic()
            if ds.private_key is not None:
                dev.set_private_key(None if ds.private_key == _ZERO_KEY else ds.private_key)
            if ds.listen_port is not None and ds.listen_port != self._port:
                try:
                    self._bind(ds.listen_port)
                except OSError as e:
                    raise UapiError(str(e), e.errno or errno.EADDRINUSE) from e
            if ds.fwmark is not None:
                self._set_fwmark(ds.fwmark)
            if ds.replace_peers:
                for k in list(dev.peers):
                    dev.remove_peer(k)
                self._desired.clear()
            for ps in ds.peers:
                if ps.remove:
                    dev.remove_peer(ps.public_key)
                    self._desired.pop(Key.from_raw(ps.public_key), None)
                    continue
                if ps.update_only and ps.public_key not in dev.peers:
                    continue
                peer = dev.add_peer(ps.public_key)
                if ps.preshared_key is not None:
                    dev.set_preshared_key(peer, ps.preshared_key)
                if ps.endpoint is not None:
                    dev.set_endpoint(peer, ps.endpoint)
                if ps.replace_allowed_ips:
                    dev.allowed.remove_value(peer)
                for net in ps.allowed_ips:
                    dev.allowed.insert(net, peer)
                if ps.persistent_keepalive is not None:
                    dev.set_persistent_keepalive(peer, ps.persistent_keepalive, now)
                self._desired.pop(Key.from_raw(ps.public_key), None)
            self._flush()
        self._wake()

    # ---- sockets ---------------------------------------------------------------------
    def _bind(self, port: int) -> None:
        """(Re)bind the v4 and v6 sockets to ``port`` (0: let the kernel pick one)."""
        with self._lock:
            for attempt in range(10):
                v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    v4.bind(("0.0.0.0", port))
                except OSError:
                    v4.close()
                    raise
                chosen = v4.getsockname()[1]
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                v6: socket.socket | None = s6
                try:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", chosen))
                except OSError as e:
                    s6.close()
                    v6 = None
                    if e.errno == errno.EADDRINUSE and port == 0 and attempt < 9:
                        v4.close()
                        continue
                break
            for s in self._socks.values():
                s.close()
            self._socks = {socket.AF_INET: v4}
            if v6 is not None:
                self._socks[socket.AF_INET6] = v6
            for s in self._socks.values():
                s.setblocking(False)
                for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                                     (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                    try:  # root may exceed net.core.[rw]mem_max: bursts from GSO need room
                        s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
                    except OSError:
                        s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
                with contextlib.suppress(OSError):  # coalesced receive, where the kernel can
                    s.setsockopt(SOL_UDP, UDP_GRO, 1)
            # Which of our addresses each datagram reached, so replies leave from it.
            v4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if v6 is not None:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            self._port = chosen
            self._set_fwmark(self._fwmark)
            self.device.sources.clear()  # new sockets: routing picks sources afresh (kernel)
            self._gen += 1
        self._wake()

    def _set_fwmark(self, mark: int) -> None:
        self._fwmark = mark
        for s in self._socks.values():
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def _sendto(self, data: bytes | memoryview, addr: tuple[str, int]) -> None:
        s = self._socks.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        if s is None:
            self.io_errors += 1
            return
        try:
            self._sendmsg(s, data, [], addr)
        except OSError:  # unreachable, buffer full: UDP is lossy, WireGuard retries
            self.io_errors += 1

    def _sendmsg(self, s: socket.socket, data: bytes | memoryview,
                 anc: list[tuple[int, int, bytes]], addr: tuple[str, int]) -> None:
        """``sendmsg`` from the address ``addr`` last reached us at, if we know it.

        If that address is gone it is forgotten and the routing table picks the source,
        as the kernel module does. Linux says so with EINVAL for IPv6 and ENETUNREACH for
        IPv4 (no route from a source the host lacks); EADDRNOTAVAIL for good measure.
        """
        src = self.device.sources.get(addr)
        if src is None:
            s.sendmsg([data], anc, 0, addr)
            return
        if len(src) == 4:
            info = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4x", 0, src))
        else:
            info = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16si", src, 0))
        try:
            s.sendmsg([data], [*anc, info], 0, addr)
        except OSError as e:
            if e.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENETUNREACH):
                raise
            self.device.sources.pop(addr, None)
            s.sendmsg([data], anc, 0, addr)

    # ---- the data thread -------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _flush(self) -> None:
        udp, tun = self.device.drain()
        for data, dst in udp:
            self._send(data, dst)
        vnet = self._tun is not None and self._tun.vnet
        for pkt in tun:
            self._write_tun(ZERO_HDR + pkt if vnet else pkt)

    def _send(self, data: bytes, dst: Destination) -> None:
        if callable(dst):
            dst(data)
        else:
            self._sendto(data, dst)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        assert self._tun is not None
        tun_fd = self._tun.fd
        dev = self.device
        gen = -1
        poller = select.poll()
        fds: dict[int, socket.socket] = {}
        due = 0.0
        poller.register(self._wake_r, select.POLLIN)
        poller.register(tun_fd, select.POLLIN)
        while not self._stopped.is_set():
            if gen != self._gen:
                with self._lock:
                    for fd in fds:
                        with contextlib.suppress(KeyError, ValueError):
                            poller.unregister(fd)
                    fds = {s.fileno(): s for s in self._socks.values()}
                    for fd in fds:
                        poller.register(fd, select.POLLIN)
                    gen = self._gen
            now = time.monotonic()
            events = poller.poll(max(0.0, (due - now) * 1000 + 1))
            with self._lock:
                now = time.monotonic()
                for fd, ev in events:
                    if fd == tun_fd:
                        if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) or \
                                not self._read_tun(tun_fd, now):
                            return  # the interface was deleted: stop, as wireguard-go does
                    elif fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(fd, 4096)
                    elif fd in fds and gen == self._gen:
                        self._read_udp(fds[fd], tun_fd, now)
                if now >= due:
                    # Timers armed since the last tick are never sooner than REKEY_TIMEOUT,
                    # so ticking at least every TICK keeps them on time without walking
                    # every peer on every wake-up.
                    nxt = dev.tick(now)
                    due = now + TICK if nxt is None else min(nxt, now + TICK)
                self._flush()

    def _read_tun(self, fd: int, now: float) -> bool:
        """Drain TUN (up to BATCH packets), seal the drain in one go and send it: one
        ``sendmsg`` per run of datagrams of one size to one destination (UDP GSO, up to
        64). False: TUN is gone."""
        iovs, skip, lens = self._tun_iovs, self._tun_skip, list[int]()
        alive = True
        for _ in range(BATCH):
            try:
                n = os.readv(fd, iovs[len(lens)]) - skip
            except BlockingIOError:
                break
            except OSError as e:
                alive = e.errno not in (errno.EBADFD, errno.EIO, errno.ENXIO)
                break
            if n > 0:
                lens.append(min(n, _MAX_IP))
        if lens:
            self._send_sealed(self.device.seal_many(self._slots, lens, self._omv, now))
        return alive

    def _send_sealed(self, sealed: list[Sealed]) -> None:
        """Send sealed packets (back to back in _omv) in runs for UDP GSO: one destination,
        one size, only the last shorter."""
        omv = self._omv
        start = end = seg = count = 0
        dest: Destination | None = None
        for off, length, d in sealed:
            if callable(d):  # relayed: the relay client takes each packet
                d(bytes(omv[off:off + length]))
                continue
            if count and (d != dest or length > seg or off != end or count >= GSO_MAX_SEGMENTS
                          or off + length - start > GSO_MAX_BYTES):
                self._send_batch(start, end, seg, count, dest)
                count = 0
            if count == 0:
                start, seg, dest = off, length, d
            count += 1
            end = off + length
            if length < seg:  # GSO: only the last datagram may be shorter
                self._send_batch(start, end, seg, count, dest)
                count = 0
        if count:
            self._send_batch(start, end, seg, count, dest)

    def _send_batch(self, start: int, end: int, seg: int, count: int,
                    dest: Destination | None) -> None:
        """Datagrams ``_omv[start:end]`` of ``seg`` bytes (the last maybe fewer) to ``dest``."""
        assert isinstance(dest, tuple)
        omv = self._omv
        if count > 1 and self._gso:
            s = self._socks.get(socket.AF_INET6 if ":" in dest[0] else socket.AF_INET)
            if s is None:
                self.io_errors += 1
                return
            try:
                self._sendmsg(s, omv[start:end],
                              [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))], dest)
                return
            except BlockingIOError:
                self.io_errors += 1
                return
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    # Segments larger than the path (our own link is narrower than the
                    # interface MTU allows for): one by one, the kernel fragments them.
                    # Dropping the batch would black-hole every bulk flow.
                    self.gso_too_big += 1
                elif e.errno not in GSO_UNSUPPORTED:
                    self.io_errors += 1
                    return
                else:
                    self._gso = False  # no UDP GSO here: send one by one from now on
        for off in range(start, end, seg):
            self._sendto(omv[off:min(off + seg, end)], dest)


    def _read_udp(self, sock: socket.socket, tun_fd: int, now: float) -> None:
        """Drain one UDP socket; with UDP GRO one ``recvmsg`` brings many datagrams.
        With the virtio-net header, in-order TCP segments merge into one TUN write."""
        dev = self.device
        rmv, tmv = self._rmv, self._tmv
        coalescer = self._coalescer if self._tun is not None and self._tun.vnet else None
        deliver = coalescer.add if coalescer is not None else self._deliver_plain
        for _ in range(BATCH):
            try:
                nbytes, anc, _flags, addr = sock.recvmsg_into([rmv], _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                self.io_errors += 1
                break
            src = (addr[0], addr[1])
            seg = nbytes
            dev.arrived_at = None
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    seg = struct.unpack_from("=i", data)[0] or nbytes
                elif level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                    dev.arrived_at = bytes(data[8:12])  # ipi_addr: the header's destination
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and \
                        len(data) >= 16:
                    dev.arrived_at = bytes(data[:16])
            dev.open_many((rmv[off:min(off + seg, nbytes)] for off in range(0, nbytes, seg)),
                          src, now, tmv, deliver)
        if coalescer is not None:
            coalescer.flush()

    def _deliver_plain(self, pkt: memoryview, n: int) -> None:
        self._write_tun(pkt[:n])

    def _write_tun(self, pkt: bytes | memoryview) -> None:
        """One packet (with its virtio-net header when coalescing is on) to TUN."""
        try:
            os.write(self._tun_fd, pkt)
        except OSError:
            self.io_errors += 1


class UserspacePort:
    """The device's hooks as the port traversal drives (see the module docstring)."""

    def __init__(self, backend: UserspaceBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self._relay_out: Callable[[Key, bytes], None] | None = None

    def start(self, on_datagram: Callable[[bytes, Addr], None],
              on_wireguard_for_relay: Callable[[Key, bytes], None]) -> None:
        loop = self.loop
        self.backend.on_other = lambda data, addr: loop.call_soon_threadsafe(
            on_datagram, bytes(data), addr)
        self._relay_out = on_wireguard_for_relay

    def send(self, data: bytes, addr: Addr) -> None:
        self.backend.send_other(data, addr)

    def use_relay(self, key: Key) -> None:
        out = self._relay_out
        if out is None:
            raise BackendError(f"{self.backend.name}: the port is not started")
        self.use_socket(key, lambda data: out(key, data))

    def use_direct(self, key: Key, addr: Addr, handshake: bool = False) -> None:
        self.backend.set_endpoint(key, addr)  # the device handshakes as it needs to

    def use_socket(self, key: Key, send: Callable[[bytes], None]) -> None:
        loop = self.loop
        self.backend.set_peer_relay(
            key, lambda data: loop.call_soon_threadsafe(send, bytes(data)))

    def inject(self, key: Key, data: bytes) -> None:
        self.backend.inject_from_relay(key, data)

    def seen_endpoint(self, endpoint: Addr | None, path: str) -> Addr | _Relay | None:
        from wgmesh.traversal import RELAY

        # The device keeps a relay route beside the endpoint, so the endpoint alone
        # cannot say "relayed"; our own path state does.
        return RELAY if path == "relay" else endpoint

    def close(self) -> None:
        self.backend.on_other = None
