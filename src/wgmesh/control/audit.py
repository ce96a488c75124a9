"""The audit trail's hash chain: each entry commits to its content and its predecessor.

``hash = sha256(prev_hash || canonical(seq, ts, actor, action, target) || detail)``,
where ``detail`` is the exact JSON text stored, so verification never depends on
re-serialising. Editing, reordering or deleting an entry breaks every later
link; :func:`verify` names the first broken one. (Cutting entries off the *end*
leaves a valid shorter chain: compare ``head`` with a copy kept elsewhere.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["GENESIS", "AuditEntry", "VerifyResult", "entry_hash", "verify"]

GENESIS = "0" * 64


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

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["detail"] = json.loads(self.detail)
        return d


def entry_hash(prev_hash: str, seq: int, ts: float, actor: str, action: str, target: str,
               detail: str) -> str:
    head = json.dumps([seq, ts, actor, action, target], separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{head}\n{detail}".encode()).hexdigest()


@attrs.frozen
class VerifyResult:
    ok: bool
    entries: int
    head: str
    first_bad_seq: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def verify(entries: Iterable[AuditEntry]) -> VerifyResult:
    """Walk the chain in ``seq`` order; stop at the first entry that does not link."""
    prev, last_seq, n = GENESIS, 0, 0
    for e in entries:
        if e.seq <= last_seq:
            return VerifyResult(False, n, prev, e.seq, "sequence not increasing")
        if e.prev_hash != prev:
            return VerifyResult(False, n, prev, e.seq, "previous-hash link broken")
        if entry_hash(e.prev_hash, e.seq, e.ts, e.actor, e.action, e.target, e.detail) != e.hash:
            return VerifyResult(False, n, prev, e.seq, "entry content does not match its hash")
        prev, last_seq, n = e.hash, e.seq, n + 1
    return VerifyResult(True, n, prev)
