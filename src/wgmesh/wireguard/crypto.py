"""WireGuard's primitives, exactly as the whitepaper (section 5.4) names them.

BLAKE2s comes from hashlib, X25519 and XChaCha20-Poly1305 from libsodium
(pynacl), and ChaCha20-Poly1305 from pyca/cryptography, whose binding is several
times faster per packet than pynacl's and offers ``encrypt_into``/``decrypt_into``
so the transport path can run without per-packet allocations.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _sodium

__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "dh_generate",
    "dh_public",
    "hash_",
    "hmac",
    "kdf",
    "mac",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
TAG_LEN = 16
_TAI64_BASE = 0x400000000000000A  # 2^62 + 10 leap seconds, as wireguard-go/kernel write it


def hash_(*parts: bytes) -> bytes:
    """HASH(input): BLAKE2s-256 of the concatenation."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input): keyed BLAKE2s with a 16-byte output."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input): RFC 2104 HMAC over BLAKE2s-256 (not keyed BLAKE2s)."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, input): HKDF-style expansion to ``n`` 32-byte values."""
    t0 = hmac(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(t0, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def dh_generate() -> bytes:
    """A fresh clamped X25519 private key."""
    k = bytearray(os.urandom(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def dh_public(private: bytes) -> bytes:
    return _sodium.crypto_scalarmult_base(private)


def dh(private: bytes, public: bytes) -> bytes:
    """DH(private, public). Raises ValueError for a low-order public key (all-zero result)."""
    try:
        return _sodium.crypto_scalarmult(private, public)
    except Exception as e:  # libsodium refuses all-zero shared secrets
        raise ValueError("X25519 produced the all-zero shared secret") from e


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, counter, plain, ad): ChaCha20-Poly1305 with a 64-bit little-endian counter."""
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises InvalidTag when the ciphertext is not authentic."""
    return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, ad)


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 with a 24-byte random nonce (cookie replies)."""
    return _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises InvalidTag when the ciphertext is not authentic."""
    try:
        return _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except Exception as e:
        raise InvalidTag() from e


def tai64n(now: float | None = None) -> bytes:
    """TAI64N(): 12 bytes, big-endian seconds then nanoseconds; strictly growing per peer."""
    t = time.time_ns() if now is None else int(now * 1e9)
    return struct.pack(">QI", _TAI64_BASE + t // 1_000_000_000, t % 1_000_000_000)
