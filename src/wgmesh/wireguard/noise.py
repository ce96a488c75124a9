"""The Noise_IKpsk2 handshake and the cookie (MAC1/MAC2) layer, sans-I/O.

Functions here take and return bytes; which peer a message belongs to, replay
and flood checks, and what to send next are the device's decisions
(:mod:`wgmesh.wireguard.device`). Message layouts are the whitepaper's section 5.4.
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct
from collections.abc import Callable

import attrs

from wgmesh.wireguard import crypto as c

__all__ = [
    "COOKIE_LEN",
    "INITIATION_LEN",
    "MSG_COOKIE",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "MSG_TRANSPORT",
    "RESPONSE_LEN",
    "TRANSPORT_MIN_LEN",
    "CookieChecker",
    "CookieGenerator",
    "Handshake",
    "InitiationResult",
    "LocalIdentity",
    "consume_initiation",
    "message_type",
]

MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE, MSG_TRANSPORT = 1, 2, 3, 4
INITIATION_LEN, RESPONSE_LEN, COOKIE_LEN = 148, 92, 64
TRANSPORT_HEADER_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + c.TAG_LEN  # a keepalive
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
ZERO32 = bytes(32)
_CI = c.hash_(c.CONSTRUCTION)
_HI = c.hash_(_CI, c.IDENTIFIER)
_EXACT_LEN = {MSG_INITIATION: INITIATION_LEN, MSG_RESPONSE: RESPONSE_LEN, MSG_COOKIE: COOKIE_LEN}


def message_type(data: bytes | bytearray | memoryview) -> int:
    """1..4 when ``data`` is shaped like a WireGuard message, else 0 (STUN, disco, noise)."""
    n = len(data)
    if n < 4 or data[1] or data[2] or data[3]:
        return 0
    t = data[0]
    if t == MSG_TRANSPORT:
        return t if n >= TRANSPORT_MIN_LEN else 0
    return t if _EXACT_LEN.get(t) == n else 0


class LocalIdentity:
    """Our static key pair and what every handshake derives from it."""

    __slots__ = ("cookie_key", "initial_hash", "mac1_key", "private", "public")

    def __init__(self, private: bytes) -> None:
        self.private = private
        self.public = c.dh_public(private)
        self.initial_hash = c.hash_(_HI, self.public)  # H for a handshake addressed to us
        self.mac1_key = c.hash_(LABEL_MAC1, self.public)
        self.cookie_key = c.hash_(LABEL_COOKIE, self.public)


@attrs.define
class Handshake:
    """One peer's handshake state (whitepaper 5.4.2-5.4.3). Secrets never printed."""

    local: LocalIdentity = attrs.field(repr=False)
    remote_static: bytes = attrs.field(repr=False)
    preshared_key: bytes = attrs.field(default=ZERO32, repr=False)
    state: str = "none"  # none | initiation_sent | initiation_consumed
    local_index: int = 0
    remote_index: int = 0
    chaining_key: bytes = attrs.field(default=b"", repr=False)
    hash: bytes = attrs.field(default=b"", repr=False)
    ephemeral_private: bytes = attrs.field(default=b"", repr=False)
    remote_ephemeral: bytes = attrs.field(default=b"", repr=False)
    latest_timestamp: bytes = attrs.field(default=bytes(12), repr=False)
    last_initiation_consumed: float = float("-inf")
    static_static: bytes = attrs.field(default=b"", repr=False)

    def __attrs_post_init__(self) -> None:
        self.static_static = c.dh(self.local.private, self.remote_static)

    def clear(self) -> None:
        self.state = "none"
        self.chaining_key = self.hash = self.ephemeral_private = self.remote_ephemeral = b""

    # ---- initiator -------------------------------------------------------------------
    def create_initiation(self, local_index: int, timestamp: bytes) -> bytearray:
        """Message 1 with zeroed MACs (the :class:`CookieGenerator` fills them)."""
        ck = _CI
        h = c.hash_(_HI, self.remote_static)
        e_priv = c.dh_generate()
        e_pub = c.dh_public(e_priv)
        (ck,) = c.kdf(ck, e_pub, 1)
        h = c.hash_(h, e_pub)
        ck, k = c.kdf(ck, c.dh(e_priv, self.remote_static), 2)
        enc_static = c.aead_encrypt(k, 0, self.local.public, h)
        h = c.hash_(h, enc_static)
        ck, k = c.kdf(ck, self.static_static, 2)
        enc_ts = c.aead_encrypt(k, 0, timestamp, h)
        h = c.hash_(h, enc_ts)
        msg = bytearray(INITIATION_LEN)
        struct.pack_into("<BxxxI", msg, 0, MSG_INITIATION, local_index)
        msg[8:40] = e_pub
        msg[40:88] = enc_static
        msg[88:116] = enc_ts
        self.state, self.local_index = "initiation_sent", local_index
        self.chaining_key, self.hash, self.ephemeral_private = ck, h, e_priv
        return msg

    def consume_response(self, msg: bytes) -> tuple[bytes, bytes] | None:
        """Message 2 -> (send key, receive key), or None if it is not for this handshake."""
        if self.state != "initiation_sent":
            return None
        sender, receiver = struct.unpack_from("<II", msg, 4)
        if receiver != self.local_index:
            return None
        e_r = bytes(msg[12:44])
        try:
            (ck,) = c.kdf(self.chaining_key, e_r, 1)
            h = c.hash_(self.hash, e_r)
            (ck,) = c.kdf(ck, c.dh(self.ephemeral_private, e_r), 1)
            (ck,) = c.kdf(ck, c.dh(self.local.private, e_r), 1)
            ck, t, k = c.kdf(ck, self.preshared_key, 3)
            h = c.hash_(h, t)
            c.aead_decrypt(k, 0, bytes(msg[44:60]), h)
        except (ValueError, c.InvalidTag):
            return None
        self.remote_index = sender
        send, recv = c.kdf(ck, b"", 2)
        self.clear()
        return send, recv

    # ---- responder -------------------------------------------------------------------
    def accept_initiation(self, r: InitiationResult) -> None:
        self.state = "initiation_consumed"
        self.remote_index = r.sender_index
        self.chaining_key, self.hash, self.remote_ephemeral = r.chaining_key, r.hash, r.ephemeral
        self.latest_timestamp = r.timestamp

    def create_response(self, local_index: int) -> tuple[bytearray, bytes, bytes] | None:
        """Message 2 with zeroed MACs, and (send key, receive key)."""
        if self.state != "initiation_consumed":
            return None
        e_priv = c.dh_generate()
        e_pub = c.dh_public(e_priv)
        try:
            (ck,) = c.kdf(self.chaining_key, e_pub, 1)
            h = c.hash_(self.hash, e_pub)
            (ck,) = c.kdf(ck, c.dh(e_priv, self.remote_ephemeral), 1)
            (ck,) = c.kdf(ck, c.dh(e_priv, self.remote_static), 1)
        except ValueError:
            self.clear()
            return None
        ck, t, k = c.kdf(ck, self.preshared_key, 3)
        h = c.hash_(h, t)
        empty = c.aead_encrypt(k, 0, b"", h)
        msg = bytearray(RESPONSE_LEN)
        struct.pack_into("<BxxxII", msg, 0, MSG_RESPONSE, local_index, self.remote_index)
        msg[12:44] = e_pub
        msg[44:60] = empty
        recv, send = c.kdf(ck, b"", 2)
        self.local_index = local_index
        self.clear()
        return msg, send, recv


@attrs.frozen
class InitiationResult:
    """A decrypted message 1: who sent it, and the state to answer it with."""

    remote_static: bytes
    sender_index: int
    timestamp: bytes
    chaining_key: bytes = attrs.field(repr=False)
    hash: bytes = attrs.field(repr=False)
    ephemeral: bytes = attrs.field(repr=False)


def consume_initiation(local: LocalIdentity, msg: bytes,
                       static_static: Callable[[bytes], bytes | None] | None = None,
                       ) -> InitiationResult | None:
    """Decrypt message 1 addressed to ``local``; None if it is not authentic.

    ``static_static(their_static)`` returns the cached DH(our static, their static)
    of a known peer, saving one X25519 per handshake; unknown senders fall back to
    computing it.
    """
    (sender,) = struct.unpack_from("<I", msg, 4)
    e_i = bytes(msg[8:40])
    try:
        (ck,) = c.kdf(_CI, e_i, 1)
        h = c.hash_(local.initial_hash, e_i)
        ck, k = c.kdf(ck, c.dh(local.private, e_i), 2)
        enc_static = bytes(msg[40:88])
        s_i = c.aead_decrypt(k, 0, enc_static, h)
        h = c.hash_(h, enc_static)
        ss = (static_static(s_i) if static_static else None) or c.dh(local.private, s_i)
        ck, k = c.kdf(ck, ss, 2)
        enc_ts = bytes(msg[88:116])
        ts = c.aead_decrypt(k, 0, enc_ts, h)
        h = c.hash_(h, enc_ts)
    except (ValueError, c.InvalidTag):
        return None
    return InitiationResult(s_i, sender, ts, ck, h, e_i)


# ---- cookies (whitepaper 5.4.4, 5.4.7) -------------------------------------------------
def _mac_offsets(msg: bytes | bytearray) -> tuple[int, int]:
    n = len(msg)
    return n - 32, n - 16  # mac1 at n-32, mac2 at n-16


class CookieChecker:
    """The responder side: verifies MAC1/MAC2 and answers with cookie replies under load."""

    def __init__(self, local: LocalIdentity, max_age: float) -> None:
        self.local = local
        self.max_age = max_age
        self._secret = b""
        self._secret_born = float("-inf")

    def mac1_ok(self, msg: bytes) -> bool:
        m1, m2 = _mac_offsets(msg)
        return _hmac.compare_digest(c.mac(self.local.mac1_key, bytes(msg[:m1])), bytes(msg[m1:m2]))

    def _cookie(self, source: bytes, now: float) -> bytes:
        if now - self._secret_born > self.max_age:
            self._secret, self._secret_born = os.urandom(32), now
        return c.mac(self._secret, source)

    def mac2_ok(self, msg: bytes, source: bytes, now: float) -> bool:
        _, m2 = _mac_offsets(msg)
        return _hmac.compare_digest(c.mac(self._cookie(source, now), bytes(msg[:m2])),
                                    bytes(msg[m2:]))

    def make_reply(self, msg: bytes, source: bytes, now: float) -> bytes:
        """Message 3 for ``msg`` (an initiation or response) from ``source``."""
        m1, m2 = _mac_offsets(msg)
        (sender,) = struct.unpack_from("<I", msg, 4)
        nonce = os.urandom(24)
        enc = c.xaead_encrypt(self.local.cookie_key, nonce, self._cookie(source, now),
                              bytes(msg[m1:m2]))
        return struct.pack("<BxxxI", MSG_COOKIE, sender) + nonce + enc


class CookieGenerator:
    """The sender side for one peer: adds MAC1, and MAC2 while it holds a fresh cookie."""

    def __init__(self, remote_static: bytes, cookie_lifetime: float) -> None:
        self.mac1_key = c.hash_(LABEL_MAC1, remote_static)
        self.cookie_key = c.hash_(LABEL_COOKIE, remote_static)
        self.lifetime = cookie_lifetime
        self.cookie = b""
        self.cookie_born = float("-inf")
        self.last_mac1 = b""

    def add_macs(self, msg: bytearray, now: float) -> bytes:
        m1, m2 = _mac_offsets(msg)
        self.last_mac1 = c.mac(self.mac1_key, bytes(msg[:m1]))
        msg[m1:m2] = self.last_mac1
        if self.cookie and now - self.cookie_born < self.lifetime:
            msg[m2:] = c.mac(self.cookie, bytes(msg[:m2]))
        return bytes(msg)

    def consume_reply(self, msg: bytes, now: float) -> bool:
        """Store the cookie in message 3 if it answers our last MAC1."""
        if not self.last_mac1:
            return False
        try:
            cookie = c.xaead_decrypt(self.cookie_key, bytes(msg[8:32]), bytes(msg[32:64]),
                                     self.last_mac1)
        except c.InvalidTag:
            return False
        self.cookie, self.cookie_born = cookie, now
        self.last_mac1 = b""  # one reply per MAC1, as the kernel does
        return True
