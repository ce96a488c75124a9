"""Bearer secrets: ``<kind>_<id>_<secret>``; only a hash of the secret is stored.

The id is public and indexes the row, so looking a credential up leaks no
timing about the secret; the secret (32 random bytes) is then compared with
:func:`hmac.compare_digest` against its SHA-256. A slow password hash buys
nothing for 256-bit random secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = ["API_KEY", "AUTH_KEY", "NODE_TOKEN", "hash_secret", "matches", "mint", "parse"]

AUTH_KEY, API_KEY, NODE_TOKEN = "wgk", "wga", "wgn"
_RE = re.compile(r"^(wgk|wga|wgn)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(kind: str) -> tuple[str, str, str]:
    """A new credential: ``(id, full token, stored hash)``."""
    cid = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return cid, f"{kind}_{cid}_{secret}", hash_secret(secret)


def parse(token: str, kind: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token of ``kind``, else ``None``."""
    m = _RE.match(token) if isinstance(token, str) else None
    if m is None or m.group(1) != kind:
        return None
    return m.group(2), m.group(3)


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
