"""Relay wire protocol, sans-I/O: frames, the authenticated handshake, URLs.

A relay forwards opaque frames ``(public key, bytes)`` between nodes that can't
reach each other directly, as Tailscale's DERP does. Bytes are WireGuard
ciphertext or sealed disco messages, so a relay learns only who talks to whom.

Transport: TCP (optionally TLS), starting as HTTP/1.1 so a relay can sit on
443 behind the same TLS as any web server::

    GET /relay HTTP/1.1            ->   HTTP/1.1 101 Switching Protocols
    Upgrade: wgmesh-relay               Upgrade: wgmesh-relay
    Connection: Upgrade                 Connection: Upgrade

then frames both ways, each ``type (1 byte) | length (4 bytes, big endian) | body``:

==============  =====  ====  ==================================================
frame           type   dir   body
==============  =====  ====  ==================================================
SERVER_HELLO    1      s->c  MAGIC, server key (32), challenge (32)
CLIENT_HELLO    2      c->s  MAGIC, client key (32), nonce (24), box(challenge + info JSON)
SERVER_INFO     3      s->c  nonce (24), box(client's hello nonce + info JSON)
SEND            4      c->s  destination key (32), packet
RECV            5      s->c  source key (32), packet
KEEPALIVE       6      both  empty; proves the connection is alive
PING / PONG     7 / 8  both  8 opaque bytes echoed back (latency, liveness)
PEER_GONE       9      s->c  key (32), reason (1): see ``GONE_*``
PEER_PRESENT    10     s->c  key (32): that node is (again) connected here
NOTE_PREFERRED  11     c->s  1 byte: 1 = this is my home relay
FORWARD         12     mesh  source key (32), destination key (32), packet
CLOSE           13     s->c  UTF-8 reason, sent just before the server closes
DELIVER         14     wrk   source key (32), destination key (32), count (4),
                             that many ready RECV frames (workers of one relay)
==============  =====  ====  ==================================================

Authentication, both ways: the client seals the server's fresh challenge with
NaCl box under (its node key, the server's key). Only the holder of the
node's private key can produce a box that opens under the claimed public key,
and the challenge makes it unreplayable; the private key itself never leaves
the node. The server answers with SERVER_INFO sealed under (its key, the
client's key) around the client's fresh hello nonce, so only the holder of
the server's private key can produce it: a client that knows the relay's key
(from the relay map, or ``#KEY`` after a relay URL) refuses a SERVER_HELLO
naming another key before sending anything, and a relay that cannot seal
SERVER_INFO under the key it named.

Relays of one region mesh: a relay connects to its peers as a client whose
sealed info carries a proof of the region's mesh key (an HMAC bound to both
relay keys and the challenge, compared in constant time), never the key
itself, so whoever answers at a mesh peer's address learns nothing it could
reuse; the answering relay proves the mesh key the same way in SERVER_INFO.
The dialling relay then watches presence (PEER_PRESENT/PEER_GONE of the
peer's clients) and sends FORWARD frames, which the receiver delivers to
local clients only, so a packet crosses at most one mesh hop.

The worker processes of one relay (``wgmesh relay serve --workers N``) mesh the
same way over UNIX sockets. Between them a run of packets from one sender to one
destination travels as one DELIVER frame holding the RECV frames the
destination gets (:meth:`FrameDecoder.feed_relayed` builds them), so the
receiving worker forwards the run with one write instead of one per packet.

This module is the sans-I/O part: bytes in, bytes out; the caller supplies the
randomness (challenges, nonces). The asyncio drivers live in :mod:`wgmesh.relaynet`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PublicKey as _NaclPublicKey

from wgmesh.errors import WgmeshError
from wgmesh.keys import KEY_LEN, Key, PrivateKey

__all__ = [
    "CHALLENGE_LEN",
    "DELIVER_HEAD",
    "GONE_DISCONNECTED",
    "GONE_NOT_HERE",
    "HEADER_LEN",
    "MAGIC",
    "MAX_FRAME",
    "MAX_PACKET",
    "NONCE_LEN",
    "PROTOCOL_VERSION",
    "RUN_BYTES",
    "UPGRADE_TOKEN",
    "ClientHello",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "RelayURL",
    "SendRun",
    "encode_frame",
    "frame_client_hello",
    "frame_deliver",
    "frame_forward",
    "frame_peer",
    "frame_recv",
    "frame_send",
    "frame_server_hello",
    "frame_server_info",
    "mesh_mac",
    "open_client_hello",
    "open_server_info",
    "parse_deliver",
    "parse_forward",
    "parse_peer",
    "parse_server_hello",
    "split_frames",
    "split_key",
]

MAGIC = b"WGMRLY\x00\x02"  # the last byte is the protocol version
PROTOCOL_VERSION = 2
UPGRADE_TOKEN = "wgmesh-relay"
HEADER_LEN = 5
CHALLENGE_LEN = 32
NONCE_LEN = Box.NONCE_SIZE
MAC_LEN = 16  # crypto_box_MACBYTES
#: The largest packet a node may send; WireGuard packets are far smaller, so
#: this only bounds memory per frame.
MAX_PACKET = 64 * 1024
#: The largest frame body: FORWARD carries two keys in front of a packet.
MAX_FRAME = MAX_PACKET + 2 * KEY_LEN
MAX_INFO = 4096

GONE_DISCONNECTED = 0  # the node was here and left
GONE_NOT_HERE = 1  # never here: reach the node's home relay directly


class FrameType(enum.IntEnum):
    SERVER_HELLO = 1
    CLIENT_HELLO = 2
    SERVER_INFO = 3
    SEND = 4
    RECV = 5
    KEEPALIVE = 6
    PING = 7
    PONG = 8
    PEER_GONE = 9
    PEER_PRESENT = 10
    NOTE_PREFERRED = 11
    FORWARD = 12
    CLOSE = 13
    DELIVER = 14


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class FrameError(WgmeshError, ValueError):
    """The peer broke the framing (unknown type, oversize, malformed body): close it."""


def encode_frame(ftype: int, body: bytes = b"") -> bytes:
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME}")
    return bytes((ftype,)) + len(body).to_bytes(4, "big") + body


def frame_send(dst: Key, packet: bytes) -> bytes:
    """SEND: ``packet`` to the node holding ``dst``."""
    if len(packet) > MAX_PACKET:
        raise FrameError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET}")
    return encode_frame(FrameType.SEND, dst.raw + packet)


def frame_recv(src_raw: bytes, packet: bytes | memoryview) -> bytes:
    """RECV as the server builds it on the hot path (raw key bytes, no checks)."""
    n = KEY_LEN + len(packet)
    return b"".join((bytes((FrameType.RECV,)), n.to_bytes(4, "big"), src_raw, packet))


def frame_forward(src_raw: bytes, dst_raw: bytes, packet: bytes | memoryview) -> bytes:
    n = 2 * KEY_LEN + len(packet)
    return b"".join((bytes((FrameType.FORWARD,)), n.to_bytes(4, "big"), src_raw, dst_raw,
                     packet))


DELIVER_HEAD = 2 * KEY_LEN + 4


def frame_deliver(src_raw: bytes, dst_raw: bytes, count: int, frames: bytes) -> bytes:
    """DELIVER: ``count`` RECV frames (already built) from ``src`` for ``dst``."""
    return encode_frame(FrameType.DELIVER,
                        b"".join((src_raw, dst_raw, count.to_bytes(4, "big"), frames)))


def parse_deliver(body: bytes) -> tuple[bytes, bytes, int, bytes]:
    """``(src, dst, count, frames)`` of a DELIVER body."""
    if len(body) < DELIVER_HEAD:
        raise FrameError("DELIVER shorter than its head")
    return (body[:KEY_LEN], body[KEY_LEN:2 * KEY_LEN],
            int.from_bytes(body[2 * KEY_LEN:DELIVER_HEAD], "big"), body[DELIVER_HEAD:])


def split_frames(frames: bytes) -> list[bytes]:
    """Encoded frames laid end to end (a :class:`SendRun`'s), one by one."""
    out, off = [], 0
    while off + HEADER_LEN <= len(frames):
        stop = off + HEADER_LEN + int.from_bytes(frames[off + 1:off + HEADER_LEN], "big")
        out.append(frames[off:stop])
        off = stop
    return out


def frame_peer(ftype: FrameType, key_raw: bytes, reason: int = GONE_DISCONNECTED, *,
               since: int = 0) -> bytes:
    """PEER_PRESENT or PEER_GONE (with ``reason``). Between the workers of one relay a
    PEER_PRESENT also says ``since`` when (monotonic ns) the node's hello was accepted,
    so that of two connections of one key on two workers the newer one wins."""
    if ftype != FrameType.PEER_PRESENT:
        return encode_frame(ftype, key_raw + bytes((reason,)))
    return encode_frame(ftype, key_raw + since.to_bytes(8, "big") if since else key_raw)


def split_key(body: bytes) -> tuple[bytes, bytes]:
    """``(raw key, rest)`` of a SEND/RECV body."""
    if len(body) < KEY_LEN:
        raise FrameError("body shorter than a key")
    return body[:KEY_LEN], body[KEY_LEN:]


def parse_forward(body: bytes) -> tuple[bytes, bytes, bytes]:
    if len(body) < 2 * KEY_LEN:
        raise FrameError("FORWARD shorter than two keys")
    return body[:KEY_LEN], body[KEY_LEN:2 * KEY_LEN], body[2 * KEY_LEN:]


def parse_peer(ftype: int, body: bytes) -> tuple[Key, int]:
    """``(key, reason)`` of PEER_GONE; ``(key, since)`` of PEER_PRESENT (0 unless a
    worker of the same relay said it)."""
    if ftype == FrameType.PEER_PRESENT and len(body) in (KEY_LEN, KEY_LEN + 8):
        return Key.from_raw(body[:KEY_LEN]), int.from_bytes(body[KEY_LEN:], "big")
    if ftype != FrameType.PEER_PRESENT and len(body) == KEY_LEN + 1:
        return Key.from_raw(body[:KEY_LEN]), body[KEY_LEN]
    raise FrameError("bad peer notice length")


_HEADER = struct.Struct(">BI")
_SEND, _RECV = int(FrameType.SEND), int(FrameType.RECV)
_SEND_MIN, _SEND_MAX = KEY_LEN, KEY_LEN + MAX_PACKET
#: a run of rewritten frames is cut at this size: it must fit one DELIVER frame, and a
#: write of a few runs is already a big write
RUN_BYTES = 32 * 1024


class SendRun:
    """Consecutive SEND frames of one sender to one destination, rewritten into the RECV
    frames the destination gets (a SEND and its RECV have the same length: only the type
    byte and the key differ), so the relay forwards the run with one write."""

    __slots__ = ("count", "dst", "frames", "payload")

    def __init__(self, dst: bytes, frames: bytes, count: int, payload: int) -> None:
        self.dst = dst
        self.frames = frames
        self.count = count  # frames in the run
        self.payload = payload  # packet bytes in them


class FrameDecoder:
    """Splits a byte stream into ``(type, body)`` frames.

    Rejects unknown types and oversize lengths as soon as the 5-byte header
    arrives, so a hostile peer can never make us buffer more than one
    maximal frame. After a :class:`FrameError` the stream is unusable.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def pending(self) -> bytes:
        """The bytes of a frame read in part (what a connection handed to another worker
        of the relay takes along)."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        off, end = 0, len(buf)
        while end - off >= HEADER_LEN:
            ftype = buf[off]
            n = int.from_bytes(buf[off + 1:off + 5], "big")
            if ftype not in _KNOWN_TYPES:
                raise FrameError(f"unknown frame type {ftype}")
            if n > self.max_frame:
                raise FrameError(f"frame of {n} bytes exceeds {self.max_frame}")
            stop = off + HEADER_LEN + n
            if stop > end:
                break
            out.append((ftype, bytes(buf[off + HEADER_LEN:stop])))
            off = stop
        if off:
            del buf[:off]
        return out

    def feed_relayed(self, data: bytes, src_raw: bytes) -> list[SendRun | tuple[int, bytes]]:
        """:meth:`feed` for a relay reading a node: valid SEND frames come out as
        :class:`SendRun` (already RECV frames from ``src_raw``), every other frame, a
        malformed SEND included, as ``(type, body)``, in stream order."""
        buf = self._buf
        buf += data
        out: list[SendRun | tuple[int, bytes]] = []
        runs: list[tuple[int, bytes, int, int, int]] = []  # (index in out, dst, start, stop, n)
        off, end = 0, len(buf)
        start, run_end, dst, count = -1, 0, b"", 0
        unpack, known, max_frame = _HEADER.unpack_from, _KNOWN_TYPES, self.max_frame
        send, recv, key_at, key_end = _SEND, _RECV, HEADER_LEN, HEADER_LEN + KEY_LEN
        while end - off >= HEADER_LEN:
            ftype, n = unpack(buf, off)
            if ftype not in known:
                raise FrameError(f"unknown frame type {ftype}")
            if n > max_frame:
                raise FrameError(f"frame of {n} bytes exceeds {max_frame}")
            stop = off + HEADER_LEN + n
            if stop > end:
                break
            if ftype == send and _SEND_MIN <= n <= _SEND_MAX:
                if stop > run_end or not buf.startswith(dst, off + key_at):
                    if start >= 0:
                        runs.append((len(out), dst, start, off, count))
                        out.append((0, b""))  # its place, filled below
                    start, run_end, count = off, off + RUN_BYTES, 0
                    dst = bytes(buf[off + key_at:off + key_end])
                buf[off] = recv
                buf[off + key_at:off + key_end] = src_raw
                count += 1
            else:
                if start >= 0:
                    runs.append((len(out), dst, start, off, count))
                    out.append((0, b""))
                    start, run_end = -1, 0
                out.append((ftype, bytes(buf[off + HEADER_LEN:stop])))
            off = stop
        if start >= 0:
            runs.append((len(out), dst, start, off, count))
            out.append((0, b""))
        with memoryview(buf) as view:  # one copy per run; released before buf shrinks
            for i, run_dst, a, b, k in runs:
                out[i] = SendRun(run_dst, bytes(view[a:b]), k, b - a - k * (HEADER_LEN + KEY_LEN))
        if off:
            del buf[:off]
        return out


# ---- handshake -------------------------------------------------------------------------
def frame_server_hello(server_key: Key, challenge: bytes) -> bytes:
    return encode_frame(FrameType.SERVER_HELLO, MAGIC + server_key.raw + challenge)


def parse_server_hello(body: bytes) -> tuple[Key, bytes]:
    """``(server key, challenge)``; a wrong magic means this is no wgmesh relay of our version."""
    if len(body) != len(MAGIC) + KEY_LEN + CHALLENGE_LEN or not hmac.compare_digest(
            body[:len(MAGIC)], MAGIC):
        raise FrameError("bad SERVER_HELLO (wrong magic or length: not a wgmesh relay "
                         f"speaking protocol version {PROTOCOL_VERSION})")
    return Key.from_raw(body[8:8 + KEY_LEN]), body[8 + KEY_LEN:]


def mesh_mac(mesh_key: bytes, role: str, server_key: Key, client_key: Key,
             challenge: bytes) -> bytes:
    """Proof that the sender holds the region's mesh key, for this one handshake only.

    Bound to both relay keys, the side (``"client"``/``"server"``) and the
    other side's fresh challenge, so it can be neither replayed nor reflected,
    and it reveals nothing about the mesh key itself.
    """
    msg = b"wgmesh relay mesh|" + role.encode() + b"|" + server_key.raw + client_key.raw
    return hmac.new(mesh_key, msg + challenge, hashlib.sha256).digest()


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or :class:`FrameError` for anything else (also absurd nesting)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError(f"{what} is not JSON") from e
    except RecursionError as e:  # "[[[[..." a few thousand deep
        raise FrameError(f"{what} is nested too deeply") from e
    if not isinstance(doc, dict):
        raise FrameError(f"{what} is not a JSON object")
    return doc


def _mesh_proof(info: dict[str, Any]) -> bytes | None:
    v = info.get("mesh_proof")
    try:
        return bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ClientHello:
    """An authenticated client: its node key, the info it sealed, the challenge it answered
    and its hello nonce (the server's SERVER_INFO must answer that)."""

    key: Key
    info: dict[str, Any]
    challenge: bytes
    nonce: bytes

    @property
    def wants_mesh(self) -> bool:
        """The client claims to be a relay of our region (check :meth:`proves_mesh_key`)."""
        return "mesh_proof" in self.info

    def proves_mesh_key(self, mesh_key: bytes, server_key: Key) -> bool:
        proof = _mesh_proof(self.info)
        return proof is not None and hmac.compare_digest(
            proof, mesh_mac(mesh_key, "client", server_key, self.key, self.challenge))


def _seal(private_key: PrivateKey, peer: Key, payload: bytes, nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise FrameError(f"nonce must be {NONCE_LEN} bytes")
    sealed = Box(private_key.nacl(), _NaclPublicKey(peer.raw)).encrypt(payload, nonce)
    return sealed.nonce + sealed.ciphertext


def _open(private_key: PrivateKey, peer_raw: bytes, sealed: bytes) -> bytes:
    box = Box(private_key.nacl(), _NaclPublicKey(peer_raw))
    return box.decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN])


def frame_client_hello(private_key: PrivateKey, server_key: Key, challenge: bytes,
                       info: dict[str, Any] | None = None, *, nonce: bytes,
                       mesh_key: bytes | None = None) -> bytes:
    """CLIENT_HELLO proving possession of ``private_key`` to this server, once.

    ``info`` (JSON) travels inside the box. With ``mesh_key`` (a relay dialling
    a mesh peer) it carries a :func:`mesh_mac` proof, never the key.
    ``nonce``: :data:`NONCE_LEN` random bytes, never reused with this key pair;
    the server's SERVER_INFO must echo it (see :func:`open_server_info`).
    """
    doc = {"v": PROTOCOL_VERSION, **(info or {})}
    if mesh_key is not None:
        doc["mesh_proof"] = mesh_mac(mesh_key, "client", server_key, private_key.public,
                                     challenge).hex()
    payload = challenge + json.dumps(doc).encode()
    return encode_frame(FrameType.CLIENT_HELLO,
                        MAGIC + private_key.public.raw + _seal(private_key, server_key,
                                                               payload, nonce))


def open_client_hello(server_key: PrivateKey, challenge: bytes, body: bytes) -> ClientHello:
    """Verify a CLIENT_HELLO against the challenge we sent; raises :class:`FrameError`."""
    head = len(MAGIC) + KEY_LEN + NONCE_LEN
    if len(body) < head + MAC_LEN or not hmac.compare_digest(body[:len(MAGIC)], MAGIC):
        raise FrameError("bad CLIENT_HELLO (wrong magic or length)")
    if len(body) > head + MAC_LEN + CHALLENGE_LEN + MAX_INFO:
        raise FrameError("CLIENT_HELLO too large")
    client_raw = body[8:8 + KEY_LEN]
    try:
        plain = _open(server_key, client_raw, body[8 + KEY_LEN:])
    except CryptoError as e:
        raise FrameError("CLIENT_HELLO does not open: not sealed by that key") from e
    if not hmac.compare_digest(plain[:CHALLENGE_LEN], challenge):
        raise FrameError("CLIENT_HELLO answers another challenge")
    info = _json_object(plain[CHALLENGE_LEN:], "CLIENT_HELLO info")
    return ClientHello(Key.from_raw(client_raw), info, challenge, body[8 + KEY_LEN:head])


def frame_server_info(server_key: PrivateKey, hello: ClientHello, info: dict[str, Any], *,
                      nonce: bytes, mesh_key: bytes | None = None) -> bytes:
    """SERVER_INFO sealed to the client around its hello nonce: the server's proof of its key.

    ``nonce``: fresh random bytes (never the client's: the box key is the same
    both ways). ``mesh_key``: answer a mesh peer with our own proof of it.
    """
    doc = dict(info)
    if mesh_key is not None:
        doc["mesh_proof"] = mesh_mac(mesh_key, "server", server_key.public, hello.key,
                                     hello.nonce).hex()
    return encode_frame(FrameType.SERVER_INFO, _seal(
        server_key, hello.key, hello.nonce + json.dumps(doc).encode(), nonce))


def open_server_info(private_key: PrivateKey, server_key: Key, hello_nonce: bytes,
                     body: bytes, *, mesh_key: bytes | None = None) -> dict[str, Any]:
    """The info of a SERVER_INFO that ``server_key`` sealed for our hello; else :class:`FrameError`.

    With ``mesh_key``, the server must also prove that it holds the mesh key.
    """
    try:
        plain = _open(private_key, server_key.raw, body)
    except (CryptoError, ValueError) as e:  # ValueError: shorter than a nonce
        raise FrameError(f"the relay did not prove the key {server_key} "
                         "(SERVER_INFO not sealed by it)") from e
    if not hmac.compare_digest(plain[:NONCE_LEN], hello_nonce):
        raise FrameError("SERVER_INFO answers another hello (replayed)")
    info = _json_object(plain[NONCE_LEN:], "SERVER_INFO")
    if mesh_key is not None:
        proof = _mesh_proof(info)
        want = mesh_mac(mesh_key, "server", server_key, private_key.public, hello_nonce)
        if proof is None or not hmac.compare_digest(proof, want):
            raise FrameError("the relay does not hold the region's mesh key")
    return info


# ---- URLs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayURL:
    """``http(s)://host[:port][/path][#KEY]``; the path defaults to ``/relay``.

    ``#KEY`` (the relay's public key, base64) pins the relay: a connection to
    it fails unless the relay proves that key. A relay map's nodes carry their
    key this way too.
    """

    tls: bool
    host: str
    port: int
    path: str = "/relay"
    key: Key | None = None

    @classmethod
    def parse(cls, url: str) -> RelayURL:
        try:
            u = urlsplit(url)
            host, port = u.hostname, u.port
        except ValueError as e:  # "http://[::1", "http://h:99999"
            raise WgmeshError(f"bad relay URL {url!r}: {e}") from e
        if u.scheme not in ("http", "https") or not host:
            raise WgmeshError(f"relay URL must be http(s)://host[:port], got {url!r}")
        tls = u.scheme == "https"
        try:
            key = Key(u.fragment) if u.fragment else None
        except WgmeshError as e:
            raise WgmeshError(f"relay URL {url!r}: the part after # must be the relay's "
                              f"public key: {e}") from e
        return cls(tls, host, port or (443 if tls else 80), u.path or "/relay", key)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{self.path}"

    def upgrade_request(self) -> bytes:
        return (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
                "Connection: Upgrade\r\n\r\n").encode()
