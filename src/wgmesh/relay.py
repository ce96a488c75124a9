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
SERVER_INFO     3      s->c  JSON: version, limits; the client is now authenticated
SEND            4      c->s  destination key (32), packet
RECV            5      s->c  source key (32), packet
KEEPALIVE       6      both  empty; proves the connection is alive
PING / PONG     7 / 8  both  8 opaque bytes echoed back (latency, liveness)
PEER_GONE       9      s->c  key (32), reason (1): see ``GONE_*``
PEER_PRESENT    10     s->c  key (32): that node is (again) connected here
NOTE_PREFERRED  11     c->s  1 byte: 1 = this is my home relay
FORWARD         12     mesh  source key (32), destination key (32), packet
CLOSE           13     s->c  UTF-8 reason, sent just before the server closes
==============  =====  ====  ==================================================

Authentication: the client seals the server's fresh challenge with NaCl box
under (its node key, the server's key). Only the holder of the node's private
key can produce a box that opens under the claimed public key, and the
challenge makes it unreplayable; the private key itself never leaves the node.
Relays of one region mesh: a relay connects to its peers as a client whose
sealed info carries the region's mesh key (compared in constant time); it
then watches presence (PEER_PRESENT/PEER_GONE of the peer's clients) and
sends FORWARD frames, which the receiver delivers to local clients only, so a
packet crosses at most one mesh hop.

This module is the sans-I/O part. The asyncio drivers, importable from here
too, live beside it: :class:`RelayServer` (``relay_server``), :class:`RelayClient`
and :class:`RelayClientThread` (``relay_client``), :class:`RelayConnection`
(``relay_conn``), over the shared transport in ``relay_stream``.
"""

from __future__ import annotations

import enum
import hmac
import json
import secrets
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
    "GONE_DISCONNECTED",
    "GONE_NOT_HERE",
    "HEADER_LEN",
    "MAGIC",
    "MAX_FRAME",
    "MAX_PACKET",
    "PROTOCOL_VERSION",
    "UPGRADE_TOKEN",
    "ClientHello",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "RelayURL",
    "encode_frame",
    "frame_client_hello",
    "frame_forward",
    "frame_peer",
    "frame_recv",
    "frame_send",
    "frame_server_hello",
    "open_client_hello",
    "parse_forward",
    "parse_peer",
    "parse_server_hello",
    "split_key",
]

MAGIC = b"WGMRLY\x00\x01"
PROTOCOL_VERSION = 1
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


def frame_peer(ftype: FrameType, key_raw: bytes, reason: int = GONE_DISCONNECTED) -> bytes:
    """PEER_PRESENT or PEER_GONE (with ``reason``)."""
    body = key_raw if ftype == FrameType.PEER_PRESENT else key_raw + bytes((reason,))
    return encode_frame(ftype, body)


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
    """``(key, reason)`` of PEER_GONE / PEER_PRESENT (reason is 0 for PRESENT)."""
    want = KEY_LEN if ftype == FrameType.PEER_PRESENT else KEY_LEN + 1
    if len(body) != want:
        raise FrameError("bad peer notice length")
    return Key.from_raw(body[:KEY_LEN]), (body[KEY_LEN] if want > KEY_LEN else 0)


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


# ---- handshake -------------------------------------------------------------------------
def frame_server_hello(server_key: Key, challenge: bytes) -> bytes:
    return encode_frame(FrameType.SERVER_HELLO, MAGIC + server_key.raw + challenge)


def parse_server_hello(body: bytes) -> tuple[Key, bytes]:
    """``(server key, challenge)``; a wrong magic means this is no wgmesh relay."""
    if len(body) != len(MAGIC) + KEY_LEN + CHALLENGE_LEN or not hmac.compare_digest(
            body[:len(MAGIC)], MAGIC):
        raise FrameError("bad SERVER_HELLO (wrong magic or length)")
    return Key.from_raw(body[8:8 + KEY_LEN]), body[8 + KEY_LEN:]


@dataclass(frozen=True)
class ClientHello:
    """An authenticated client: its node key and the info it sealed."""

    key: Key
    info: dict[str, Any]

    @property
    def mesh_key(self) -> bytes | None:
        v = self.info.get("mesh_key")
        try:
            return bytes.fromhex(v) if isinstance(v, str) else None
        except ValueError:
            return None


def frame_client_hello(private_key: PrivateKey, server_key: Key, challenge: bytes,
                       info: dict[str, Any] | None = None) -> bytes:
    """CLIENT_HELLO proving possession of ``private_key`` to this server, once.

    ``info`` (JSON) travels inside the box, so a mesh key in it is never
    exposed even on a plaintext connection.
    """
    payload = challenge + json.dumps({"v": PROTOCOL_VERSION, **(info or {})}).encode()
    nonce = secrets.token_bytes(NONCE_LEN)
    sealed = Box(private_key.nacl(), _NaclPublicKey(server_key.raw)).encrypt(payload, nonce)
    return encode_frame(FrameType.CLIENT_HELLO,
                        MAGIC + private_key.public.raw + sealed.nonce + sealed.ciphertext)


def open_client_hello(server_key: PrivateKey, challenge: bytes, body: bytes) -> ClientHello:
    """Verify a CLIENT_HELLO against the challenge we sent; raises :class:`FrameError`."""
    head = len(MAGIC) + KEY_LEN + NONCE_LEN
    if len(body) < head + MAC_LEN or not hmac.compare_digest(body[:len(MAGIC)], MAGIC):
        raise FrameError("bad CLIENT_HELLO (wrong magic or length)")
    if len(body) > head + MAC_LEN + CHALLENGE_LEN + MAX_INFO:
        raise FrameError("CLIENT_HELLO too large")
    client_raw = body[8:8 + KEY_LEN]
    nonce = body[8 + KEY_LEN:head]
    try:
        plain = Box(server_key.nacl(), _NaclPublicKey(client_raw)).decrypt(body[head:], nonce)
    except CryptoError as e:
        raise FrameError("CLIENT_HELLO does not open: not sealed by that key") from e
    if not hmac.compare_digest(plain[:CHALLENGE_LEN], challenge):
        raise FrameError("CLIENT_HELLO answers another challenge")
    try:
        info = json.loads(plain[CHALLENGE_LEN:])
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError("CLIENT_HELLO info is not JSON") from e
    if not isinstance(info, dict):
        raise FrameError("CLIENT_HELLO info is not an object")
    return ClientHello(Key.from_raw(client_raw), info)


# ---- URLs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayURL:
    """``http(s)://host[:port][/path]``; the path defaults to ``/relay``."""

    tls: bool
    host: str
    port: int
    path: str = "/relay"

    @classmethod
    def parse(cls, url: str) -> RelayURL:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise WgmeshError(f"relay URL must be http(s)://host[:port], got {url!r}")
        tls = u.scheme == "https"
        try:
            port = u.port or (443 if tls else 80)
        except ValueError as e:
            raise WgmeshError(f"bad port in relay URL {url!r}") from e
        return cls(tls, u.hostname, port, u.path or "/relay")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{self.path}"

    def upgrade_request(self) -> bytes:
        return (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
                "Connection: Upgrade\r\n\r\n").encode()
