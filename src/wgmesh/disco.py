"""Disco: the small sealed messages that find and keep direct paths (sans-I/O).

Three messages, as in Tailscale: :class:`Ping` (a transaction id), :class:`Pong`
(the id, plus the source address the pinged node saw, so every pong doubles as
a STUN answer) and :class:`CallMeMaybe` (the sender's candidate endpoints, sent
via the relay so both sides punch at the same moment).

They are sealed with NaCl ``crypto_box`` under per-node *disco keys*, which are
separate from the WireGuard keys: a disco key can be rotated, and leaking it
never exposes a WireGuard session. Wire format (one UDP datagram)::

    MAGIC (7) | sender disco public key (32) | nonce (24) | box (16 + plaintext)
    plaintext = type (1) | version (1) | sender timestamp ms (8, big-endian) | body

Path MTU probes (:mod:`wgmesh.pmtu`) are pings with zero padding after the body;
the pong to a padded ping appends the length of the datagram the ping arrived in
(2 bytes), which confirms the size got through whole. A pong is never padded, so
it is always smaller than the ping it answers (:data:`PONG_LEN` < :data:`PING_LEN`):
padding buys a sender no amplification. The format stays compatible: unpadded
pings and their pongs are byte for byte what they were, and an old node drops a
padded ping as malformed, so probing it just finds nothing. A pong through the
relay saw no address and says :data:`NO_ADDR`.

``MAGIC`` is ``b"wgm"`` + the UTF-8 speech balloon. Its first byte (0x77) is not
a WireGuard message type (1..4 followed by three zero bytes) and has the top
bits 01, so it is never STUN either (STUN needs 00 there and the magic cookie
at bytes 4..8, where disco has ``9f 92 ac`` and a key byte). A shared port
demultiplexes with :func:`is_disco`; a BPF filter can match the first 32-bit
word ``b"wgm\\xf0"`` (:data:`BPF_WORD`).

Replays: a box proves who sealed it, not when. The sender stamps each message
with its wall clock; a receiver keeps, per sender, the newest stamp and the
nonces seen within :data:`REPLAY_WINDOW` of it, and drops anything older than
the window or already seen. Only authenticated messages touch that state, so
garbage cannot evict real entries. A sender whose clock steps back by more than
the window is refused until it catches up.

Every malformed, unauthenticated or replayed datagram is dropped silently and
counted in :attr:`Disco.counters`; :meth:`Disco.open` never raises.

No I/O here: the owner passes in the wall clock and the source of random bytes
(nonces, transaction ids), so tests can drive both.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable

import attrs
from nacl.exceptions import CryptoError
from nacl.public import Box, PublicKey

from wgmesh.keys import Key, PrivateKey

__all__ = [
    "BPF_WORD",
    "MAGIC",
    "MAX_ENDPOINTS",
    "MAX_PADDING",
    "NO_ADDR",
    "PING_LEN",
    "PONG_LEN",
    "REPLAY_WINDOW",
    "Addr",
    "CallMeMaybe",
    "Disco",
    "Message",
    "Ping",
    "Pong",
    "is_disco",
    "sender_of",
]

Addr = tuple[str, int]

MAGIC = b"wgm\xf0\x9f\x92\xac"
BPF_WORD = int.from_bytes(MAGIC[:4], "big")
VERSION = 0
TXID_LEN = 12
KEY_LEN = 32
NONCE_LEN = 24
MAC_LEN = 16
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN
_PLAIN_HDR = struct.Struct("!BBQ")
_ADDR_LEN = 18
MAX_ENDPOINTS = 64
REPLAY_WINDOW = 120.0
MAX_SENDERS = 4096
MAX_NONCES_PER_SENDER = 2048
_MAX_BOXES = 4096

T_PING, T_PONG, T_CALL_ME_MAYBE = 1, 2, 3
_SIZE = struct.Struct("!H")
#: Datagram lengths of an unpadded ping and of any pong (with its size field).
PING_LEN = HEADER_LEN + MAC_LEN + _PLAIN_HDR.size + TXID_LEN + KEY_LEN
PONG_LEN = HEADER_LEN + MAC_LEN + _PLAIN_HDR.size + TXID_LEN + _ADDR_LEN + _SIZE.size
#: Probes stop at a 9000-byte jumbo datagram; a bigger "ping" is malformed.
MAX_PADDING = 9000 - PING_LEN
#: The source a pong through the relay reports: none was seen.
NO_ADDR: Addr = ("::", 0)

#: CallMeMaybe flags. The sender's NAT maps each destination to a new port.
FLAG_HARD_NAT = 0x01
#: The sender can open many extra UDP ports (userspace), so a birthday search can hit it.
FLAG_MANY_PORTS = 0x02
#: "I am starting a port search against you now": open your ports and ping me from them.
FLAG_PORT_SEARCH = 0x04
#: This call-me-maybe answers one of yours (so it is never answered: no ping-pong).
FLAG_REPLY = 0x08


def is_disco(data: bytes) -> bool:
    """Cheap demux test for a datagram on a port shared with WireGuard and STUN."""
    return len(data) >= HEADER_LEN + MAC_LEN + _PLAIN_HDR.size and data.startswith(MAGIC)


def sender_of(data: bytes) -> Key | None:
    """The claimed sender key, unauthenticated: lets a receiver drop strangers before
    spending a key agreement on them."""
    if not is_disco(data):
        return None
    return Key.from_raw(data[len(MAGIC):len(MAGIC) + KEY_LEN])


@attrs.frozen
class Ping:
    txid: bytes
    node_key: Key  # the sender's WireGuard key: the receiver checks it matches the disco key
    #: Zero bytes after the body: a path MTU probe of ``PING_LEN + padding`` bytes.
    padding: int = 0


@attrs.frozen
class Pong:
    txid: bytes
    src: Addr  # where the ping came from, as the pinged node saw it (NO_ADDR: relay)
    #: The length of the padded ping's datagram, as it arrived (0: an unpadded ping's pong).
    size: int = 0


@attrs.frozen
class CallMeMaybe:
    endpoints: tuple[Addr, ...]
    flags: int = 0


Message = Ping | Pong | CallMeMaybe


def _pack_addr(addr: Addr) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    raw = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    return raw + struct.pack("!H", addr[1])


def _unpack_addr(raw: bytes) -> Addr | None:
    ip = ipaddress.IPv6Address(raw[:16])
    port = struct.unpack("!H", raw[16:18])[0]
    if port == 0:
        return None
    return (str(ip.ipv4_mapped or ip), port)


def _encode_body(msg: Message) -> tuple[int, bytes]:
    if isinstance(msg, Ping):
        if not 0 <= msg.padding <= MAX_PADDING:
            raise ValueError(f"padding 0..{MAX_PADDING}")
        return T_PING, msg.txid + msg.node_key.raw + bytes(msg.padding)
    if isinstance(msg, Pong):
        if not msg.size:
            return T_PONG, msg.txid + _pack_addr(msg.src)
        if not PING_LEN < msg.size <= PING_LEN + MAX_PADDING:
            raise ValueError("a pong's size is a padded ping's length")
        return T_PONG, msg.txid + _pack_addr(msg.src) + _SIZE.pack(msg.size)
    if len(msg.endpoints) > MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} endpoints")
    return T_CALL_ME_MAYBE, bytes([msg.flags]) + b"".join(_pack_addr(a) for a in msg.endpoints)


def _decode_body(mtype: int, body: bytes) -> Message | None:
    if mtype == T_PING and TXID_LEN + KEY_LEN <= len(body) <= TXID_LEN + KEY_LEN + MAX_PADDING:
        return Ping(body[:TXID_LEN], Key.from_raw(body[TXID_LEN:TXID_LEN + KEY_LEN]),
                    len(body) - TXID_LEN - KEY_LEN)
    if mtype == T_PONG and len(body) == TXID_LEN + _ADDR_LEN:
        src = _unpack_addr(body[TXID_LEN:])
        return None if src is None else Pong(body[:TXID_LEN], src)
    if mtype == T_PONG and len(body) == TXID_LEN + _ADDR_LEN + _SIZE.size:
        (size,) = _SIZE.unpack_from(body, TXID_LEN + _ADDR_LEN)
        src = _unpack_addr(body[TXID_LEN:TXID_LEN + _ADDR_LEN]) or NO_ADDR
        return Pong(body[:TXID_LEN], src, size) if PING_LEN < size <= PING_LEN + MAX_PADDING \
            else None
    if mtype == T_CALL_ME_MAYBE and len(body) % _ADDR_LEN == 1:
        addrs = [_unpack_addr(body[i:i + _ADDR_LEN]) for i in range(1, len(body), _ADDR_LEN)]
        if len(addrs) > MAX_ENDPOINTS or None in addrs:
            return None
        return CallMeMaybe(tuple(a for a in addrs if a is not None), body[0])
    return None


class _SenderWindow:
    """Newest stamp and recent nonces of one sender (see the module docstring).

    Nonces are kept in arrival order, so pruning pops from the front. If a sender
    floods past the cap, the floor rises to the evicted stamp: replays stay
    impossible at the price of refusing that sender's older stragglers.
    """

    __slots__ = ("floor", "newest", "nonces")

    def __init__(self) -> None:
        self.newest = 0
        self.floor = 0
        self.nonces: OrderedDict[bytes, int] = OrderedDict()

    def admit(self, stamp_ms: int, nonce: bytes, window_ms: int) -> bool:
        if stamp_ms < max(self.floor, self.newest - window_ms) or nonce in self.nonces:
            return False
        self.nonces[nonce] = stamp_ms
        self.newest = max(self.newest, stamp_ms)
        low = self.newest - window_ms
        while self.nonces:
            oldest = next(iter(self.nonces.values()))
            if oldest >= low and len(self.nonces) <= MAX_NONCES_PER_SENDER:
                break
            self.nonces.popitem(last=False)
            if oldest >= low:
                self.floor = max(self.floor, oldest + 1)
        return True


class Disco:
    """Seal and open disco messages for one node.

    ``wall`` is the clock used for replay stamps (wall time survives reboots,
    which a monotonic clock does not): ``time.time`` in a node, a fake in tests.
    ``random_bytes(n)`` gives ``n`` unpredictable bytes (``secrets.token_bytes``).
    """

    def __init__(self, private: PrivateKey, *, wall: Callable[[], float],
                 random_bytes: Callable[[int], bytes],
                 replay_window: float = REPLAY_WINDOW) -> None:
        self._private = private.nacl()
        self.public: Key = private.public
        self._wall = wall
        self._random = random_bytes
        self._window_ms = int(replay_window * 1000)
        self._boxes: OrderedDict[Key, Box] = OrderedDict()
        self._senders: OrderedDict[Key, _SenderWindow] = OrderedDict()
        self._last_stamp = 0
        self.counters: Counter[str] = Counter()

    def new_txid(self) -> bytes:
        """A fresh, unguessable ping id: a pong can only answer a ping it saw."""
        return self._random(TXID_LEN)

    def _box(self, peer: Key) -> Box:
        box = self._boxes.get(peer)
        if box is None:
            box = Box(self._private, PublicKey(peer.raw))  # precomputes the shared key
            self._boxes[peer] = box
            if len(self._boxes) > _MAX_BOXES:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(peer)
        return box

    def seal(self, peer: Key, msg: Message) -> bytes:
        """One datagram carrying ``msg`` for the holder of disco key ``peer``."""
        mtype, body = _encode_body(msg)
        # Strictly increasing, so a flood-raised floor never refuses a fresh message.
        stamp = self._last_stamp = max(int(self._wall() * 1000), self._last_stamp + 1)
        plain = _PLAIN_HDR.pack(mtype, VERSION, stamp) + body
        nonce = self._random(NONCE_LEN)
        sealed = self._box(peer).encrypt(plain, nonce).ciphertext
        self.counters["sealed"] += 1
        return MAGIC + self.public.raw + nonce + sealed

    def open(self, data: bytes) -> tuple[Key, Message] | None:
        """``(sender disco key, message)``, or ``None`` (counted) for anything else."""
        if not data.startswith(MAGIC):
            self.counters["drop_not_disco"] += 1
            return None
        if len(data) < HEADER_LEN + MAC_LEN + _PLAIN_HDR.size:
            self.counters["drop_truncated"] += 1
            return None
        sender = Key.from_raw(data[len(MAGIC):len(MAGIC) + KEY_LEN])
        if sender == self.public:
            self.counters["drop_from_self"] += 1
            return None
        nonce = data[len(MAGIC) + KEY_LEN:HEADER_LEN]
        try:
            plain = self._box(sender).decrypt(data[HEADER_LEN:], nonce)
        except (CryptoError, ValueError, TypeError):
            self.counters["drop_bad_box"] += 1
            return None
        mtype, version, stamp = _PLAIN_HDR.unpack_from(plain)
        if version != VERSION:
            self.counters["drop_version"] += 1
            return None
        msg = _decode_body(mtype, plain[_PLAIN_HDR.size:])
        if msg is None:
            self.counters["drop_malformed"] += 1
            return None
        if not self._admit(sender, stamp, nonce):
            self.counters["drop_replay"] += 1
            return None
        self.counters["opened"] += 1
        return sender, msg

    def _admit(self, sender: Key, stamp: int, nonce: bytes) -> bool:
        win = self._senders.get(sender)
        if win is None:
            win = self._senders[sender] = _SenderWindow()
            if len(self._senders) > MAX_SENDERS:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(sender)
        return win.admit(stamp, nonce, self._window_ms)
