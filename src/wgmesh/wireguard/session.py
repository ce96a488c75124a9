"""Transport keypairs: 64-bit counters, the kernel's 8128-bit replay window, padding.

A :class:`Keypair` is the result of one handshake. Encryption writes into a
caller's buffer (``encrypt_into``) so the hot path allocates nothing per packet.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgmesh.wireguard.crypto import TAG_LEN, InvalidTag
from wgmesh.wireguard.noise import MSG_TRANSPORT, TRANSPORT_HEADER_LEN
from wgmesh.wireguard.timers import COUNTER_BITS_TOTAL, REJECT_AFTER_MESSAGES

__all__ = ["Keypair", "ReplayWindow", "padded_len"]

_WORDS = COUNTER_BITS_TOTAL // 64
_HDR = struct.Struct("<II Q")  # type+reserved, receiver index, counter
_NONCE = struct.Struct("<4xQ")
_COUNTER = struct.Struct("<Q")
_TYPE_WORD = MSG_TRANSPORT  # type 4, reserved zero, as one little-endian u32


def padded_len(n: int, mtu: int) -> int:
    """Plaintext length padded to 16, never past the MTU (whitepaper 5.4.6)."""
    p = (n + 15) & ~15
    return n if n > mtu else min(p, mtu)


class ReplayWindow:
    """The kernel's ``counter_validate``: a ring of 64-bit words, 8128 usable bits."""

    __slots__ = ("_bits", "greatest")

    def __init__(self) -> None:
        self.greatest = 0  # highest counter seen, plus one
        self._bits = [0] * _WORDS

    def check_and_set(self, counter: int) -> bool:
        """True (and remembered) the first time an acceptable counter is seen."""
        if self.greatest >= REJECT_AFTER_MESSAGES + 1 or counter >= REJECT_AFTER_MESSAGES:
            return False
        counter += 1
        if counter + COUNTER_BITS_TOTAL - 64 < self.greatest:
            return False
        index = counter >> 6
        bits = self._bits
        if counter > self.greatest:
            cur = self.greatest >> 6
            top = min(index - cur, _WORDS)
            for i in range(1, top + 1):
                bits[(i + cur) & (_WORDS - 1)] = 0
            self.greatest = counter
        index &= _WORDS - 1
        bit = 1 << (counter & 63)
        if bits[index] & bit:
            return False
        bits[index] |= bit
        return True


class Keypair:
    """Send and receive keys from one handshake, with their indices and age."""

    __slots__ = ("_recv", "_send", "birth", "initiator", "local_index", "remote_index",
                 "replay", "send_counter")

    def __init__(self, send_key: bytes, recv_key: bytes, *, initiator: bool, local_index: int,
                 remote_index: int, birth: float) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.birth = birth
        self.send_counter = 0
        self.replay = ReplayWindow()

    def __repr__(self) -> str:
        return (f"<Keypair local={self.local_index:#x} remote={self.remote_index:#x} "
                f"initiator={self.initiator} sent={self.send_counter}>")

    def encrypt_into(self, out: bytearray | memoryview, plaintext: bytes | memoryview) -> int:
        """Write a transport message for ``plaintext`` (already padded) into ``out``.

        Returns its length. The caller checks the key is still fresh enough to use.
        """
        n = self.send_counter
        self.send_counter = n + 1
        _HDR.pack_into(out, 0, _TYPE_WORD, self.remote_index, n)
        end = TRANSPORT_HEADER_LEN + len(plaintext) + TAG_LEN
        self._send.encrypt_into(_NONCE.pack(n), plaintext, None,
                                memoryview(out)[TRANSPORT_HEADER_LEN:end])
        return end

    def encrypt(self, plaintext: bytes) -> bytes:
        out = bytearray(TRANSPORT_HEADER_LEN + len(plaintext) + TAG_LEN)
        self.encrypt_into(out, plaintext)
        return bytes(out)

    def decrypt_into(self, msg: memoryview, out: memoryview) -> int:
        """Write the plaintext of a transport message into ``out``; its length, or -1 when
        the message is forged or replayed (``out`` may then hold garbage)."""
        (counter,) = _COUNTER.unpack_from(msg, 8)
        if counter >= REJECT_AFTER_MESSAGES:
            return -1
        n = len(msg) - TRANSPORT_HEADER_LEN - TAG_LEN
        try:
            self._recv.decrypt_into(_NONCE.pack(counter), msg[TRANSPORT_HEADER_LEN:], None,
                                    out[:n])
        except InvalidTag:
            return -1
        if not self.replay.check_and_set(counter):
            return -1
        return n

    def decrypt(self, msg: bytes | memoryview) -> bytes | None:
        """The plaintext of a transport message, or None (forged, or replayed)."""
        out = bytearray(max(0, len(msg) - TRANSPORT_HEADER_LEN - TAG_LEN))
        n = self.decrypt_into(memoryview(msg), memoryview(out))
        return None if n < 0 else bytes(out)
