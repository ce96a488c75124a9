"""The audit trail's chain: each entry commits to its content and its predecessor, under a key.

``hash = HMAC-SHA256(key, prev_hash || canonical(seq, ts, actor, action, target) || detail)``,
where ``detail`` is the exact JSON text stored, so verification never depends on
re-serialising. The key lives outside the database (``audit.key`` in the
control state directory, mode 0600): someone who can rewrite the database can
no longer rewrite history and recompute the chain. Editing, reordering or
deleting an entry breaks every later link; :func:`verify` names the first
broken one. (Cutting entries off the *end* leaves a valid shorter chain:
compare ``head`` with a copy kept elsewhere.)

Databases from before the key are upgraded in place: their entries stay plain
SHA-256 links (``keyed`` false) and the keyed chain starts at the upgrade
point, whose first entry commits to the last unkeyed hash, so the old part is
covered too. The keyed chain must begin with its ``audit.keyed`` entry and,
once keyed, every later entry must be keyed: an attacker can neither
downgrade the tail to plain hashes nor rewrite plain entries in front of
entries the server keyed afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["GENESIS", "KEYED_ACTION", "AuditEntry", "VerifyResult", "entry_hash", "key_id",
           "verify"]

GENESIS = "0" * 64
#: The entry that starts the keyed chain (the first ever, or the upgrade point).
KEYED_ACTION = "audit.keyed"


@attrs.frozen
class AuditEntry:
    seq: int
    ts: float
    actor: str
    action: str
    target: str
    detail: str
    prev_hash: str
    hash: str
    keyed: bool = attrs.field(default=False, converter=bool)

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["detail"] = json.loads(self.detail)
        return d


def entry_hash(prev_hash: str, seq: int, ts: float, actor: str, action: str, target: str,
               detail: str, key: bytes | None = None) -> str:
    """The entry's link: an HMAC under ``key``, or (entries before the upgrade) plain SHA-256."""
    head = json.dumps([seq, ts, actor, action, target], separators=(",", ":"))
    msg = f"{prev_hash}\n{head}\n{detail}".encode()
    if key is None:
        return hashlib.sha256(msg).hexdigest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A public fingerprint of the audit key: replicas check they share one."""
    return hmac.new(key, b"wgmesh audit key id", hashlib.sha256).hexdigest()[:16]


@attrs.frozen
class VerifyResult:
    ok: bool
    entries: int
    head: str
    first_bad_seq: int | None = None
    reason: str = ""
    keyed_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def verify(entries: Iterable[AuditEntry], key: bytes | None = None) -> VerifyResult:
    """Walk the chain in ``seq`` order; stop at the first entry that does not link.

    Without ``key`` only an unkeyed chain can be verified; with it, the chain
    must carry keyed entries (a keyed database always has one from the start).
    """
    prev, last_seq, n, keyed_from = GENESIS, 0, 0, None

    def bad(e: AuditEntry, reason: str) -> VerifyResult:
        return VerifyResult(False, n, prev, e.seq, reason, keyed_from)

    for e in entries:
        if e.seq <= last_seq:
            return bad(e, "sequence not increasing")
        if e.prev_hash != prev:
            return bad(e, "previous-hash link broken")
        if e.keyed and key is None:
            return bad(e, "keyed entry: verifying it needs the audit key")
        if not e.keyed and keyed_from is not None:
            return bad(e, "unkeyed entry after the keyed chain began")
        want = entry_hash(e.prev_hash, e.seq, e.ts, e.actor, e.action, e.target, e.detail,
                          key if e.keyed else None)
        if not hmac.compare_digest(want, e.hash):
            return bad(e, "entry content does not match its hash")
        if e.keyed and keyed_from is None:
            if e.action != KEYED_ACTION:  # plain entries made up before a real keyed tail
                return bad(e, f"the keyed chain does not begin with {KEYED_ACTION}")
            keyed_from = e.seq
        prev, last_seq, n = e.hash, e.seq, n + 1
    if key is not None and keyed_from is None:
        return VerifyResult(False, n, prev, None,
                            "no keyed entries although this database has an audit key "
                            "(history rewritten?)")
    return VerifyResult(True, n, prev, keyed_from=keyed_from)
