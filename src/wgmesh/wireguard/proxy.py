"""The relay bridge: kernel WireGuard talking to a peer it can only reach via a relay.

The kernel sends WireGuard packets to UDP endpoints and nowhere else. So for a
relayed peer the kernel's endpoint is a loopback UDP socket owned by wgmesh,
one per peer::

    kernel wg0 (port L) --udp--> 127.0.0.1:p  --send(peer, pkt)-------------> relay
    kernel wg0 (port L) <--udp-- 127.0.0.1:p  <--RelayBridge.deliver(peer, pkt)-- relay

Each socket is connected to ``127.0.0.1:L``, so it only ever accepts the
kernel's own packets, and packets from the relay are sent from it, so the
kernel sees them arrive from exactly the endpoint it has for that peer and its
roaming logic never moves the peer elsewhere. Switching a peer between relay
and direct is one endpoint change on the backend (:meth:`RelayBridge.use_relay`,
:meth:`RelayBridge.use_direct`). While a peer is direct, packets that still
come in via the relay are dropped: injected, they would make the kernel roam
the peer back to the loopback endpoint.

With the relay client::

    client = RelayClient(key, relays, on_packet=lambda src, pkt: bridge.deliver(src, pkt))
    bridge = RelayBridge(loop, client.send_nowait, backend.listen_port, netns=...)

``send`` must not block (``RelayClient.send_nowait``, ``RelayClientThread.send``):
it runs on the loop for every packet, and a full relay link drops, as UDP may.
The bridge is driven by an asyncio loop. ``deliver`` is meant to be called on it (the
relay client calls it there); from another thread it hops onto the loop first. The
endpoint methods may be called from any thread (loop work is handed over with
``call_soon_threadsafe``). The bytes are WireGuard ciphertext: the bridge and the
relay never see plaintext.

:class:`PipeTransport` joins two bridges over one byte stream (a TCP connection
in the kernel-tier test and the benchmark), framing each packet with its
sender's key as a relay would.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable, Sequence

import attrs

from wgmesh.keys import KEY_LEN, Key
from wgmesh.wireguard.backend import Backend
from wgmesh.wireguard.mmsg import batch_receiver
from wgmesh.wireguard.netns import call_in
from wgmesh.wireguard.offload import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_UNSUPPORTED,
    SOL_UDP,
    UDP_SEGMENT,
)

__all__ = ["BridgeCounters", "PipeTransport", "RelayBridge", "SendToPeer"]

Address = tuple[str, int]
MAX_DATAGRAM = 65535
BATCH = 64  # datagrams read per wake-up, so one busy peer can't starve the others
# Receive buffer of an endpoint socket (wireguard-go and Tailscale use 7 MB): the kernel
# hands WireGuard's packets over in bursts while the Python loop may be off the CPU for
# milliseconds, and every datagram the default ~200 KB cannot hold is a loss inside the
# tunnel. Forced past net.core.rmem_max where we may (CAP_NET_ADMIN, which the kernel
# backend has anyway), else as large as that allows.
RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33  # Linux; not in Python's socket module


#: Carries a packet to the node with public key ``dst``; must not block.
SendToPeer = Callable[[Key, bytes], object]


@attrs.define
class BridgeCounters:
    to_relay: int = 0      # kernel -> relay packets
    from_relay: int = 0    # relay -> kernel packets injected
    dropped: int = 0       # relay packets for a direct or unknown peer, or failed sends


@attrs.define(eq=False)
class _Port:
    key: Key
    sock: socket.socket
    direct: bool = False
    counters: BridgeCounters = attrs.field(factory=BridgeCounters)
    pending: list[bytes] = attrs.field(factory=list)  # from the relay, this loop iteration


class RelayBridge:
    """Loopback endpoints for relayed peers of a kernel interface listening on ``wg_port``.

    ``batched=False`` reads the kernel's datagrams one ``recv`` each, as the bridge does
    anyway where libc has no ``recvmmsg`` (:mod:`wgmesh.wireguard.mmsg`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, send: SendToPeer, wg_port: int, *,
                 netns: str | None = None, host: str = "127.0.0.1",
                 batched: bool = True) -> None:
        self.loop = loop
        self.send = send
        self.wg_port = wg_port
        self.netns = netns
        self.host = host
        # By the key's raw bytes: the relay hands every packet over with a fresh Key, and
        # a bytes lookup costs a fraction of Key's Python-level __hash__ and __eq__.
        self._ports: dict[bytes, _Port] = {}
        self._loop_thread: int | None = None  # the loop's thread, once deliver ran on it
        self._lock = threading.Lock()
        self._due: list[_Port] = []  # ports with pending packets; non-empty: a flush is due
        self._gso = True
        # One receive ring for all endpoints (they are read on the loop, one at a time).
        self._rx = batch_receiver(BATCH) if batched else None
        self.unknown = 0  # relay packets from peers the bridge has no endpoint for

    def __repr__(self) -> str:
        return f"<RelayBridge wg port {self.wg_port}: {len(self._ports)} peer(s)>"

    # -- endpoints
    def add(self, key: Key) -> Address:
        """The loopback endpoint for ``key`` (created on first use)."""
        return self.add_many([key])[key]

    def add_many(self, keys: Sequence[Key]) -> dict[Key, Address]:
        """The loopback endpoints for ``keys``, the missing ones made in one go: one trip
        into the namespace and one hand-over to the loop for all of them (a first netmap
        sends hundreds of peers to the relay at once)."""
        with self._lock:
            new = list({k.raw: k for k in keys if k.raw not in self._ports}.values())
            if new:
                socks = call_in(self.netns, self._sockets, len(new))
                added = [_Port(k, s) for k, s in zip(new, socks, strict=True)]
                self._ports.update((p.key.raw, p) for p in added)
                self.loop.call_soon_threadsafe(self._watch, added)
            ports = [self._ports[k.raw] for k in keys]
        return {p.key: _local(p.sock) for p in ports}

    def _sockets(self, count: int) -> list[socket.socket]:
        """``count`` endpoint sockets, each connected to the kernel's port (all or none)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        made: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                made.append(sock)
                _grow_rcvbuf(sock)
                sock.bind((self.host, 0))
                sock.connect((self.host, self.wg_port))
                sock.setblocking(False)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    def _watch(self, ports: list[_Port]) -> None:
        for port in ports:
            if self._ports.get(port.key.raw) is port:  # not removed meanwhile
                self.loop.add_reader(port.sock.fileno(), self._readable, port)

    def endpoint(self, key: Key) -> Address:
        return _local(self._ports[key.raw].sock)

    def remove(self, key: Key) -> None:
        with self._lock:
            port = self._ports.pop(key.raw, None)
        if port is not None:
            def close() -> None:
                self.loop.remove_reader(port.sock.fileno())
                port.sock.close()
            self.loop.call_soon_threadsafe(close)

    def counters(self, key: Key) -> BridgeCounters:
        return self._ports[key.raw].counters

    # -- switching paths
    def use_relay(self, backend: Backend, key: Key) -> Address:
        """Route ``key`` through the relay: one endpoint change on ``backend``."""
        ep = self.add(key)
        self._ports[key.raw].direct = False
        backend.set_endpoint(key, ep)
        return ep

    def use_direct(self, backend: Backend, key: Key, endpoint: Address) -> None:
        """Send ``key``'s packets straight to ``endpoint``; the loopback endpoint stays
        ready, so going back to the relay is instant."""
        if (port := self._ports.get(key.raw)) is not None:
            port.direct = True
        backend.set_endpoint(key, endpoint)

    # -- packets
    def _readable(self, port: _Port) -> None:
        """Up to BATCH datagrams from the kernel, with one ``recvmmsg`` where libc has it,
        else one ``recv`` each. The kernel module sends datagram by datagram and loopback
        does no GRO, so ``UDP_GRO`` would merge nothing the kernel sends (only a stand-in
        that sends with GSO): the batch is the syscall, not the packets."""
        if self._rx is not None:
            try:
                packets = self._rx.recv(port.sock.fileno())
            except OSError as e:  # e.g. ICMP unreachable reported on the connected socket
                if e.errno == errno.ENOSYS:  # libc has it, the kernel (or sandbox) not
                    self._rx = None
                else:
                    port.counters.dropped += 1
                return
        else:
            packets = self._recv_each(port)
        send, key = self.send, port.key
        for packet in packets:
            send(key, packet)
        port.counters.to_relay += len(packets)

    @staticmethod
    def _recv_each(port: _Port) -> list[bytes]:
        recv = port.sock.recv
        packets: list[bytes] = []
        for _ in range(BATCH):
            try:
                packets.append(recv(MAX_DATAGRAM))
            except BlockingIOError:
                break
            except OSError:  # e.g. ICMP unreachable reported on the connected socket
                port.counters.dropped += 1
        return packets

    def deliver(self, src: Key, packet: bytes) -> None:
        """A packet from the relay, sent by the node ``src``: hand it to the kernel.

        Packets of one loop iteration leave together, runs of one size as one UDP GSO
        ``sendmsg``: a send to the kernel's port on loopback runs the whole receive path
        in the sender, so one syscall per packet capped the bridge (py-spy: 76 % in it).
        Per packet this only appends to the peer's list: the relay client calls it for
        every packet, and the far side of a bridged flow was the busiest process."""
        thread = threading.get_ident()
        if thread != self._loop_thread:  # a thread compare: get_running_loop() costs 5x
            try:
                on_loop = asyncio.get_running_loop() is self.loop
            except RuntimeError:
                on_loop = False
            if not on_loop:
                self.loop.call_soon_threadsafe(self.deliver, src, packet)
                return
            self._loop_thread = thread  # a loop runs in one thread for its life
        port = self._ports.get(src.raw)
        if port is None:
            self.unknown += 1
            return
        if port.direct:
            port.counters.dropped += 1
            return
        if not port.pending:
            if not self._due:
                self.loop.call_soon(self._flush)
            self._due.append(port)
        port.pending.append(packet)

    def _flush(self) -> None:
        due, self._due = self._due, []
        for port in due:
            packets, port.pending = port.pending, []
            sizes = list(map(len, packets))
            i = 0
            while i < len(packets):
                j = _gso_run(sizes, i)
                self._send(port, packets[i:j])
                i = j

    def _send(self, port: _Port, packets: list[bytes]) -> None:
        """One run (equal sizes but maybe the last) to the kernel: one GSO send, or one
        send per packet where the kernel has no UDP GSO. The packets go to the kernel as
        an iovec each, not joined first. A full buffer drops, as UDP may."""
        c = port.counters
        if len(packets) > 1 and self._gso:
            try:
                port.sock.sendmsg(packets, [
                    (SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(packets[0])))])
            except OSError as e:
                if e.errno not in GSO_UNSUPPORTED:
                    c.dropped += len(packets)
                    return
                self._gso = False  # no UDP GSO here: one by one from now on
            else:
                c.from_relay += len(packets)
                return
        for packet in packets:
            try:
                port.sock.send(packet)
            except OSError:
                c.dropped += 1
                continue
            c.from_relay += 1

    def close(self) -> None:
        for port in list(self._ports.values()):
            self.remove(port.key)


def _local(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return (host, port)


def _grow_rcvbuf(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)


def _gso_run(sizes: list[int], i: int) -> int:
    """End of the GSO run starting at ``i`` (``sizes`` are the packets' lengths):
    datagrams of the first one's size, the last maybe shorter, within the kernel's
    segment and byte limits. A run of equal sizes, the common case, is found in C."""
    seg = sizes[i]
    if not seg:
        return i + 1  # an empty datagram goes alone (segment size 0 means no GSO)
    limit = min(len(sizes), i + max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // seg)))
    if sizes[i:limit].count(seg) == limit - i:
        j = limit
    else:
        j = i + 1
        while j < limit and sizes[j] == seg:
            j += 1
    if j < len(sizes) and j < i + GSO_MAX_SEGMENTS and 0 < sizes[j] < seg \
            and (j - i) * seg + sizes[j] <= GSO_MAX_BYTES:
        j += 1  # a shorter datagram ends a run
    return j


class PipeTransport:
    """A point-to-point relay stand-in: packets framed as ``sender key | length | bytes``
    over one asyncio stream. The far side hands ``(sender, packet)`` to ``on_packet``.

    Writes beyond ``max_buffer`` unsent bytes are dropped, as a congested relay link
    would: WireGuard runs over UDP semantics, and queueing would only add delay.
    """

    _HEADER = struct.Struct(f"!{KEY_LEN}sH")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 local: Key, on_packet: Callable[[Key, bytes], None],
                 max_buffer: int = 1 << 20) -> None:
        self.reader = reader
        self.writer = writer
        self.local = local
        self.on_packet = on_packet
        self.max_buffer = max_buffer
        self.dropped = 0
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def send(self, dst: Key, packet: bytes) -> None:
        if self.writer.is_closing() or len(packet) > 0xFFFF:
            self.dropped += 1
            return
        if self.writer.transport.get_write_buffer_size() > self.max_buffer:
            self.dropped += 1
            return
        # Frames of one loop iteration (one bridge wake-up reads up to 64 datagrams)
        # leave in one write: one syscall per burst, not per packet.
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(self._HEADER.pack(self.local.raw, len(packet)))
        self._pending.append(packet)

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if not self.writer.is_closing():
            self.writer.write(data)

    def start(self) -> asyncio.Task[None]:
        """Start reading frames (call on the loop)."""
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self._task

    async def _read(self) -> None:
        buf = b""
        head = self._HEADER.size
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(1 << 16):
                buf += chunk
                pos = 0
                while len(buf) - pos >= head:
                    raw, length = self._HEADER.unpack_from(buf, pos)
                    if len(buf) - pos - head < length:
                        break
                    self.on_packet(Key.from_raw(raw), buf[pos + head:pos + head + length])
                    pos += head + length
                buf = buf[pos:]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.writer.close()
