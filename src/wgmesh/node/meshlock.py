"""The node's side of mesh lock: which peers it may configure, by a chain it verified.

The node keeps the updates it verified in ``lock.json`` in its state dir and extends
them only with updates that verify on top (:func:`wgmesh.lock.apply`), so a control
service that forges, cuts short or rewrites the chain changes nothing here: the node
keeps its last good state and reports the rejection. The netmap's ``lock_head`` is only
a hint that there is news to fetch.

Fail closed: once the node has seen a locked mesh (a lock head in a netmap, or a
verified chain on disk) it configures only peers whose node keys are signed, and none
while it has no verified chain yet. A verified lock never turns off again.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any

from wgmesh import lock
from wgmesh.keys import Key
from wgmesh.node.state import StateDir

__all__ = ["NodeLock"]

FILE = "lock.json"


class NodeLock:
    """Verified lock state, persisted; ``fetch(since_hex)`` asks control for updates."""

    def __init__(self, state: StateDir) -> None:
        self.store = state
        self.chain: list[lock.Update] = []
        self.state: lock.LockState | None = None
        #: A head control advertised whose chain failed to verify: not fetched again.
        self.rejected_head = ""
        self.rejected = ""
        self.seen_locked = False
        saved = state.load_secret(FILE)
        if saved is not None:
            self.chain = [lock.decode_update(base64.b64decode(u))
                          for u in json.loads(saved)["updates"]]
            self.state = lock.verify(self.chain)
            self.seen_locked = True

    @property
    def head(self) -> str:
        return self.state.head.hex() if self.state else ""

    def allows(self, node_key: Key) -> bool:
        """May this peer go into WireGuard? Anyone in an unlocked mesh; else signed only."""
        if self.state is None:
            return not self.seen_locked
        return self.state.allows(node_key)

    def label(self, node_key: Key) -> str | None:
        """For status: None (not locked), "signed", "needs signature" or "revoked"."""
        if not self.seen_locked:
            return None
        return self.state.label(node_key) if self.state else "needs signature"

    def needs_sync(self, advertised: str) -> bool:
        """Is ``advertised`` (a netmap's ``lock_head``) news worth fetching?"""
        if advertised:
            self.seen_locked = True
        return bool(advertised) and advertised not in (self.head, self.rejected_head)

    def sync(self, advertised: str, fetch: Callable[[str], dict[str, Any]]) -> bool:
        """Fetch and verify the updates up to ``advertised``; whether the state changed.

        Raises :class:`~wgmesh.lock.LockError` after keeping every update that verified
        (the state stays at the last good head).
        """
        reply = fetch(self.head)
        try:
            updates = [lock.decode_update(base64.b64decode(u, validate=True))
                       for u in reply.get("updates", [])]
        except (binascii.Error, ValueError, TypeError) as e:
            self.rejected_head = advertised
            raise lock.MalformedUpdate(f"control sent an unreadable lock update: {e}") from None
        before = self.head
        try:
            self._extend(updates)
        except lock.LockError as e:
            self.rejected_head, self.rejected = advertised, str(e)
            raise
        finally:
            if self.head != before:
                self._save()
        return self.head != before

    def _extend(self, updates: Sequence[lock.Update]) -> None:
        if not updates:
            return
        if self.state is None or updates[0].parent != self.state.head:
            # From the genesis: a fresh node, or control answered with the whole chain
            # (our head unknown to it), which must then still contain our head.
            known = self.state.head if self.state else None
            state = lock.verify(updates, known_head=known)
            self.chain, self.state = list(updates), state
            return
        for u in updates:
            lock.apply(self.state, u)  # checks first: a rejected update leaves no trace
            self.chain.append(u)

    def _save(self) -> None:
        self.store.save_secret(FILE, json.dumps(
            {"updates": [base64.b64encode(u.encode()).decode() for u in self.chain]}))

    def summary(self) -> dict[str, Any] | None:
        """The status JSON's ``lock`` object (None in a mesh that is not locked)."""
        if not self.seen_locked:
            return None
        st = self.state
        return {"lock_id": st.lock_id.hex() if st else "", "head": self.head,
                "trusted_keys": sorted(str(k) for k in st.trusted) if st else [],
                "rejected": self.rejected or None}
