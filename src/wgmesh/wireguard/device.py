"""The WireGuard device as a sans-I/O state machine.

Feed it datagrams (:meth:`Device.receive`), IP packets from the TUN side
(:meth:`Device.send`) and clock ticks (:meth:`Device.tick`), each with ``now`` from
a monotonic clock. It appends what to do to :attr:`Device.out_udp` (``(bytes,
destination)``) and :attr:`Device.out_tun` (IP packets); the driver drains both.
A destination is a ``(host, port)`` tuple, or a callable for a peer routed via a
relay (call it with the bytes). Nothing here blocks or touches a socket, so tests
drive every timer with a fake clock. The data path also has batch forms that
work on the caller's buffers: :meth:`Device.seal_many` (a drain of TUN packets ->
transport messages, back to back) and :meth:`Device.open_many` (a receive batch ->
inner packets), which do the per-peer work once per batch.

Behaviour follows the kernel module (``send.c``, ``receive.c``, ``timers.c``,
``cookie.c``, ``ratelimiter.c``). Bad input never raises: it is dropped and
counted in :attr:`Device.drops`.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import attrs

from wgmesh.wireguard.allowedips import AllowedIPs
from wgmesh.wireguard.crypto import tai64n
from wgmesh.wireguard.filter import PacketFilter
from wgmesh.wireguard.noise import (
    MSG_COOKIE,
    MSG_INITIATION,
    MSG_TRANSPORT,
    CookieChecker,
    LocalIdentity,
    consume_initiation,
    message_type,
)
from wgmesh.wireguard.peer import Peer
from wgmesh.wireguard.session import Keypair, padded_len
from wgmesh.wireguard.timers import (
    INITIATIONS_PER_SECOND,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    Timing,
)

__all__ = ["Destination", "Device", "RateLimiter", "RelaySource", "Sealed"]

Destination = tuple[str, int] | Callable[[bytes], object]
#: One packet of :meth:`Device.seal_many`: where it starts in ``out``, its length, where it goes.
Sealed = tuple[int, int, Destination]
_U32 = struct.Struct("<I")
_ZEROS = bytes(16)
MAX_PACKET = 65535


@attrs.frozen
class RelaySource:
    """The source of a packet that arrived over the relay for peer ``key`` (raw bytes)."""

    key: bytes


def source_bytes(src: tuple[str, int] | RelaySource) -> bytes:
    """What cookies and the rate limiter key on: IP and port, or the relayed peer's key."""
    if isinstance(src, RelaySource):
        return src.key
    return ipaddress.ip_address(src[0]).packed + struct.pack(">H", src[1])


class RateLimiter:
    """Token bucket per source IP (IPv6 per /64): 20 handshakes/s, bursts of 5 (kernel)."""

    PER_SECOND = 20
    BURST = 5
    MAX_ENTRIES = 8192

    def __init__(self) -> None:
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, src: tuple[str, int] | RelaySource, now: float) -> bool:
        if isinstance(src, RelaySource):
            ip = src.key
        else:
            packed = ipaddress.ip_address(src[0]).packed
            ip = packed if len(packed) == 4 else packed[:8]
        cost, cap = 1 / self.PER_SECOND, self.BURST / self.PER_SECOND
        entry = self._buckets.get(ip)
        if entry is None:
            if len(self._buckets) >= self.MAX_ENTRIES:
                return False
            self._buckets[ip] = (cap - cost, now)
            return True
        tokens, last = entry
        tokens = min(cap, tokens + (now - last))
        if tokens < cost:
            self._buckets[ip] = (tokens, now)
            return False
        self._buckets[ip] = (tokens - cost, now)
        return True

    def gc(self, now: float) -> None:
        """Forget sources idle for over a second (their bucket is full again anyway)."""
        for k in [k for k, (_, last) in self._buckets.items() if now - last > 1]:
            del self._buckets[k]


class Device:
    """One WireGuard interface's protocol state. Not thread-safe: one driver owns it."""

    def __init__(self, private_key: bytes | None = None, *, mtu: int = 1420,
                 timing: Timing | None = None, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, under_load_rate: int = 64) -> None:
        self.timing = timing or Timing()
        self.mtu = mtu
        self.wall = wall
        self.rng = rng or random.SystemRandom()
        self.under_load_rate = under_load_rate
        self.local: LocalIdentity | None = None
        self.cookie_checker: CookieChecker | None = None
        self.peers: dict[bytes, Peer] = {}
        self.allowed: AllowedIPs[Peer] = AllowedIPs()
        self.index: dict[int, tuple[Peer, Keypair | None]] = {}
        self.ratelimiter = RateLimiter()
        self.drops: Counter[str] = Counter()
        self.out_udp: list[tuple[bytes, Destination]] = []
        self.out_tun: list[bytes] = []
        # Hook: non-WireGuard datagrams (STUN, disco) sharing the port go here.
        self.on_other: Callable[[bytes, tuple[str, int]], object] | None = None
        # Hook: the node's ACL (wgmesh.wireguard.filter.PacketFilter), None = accept all.
        self.packet_filter: PacketFilter | None = None
        # Multi-address hosts: the I/O layer sets ``arrived_at`` to our address (packed)
        # that the datagram in hand was sent to; authenticated packets record it per
        # endpoint in ``sources``, and sends to that endpoint leave from it (the kernel
        # module's endpoint source cache), so a NAT or firewall sees one 4-tuple.
        self.arrived_at: bytes | None = None
        self.sources: dict[tuple[str, int], bytes] = {}
        self._load_window = (float("-inf"), 0)
        self._load_until = float("-inf")
        self._last_gc = float("-inf")
        self._last_tai = b""
        self._inbuf = bytearray(MAX_PACKET + 16)
        self._scratch = memoryview(bytearray(MAX_PACKET + 64))
        self.set_private_key(private_key)

    # ---- configuration ------------------------------------------------------------
    def set_private_key(self, private_key: bytes | None) -> None:
        """New static identity: every handshake and session restarts (kernel semantics)."""
        if private_key is not None and self.local is not None and \
                private_key == self.local.private:
            return
        self.local = LocalIdentity(private_key) if private_key is not None else None
        self.cookie_checker = (CookieChecker(self.local, self.timing.cookie_secret_max_age)
                               if self.local else None)
        for peer in list(self.peers.values()):
            if self.local is not None and peer.public == self.local.public:
                self.remove_peer(peer.public)
                continue
            self._wipe(peer)
            peer.set_identity(self.local)

    def add_peer(self, public: bytes) -> Peer:
        peer = self.peers.get(public)
        if peer is None:
            peer = Peer(self.local, public,
                        self.timing.cookie_secret_max_age - self.timing.cookie_secret_latency)
            self.peers[public] = peer
        return peer

    def remove_peer(self, public: bytes) -> None:
        peer = self.peers.pop(public, None)
        if peer is not None:
            self._forget_source(peer)
            self._wipe(peer)
            self.allowed.remove_value(peer)

    def set_preshared_key(self, peer: Peer, psk: bytes | None) -> None:
        peer.preshared_key = psk or bytes(32)
        if peer.handshake is not None:
            peer.handshake.preshared_key = peer.preshared_key

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float) -> None:
        """Like the kernel, a newly set interval sends a keepalive right away."""
        peer.persistent_keepalive = interval
        if interval:
            self._send_keepalive(peer, now)
        else:
            peer.t_persistent = None

    def set_endpoint(self, peer: Peer, endpoint: tuple[str, int] | None) -> None:
        """A configured endpoint starts without a source: the routing table picks one."""
        self._forget_source(peer)
        peer.endpoint = endpoint
        if endpoint is not None:
            self.sources.pop(endpoint, None)

    def _forget_source(self, peer: Peer) -> None:
        if peer.endpoint is not None:
            self.sources.pop(peer.endpoint, None)

    def set_relay(self, peer: Peer, send: Callable[[bytes], object] | None) -> None:
        """Relay hook: route ``peer``'s packets to ``send(bytes)``; None returns to UDP."""
        peer.relay = send

    # ---- inbound datagrams ----------------------------------------------------------
    def receive(self, data: bytes | memoryview, src: tuple[str, int] | RelaySource,
                now: float) -> None:
        """One datagram from the UDP port (or injected from the relay)."""
        t = message_type(data)
        if t == MSG_TRANSPORT:
            self._receive_transport(data, src, now)
        elif t == 0:
            if self.on_other is not None and not isinstance(src, RelaySource):
                self.on_other(bytes(data), src)
            else:
                self.drops["not_wireguard"] += 1
        elif self.local is None:
            self.drops["no_private_key"] += 1
        elif t == MSG_COOKIE:
            self._receive_cookie(bytes(data), now)
        else:
            self._receive_handshake(t, bytes(data), src, now)

    def _under_load(self, now: float) -> bool:
        start, count = self._load_window
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        self._load_window = (start, count)
        if count > self.under_load_rate:
            self._load_until = now + self.timing.under_load_hold
        return now < self._load_until

    def _receive_handshake(self, t: int, msg: bytes, src: tuple[str, int] | RelaySource,
                           now: float) -> None:
        checker = self.cookie_checker
        assert checker is not None and self.local is not None
        if not checker.mac1_ok(msg):
            self.drops["bad_mac1"] += 1
            return
        if self._under_load(now):
            if not checker.mac2_ok(msg, source_bytes(src), now):
                self.out_udp.append((checker.make_reply(msg, source_bytes(src), now),
                                     self._reply_destination(src)))
                self.drops["cookie_reply_sent"] += 1
                return
            if not self.ratelimiter.allow(src, now):
                self.drops["ratelimited"] += 1
                return
        if t == MSG_INITIATION:
            self._receive_initiation(msg, src, now)
        else:
            self._receive_response(msg, src, now)

    def _static_static(self, public: bytes) -> bytes | None:
        peer = self.peers.get(public)
        return peer.handshake.static_static if peer is not None and peer.handshake else None

    def _reply_destination(self, src: tuple[str, int] | RelaySource) -> Destination:
        if isinstance(src, RelaySource):
            peer = self.peers.get(src.key)
            if peer is not None and peer.relay is not None:
                return peer.relay
        return src  # type: ignore[return-value]

    def _receive_initiation(self, msg: bytes, src: tuple[str, int] | RelaySource,
                            now: float) -> None:
        assert self.local is not None
        r = consume_initiation(self.local, msg, self._static_static)
        if r is None:
            self.drops["bad_handshake"] += 1
            return
        peer = self.peers.get(r.remote_static)
        hs = peer.handshake if peer is not None else None
        if peer is None or hs is None:
            self.drops["unknown_peer"] += 1
            return
        if r.timestamp <= hs.latest_timestamp:
            self.drops["replayed_initiation"] += 1
            return
        if now - hs.last_initiation_consumed < 1 / INITIATIONS_PER_SECOND:
            self.drops["initiation_flood"] += 1
            return
        hs.accept_initiation(r)
        hs.last_initiation_consumed = now
        self._roam(peer, src)
        self._forget_handshake_index(peer)
        idx = self._new_index()
        made = hs.create_response(idx)
        if made is None:
            self.drops["bad_handshake"] += 1
            return
        resp, send_key, recv_key = made
        kp = Keypair(send_key, recv_key, initiator=False, local_index=idx,
                     remote_index=hs.remote_index, birth=now)
        self._install(peer, kp, now)
        self._emit(peer, peer.cookies.add_macs(resp, now), now)

    def _receive_response(self, msg: bytes, src: tuple[str, int] | RelaySource,
                          now: float) -> None:
        (receiver,) = _U32.unpack_from(msg, 8)
        entry = self.index.get(receiver)
        if entry is None or entry[1] is not None or entry[0].handshake is None:
            self.drops["unknown_index"] += 1
            return
        peer = entry[0]
        hs = peer.handshake
        assert hs is not None
        keys = hs.consume_response(msg)
        if keys is None:
            self.drops["bad_handshake"] += 1
            return
        peer.handshake_index = None
        kp = Keypair(keys[0], keys[1], initiator=True, local_index=receiver,
                     remote_index=hs.remote_index, birth=now)
        self.index[receiver] = (peer, kp)
        self._roam(peer, src)
        self._authenticated_received(peer, now)
        self._install(peer, kp, now)
        self._handshake_complete(peer, now)
        if peer.staged:
            self._flush_staged(peer, now)
        else:
            self._send_keepalive(peer, now)  # confirms the session to the responder at once

    def _receive_cookie(self, msg: bytes, now: float) -> None:
        (receiver,) = _U32.unpack_from(msg, 4)
        entry = self.index.get(receiver)
        if entry is None or not entry[0].cookies.consume_reply(msg, now):
            self.drops["bad_cookie"] += 1

    def _receive_transport(self, data: bytes | memoryview, src: tuple[str, int] | RelaySource,
                           now: float) -> None:
        self.open_many((memoryview(data),), src, now, self._scratch,
                       lambda out, n: self.out_tun.append(bytes(out[:n])))

    def open_many(self, datagrams: Iterable[memoryview], src: tuple[str, int] | RelaySource,
                  now: float, out: memoryview, deliver: Callable[[memoryview, int], object]
                  ) -> None:
        """Fast path for what one read from ``src`` brought (a UDP GRO batch): each
        transport message is decrypted into ``out`` and its inner IP packet handed to
        ``deliver(out, length)`` before the next; any other message goes to
        :meth:`receive`. Drops are counted.

        The first message a key opens in the batch takes the whole path (key
        confirmation, roaming, the receive timers); the rest under that key, from the
        same source at the same instant, need only the cipher, the replay window, the
        keepalive and the inner source check. Any other message in between (a
        handshake may replace keys) makes the next transport message take the whole
        path again.
        """
        opened: dict[int, tuple[Peer, Keypair]] = {}
        pf, timing = self.packet_filter, self.timing
        for data in datagrams:
            if message_type(data) != MSG_TRANSPORT:
                self.receive(data, src, now)
                opened.clear()
                continue
            (receiver,) = _U32.unpack_from(data, 4)
            known = opened.get(receiver)
            if known is None:
                entry = self.index.get(receiver)
                if entry is None or (kp := entry[1]) is None:
                    self.drops["unknown_index"] += 1
                    continue
                peer = entry[0]
                if now - kp.birth >= timing.reject_after_time:
                    self.drops["expired_key"] += 1
                    continue
            else:
                peer, kp = known
            if kp.replay.greatest >= REJECT_AFTER_MESSAGES:
                self.drops["expired_key"] += 1
                continue
            if len(out) < len(data):
                self.drops["too_big"] += 1
                continue
            n = kp.decrypt_into(data, out)
            if n < 0:
                self.drops["bad_transport"] += 1
                continue
            peer.rx_bytes += len(data)
            if known is None:
                opened[receiver] = (peer, kp)
                if kp is peer.next:
                    for old in peer.received_with(kp) or ():
                        self._drop_keypair(old)
                    self._handshake_complete(peer, now)
                    if peer.staged:
                        self._flush_staged(peer, now)
                self._roam(peer, src)
                self._authenticated_received(peer, now)
                if kp.initiator and not peer.sent_lastminute_handshake and \
                        now - kp.birth >= timing.initiator_rekey_on_receive:
                    peer.sent_lastminute_handshake = True
                    self._initiate(peer, now, retry=False)
            if n == 0:
                continue  # keepalive
            if peer.t_send_keepalive is None:
                peer.t_send_keepalive = now + timing.keepalive_timeout
            else:
                peer.need_another_keepalive = True
            ln = self._check_inner(peer, out, n)
            if not ln:
                continue
            if pf is not None and not pf.inbound(out[:ln], now):
                self.drops["filtered"] += 1
                continue
            deliver(out, ln)

    def _check_inner(self, peer: Peer, plain: memoryview, n: int) -> int:
        """Length without padding, if the inner source is one this peer may use; else 0."""
        v = plain[0] >> 4
        if v == 4 and n >= 20:
            ln = (plain[2] << 8) | plain[3]
            owner = self.allowed.lookup_v4(int.from_bytes(plain[12:16], "big"))
        elif v == 6 and n >= 40:
            ln = ((plain[4] << 8) | plain[5]) + 40
            owner = self.allowed.lookup_v6(int.from_bytes(plain[8:24], "big"))
        else:
            self.drops["not_ip"] += 1
            return 0
        if ln > n:
            self.drops["bad_ip_length"] += 1
            return 0
        if owner is not peer:
            self.drops["source_not_allowed"] += 1
            return 0
        return ln

    # ---- outbound IP packets ----------------------------------------------------------
    def send(self, packet: bytes | memoryview, now: float) -> None:
        """One IP packet read from TUN: route it by destination and encrypt it."""
        n = len(packet)
        if n > len(self._scratch) - 64:
            self.drops["too_big"] += 1
            return
        buf = self._inbuf
        buf[:n] = packet
        for _, length, dest in self.seal_many((buf,), (n,), self._scratch, now):
            self.out_udp.append((bytes(self._scratch[:length]), dest))

    def seal_many(self, bufs: Sequence[bytearray | memoryview], lens: Sequence[int],
                  out: memoryview, now: float) -> list[Sealed]:
        """Fast path for a drain of IP packets from TUN, ``bufs[i][:lens[i]]`` (spare
        buffers past the last length are ignored).

        Pads each in place (a buffer needs 16 spare bytes) and encrypts them into ``out``
        back to back (room for every packet plus 32 bytes each); returns (offset,
        length, destination) per packet sent. A packet with no route or endpoint is
        dropped and counted; one with no fresh key is staged and a handshake starts
        (look at :attr:`out_udp`). ``now`` is one instant for the whole drain, so the
        route, endpoint and key are found once per destination address and the send
        timers run once per peer at the end: per packet there is the filter, the
        counter and the cipher, which is what lets one Python thread keep up.
        """
        sealed: list[Sealed] = []
        routes: dict[bytes, tuple[Peer, Keypair, Destination]] = {}
        used = 0
        pf, mtu, lookup = self.packet_filter, self.mtu, self.allowed.lookup_packet_dst
        for buf, n in zip(bufs, lens, strict=False):  # more buffers than packets is fine
            pkt = memoryview(buf)[:n]
            v = buf[0] >> 4 if n else 0
            # The destination address is the route's key; a packet too short or not IP
            # has none, and the lookup below drops it.
            dst = (bytes(pkt[16:20]) if v == 4 and n >= 20 else
                   bytes(pkt[24:40]) if v == 6 and n >= 40 else b"")
            route = routes.get(dst) if dst else None
            if route is None:
                peer = lookup(pkt)
                if peer is None:
                    self.drops["no_route"] += 1
                    continue
            else:
                peer = route[0]
            if pf is not None:
                pf.outbound(pkt, now)
            p = padded_len(n, mtu)
            if p > n:
                buf[n:p] = _ZEROS[:p - n]
            if route is None or route[1].send_counter >= REJECT_AFTER_MESSAGES:
                dest = peer.relay or peer.endpoint
                if dest is None:
                    self.drops["no_endpoint"] += 1
                    continue
                kp = self.valid_send_keypair(peer, now)
                if kp is None:
                    peer.staged.append(bytes(buf[:p]))
                    self._initiate(peer, now, retry=False)
                    continue
                route = routes[dst] = (peer, kp, dest)
            _, kp, dest = route
            length = kp.encrypt_into(out[used:], memoryview(buf)[:p])
            peer.tx_bytes += length
            sealed.append((used, length, dest))
            used += length
        for peer, kp, _ in {id(r[0]): r for r in routes.values()}.values():
            self.authenticated_sent(peer, now)
            self.data_sent(peer, now)
            self.keep_key_fresh(peer, kp, now)
        return sealed

    def valid_send_keypair(self, peer: Peer, now: float) -> Keypair | None:
        kp = peer.current
        if kp is None or now - kp.birth >= self.timing.reject_after_time or \
                kp.send_counter >= REJECT_AFTER_MESSAGES:
            return None
        return kp

    def _send_plain(self, peer: Peer, plain: bytes, now: float) -> None:
        kp = self.valid_send_keypair(peer, now)
        if kp is None:
            peer.staged.append(plain)
            self._initiate(peer, now, retry=False)
            return
        self._emit(peer, kp.encrypt(plain), now)
        if plain:
            self.data_sent(peer, now)
        self.keep_key_fresh(peer, kp, now)

    def data_sent(self, peer: Peer, now: float) -> None:
        """timers_data_sent: expect to hear back, or start a new handshake."""
        if peer.t_new_handshake is None:
            peer.t_new_handshake = now + self.timing.new_handshake_after + self._jitter()

    def keep_key_fresh(self, peer: Peer, kp: Keypair, now: float) -> None:
        if kp.send_counter > REKEY_AFTER_MESSAGES or \
                (kp.initiator and now - kp.birth >= self.timing.rekey_after_time):
            self._initiate(peer, now, retry=False)

    def _flush_staged(self, peer: Peer, now: float) -> None:
        staged = list(peer.staged)
        peer.staged.clear()
        for plain in staged:
            self._send_plain(peer, plain, now)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if peer.staged:
            self._flush_staged(peer, now)
        elif peer.destination is not None:
            self._send_plain(peer, b"", now)

    def _emit(self, peer: Peer, data: bytes, now: float) -> None:
        """Send an authenticated packet (handshake or transport) to the peer."""
        dest = peer.destination
        if dest is None:
            self.drops["no_endpoint"] += 1
            return
        self.out_udp.append((data, dest))
        peer.tx_bytes += len(data)
        self.authenticated_sent(peer, now)

    def authenticated_sent(self, peer: Peer, now: float) -> None:
        """timers_any_authenticated_packet_sent + _traversal."""
        peer.t_send_keepalive = None
        if peer.persistent_keepalive:
            peer.t_persistent = now + peer.persistent_keepalive

    def _authenticated_received(self, peer: Peer, now: float) -> None:
        peer.t_new_handshake = None
        if peer.persistent_keepalive:
            peer.t_persistent = now + peer.persistent_keepalive

    # ---- handshakes -------------------------------------------------------------------
    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> None:
        if not retry:
            peer.handshake_attempts = 0
        hs = peer.handshake
        if hs is None or peer.destination is None:
            return
        if now - peer.last_sent_handshake < self.timing.rekey_timeout:
            return
        peer.last_sent_handshake = now
        self._forget_handshake_index(peer)
        idx = self._new_index()
        peer.handshake_index = idx
        self.index[idx] = (peer, None)
        msg = hs.create_initiation(idx, self._timestamp())
        self._emit(peer, peer.cookies.add_macs(msg, now), now)
        peer.t_retransmit = now + self.timing.rekey_timeout + self._jitter()

    def _timestamp(self) -> bytes:
        ts = tai64n(self.wall())
        if ts <= self._last_tai:  # never repeat, even if the wall clock stalls
            ts = (int.from_bytes(self._last_tai, "big") + 1).to_bytes(12, "big")
        self._last_tai = ts
        return ts

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.t_retransmit = None
        peer.handshake_attempts = 0
        peer.sent_lastminute_handshake = False
        peer.last_handshake_wall = self.wall()
        peer.handshakes_completed += 1

    def _install(self, peer: Peer, kp: Keypair, now: float) -> None:
        self.index[kp.local_index] = (peer, kp)
        for old in peer.install(kp):
            self._drop_keypair(old)
        peer.t_zero_keys = now + self.timing.zero_keys_after  # timers_session_derived

    def _drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None:
            entry = self.index.get(kp.local_index)
            if entry is not None and entry[1] is kp:
                del self.index[kp.local_index]

    def _forget_handshake_index(self, peer: Peer) -> None:
        idx = peer.handshake_index
        if idx is not None:
            entry = self.index.get(idx)
            if entry is not None and entry[1] is None:
                del self.index[idx]
            peer.handshake_index = None

    def _new_index(self) -> int:
        while True:
            idx = secrets.randbits(32)
            if idx not in self.index:
                return idx

    def _jitter(self) -> float:
        return self.rng.random() * self.timing.rekey_timeout_jitter

    def _wipe(self, peer: Peer) -> None:
        self._forget_handshake_index(peer)
        for kp in peer.wipe():
            self._drop_keypair(kp)
        peer.t_retransmit = peer.t_new_handshake = peer.t_send_keepalive = None
        peer.t_zero_keys = None

    def _roam(self, peer: Peer, src: tuple[str, int] | RelaySource) -> None:
        """Authenticated packets move the endpoint to where they came from (roaming), and
        our address they reached becomes the source for that endpoint."""
        if isinstance(src, RelaySource):
            return
        if peer.endpoint != src:
            self._forget_source(peer)
            peer.endpoint = (src[0], src[1])
        if self.arrived_at is not None:
            self.sources[src] = self.arrived_at

    # ---- timers ----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        ds = [d for p in self.peers.values() for d in p.deadlines()]
        return min(ds) if ds else None

    def tick(self, now: float) -> float | None:
        """Fire every timer that is due (timers.c); returns the next deadline."""
        if now - self._last_gc >= 1.0:
            self._last_gc = now
            self.ratelimiter.gc(now)
        for peer in list(self.peers.values()):
            if peer.t_retransmit is not None and now >= peer.t_retransmit:
                peer.t_retransmit = None
                if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
                    peer.t_send_keepalive = None
                    peer.staged.clear()
                    if peer.t_zero_keys is None:
                        peer.t_zero_keys = now + self.timing.zero_keys_after
                else:
                    peer.handshake_attempts += 1
                    self._initiate(peer, now, retry=True)
            if peer.t_send_keepalive is not None and now >= peer.t_send_keepalive:
                peer.t_send_keepalive = None
                self._send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.t_send_keepalive = now + self.timing.keepalive_timeout
            if peer.t_new_handshake is not None and now >= peer.t_new_handshake:
                peer.t_new_handshake = None
                self._initiate(peer, now, retry=False)
            if peer.t_zero_keys is not None and now >= peer.t_zero_keys:
                self._wipe(peer)
            if peer.t_persistent is not None and now >= peer.t_persistent:
                peer.t_persistent = None
                self._send_keepalive(peer, now)
        return self.next_deadline()

    def drain(self) -> tuple[list[tuple[bytes, Destination]], list[bytes]]:
        """Take the pending outputs."""
        udp, tun = self.out_udp, self.out_tun
        self.out_udp, self.out_tun = [], []
        return udp, tun

