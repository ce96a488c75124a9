"""X25519 keys in WireGuard's base64 form, and 0600 key files.

Private keys are created on the node and never leave it: their ``repr`` and
``str`` are redacted so they cannot slip into logs or exceptions.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from pathlib import Path

from nacl.public import PrivateKey as _NaclPrivateKey

from wgmesh.errors import WgmeshError

__all__ = ["Key", "KeyFormatError", "PrivateKey", "load_or_create_private_key"]

KEY_LEN = 32


class KeyFormatError(WgmeshError, ValueError):
    """A key string or file is malformed."""


def _decode(text: str | bytes) -> bytes:
    if isinstance(text, bytes) and len(text) == KEY_LEN:
        return bytes(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise KeyFormatError("key is not valid base64") from e
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"key must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


class Key:
    """A public X25519 key (WireGuard node key or disco key). Hashable, comparable."""

    __slots__ = ("raw",)

    def __init__(self, value: str | bytes) -> None:
        self.raw: bytes = _decode(value)

    @classmethod
    def from_raw(cls, raw: bytes) -> Key:
        if len(raw) != KEY_LEN:
            raise KeyFormatError(f"key must be {KEY_LEN} bytes, got {len(raw)}")
        k = cls.__new__(cls)
        k.raw = bytes(raw)
        return k

    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def short(self) -> str:
        """A short, log-safe tag like Tailscale's ``[abcde]``."""
        return self.b64()[:8]

    def __str__(self) -> str:
        return self.b64()

    def __repr__(self) -> str:
        return f"Key({self.b64()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __bytes__(self) -> bytes:
        return self.raw


class PrivateKey:
    """A private X25519 key. Its text never appears in ``repr``/``str``."""

    __slots__ = ("_raw",)

    def __init__(self, value: str | bytes) -> None:
        self._raw = _decode(value)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(bytes(_NaclPrivateKey.generate()))

    @property
    def public(self) -> Key:
        return Key.from_raw(bytes(_NaclPrivateKey(self._raw).public_key))

    def raw(self) -> bytes:
        """The secret bytes. Call sites are deliberate and few."""
        return self._raw

    def b64(self) -> str:
        """The secret in WireGuard's base64 form, for netlink/UAPI only."""
        return base64.b64encode(self._raw).decode()

    def nacl(self) -> _NaclPrivateKey:
        return _NaclPrivateKey(self._raw)

    def __repr__(self) -> str:
        return f"PrivateKey(<redacted>, public={self.public.short()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.public)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with mode 0600 (the file never exists with wider rights)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (self.b64() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivateKey:
        p = Path(path)
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFormatError(f"{p}: private key file must be 0600, is {mode:04o}")
        return cls(p.read_text().strip())


def load_or_create_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """The node's key lives in ``path``; make one on first use."""
    p = Path(path)
    if p.exists():
        return PrivateKey.load(p)
    key = PrivateKey.generate()
    key.save(p)
    return key
