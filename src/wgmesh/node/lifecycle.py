"""The node's own standing in the mesh: pending approval, key expired, or running.

Control decides (approval, key expiry); the node only reads its self entry in the
netmap, says in ``status`` why it has no peers, and warns ahead of its key
expiry with a ``key_expiring`` event, so a script can re-authenticate in time
(:meth:`~wgmesh.node.api.AsyncNode.reauthenticate`, or an admin's
``wgmesh control nodes extend``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from wgmesh.netmap import NodeInfo

__all__ = ["KEY_EXPIRING_S", "KeyExpiryWatch", "self_state", "warn_at"]

#: How long ahead of its key expiry a node warns (capped at a tenth of what is left).
KEY_EXPIRING_S = 7 * 86400.0


def self_state(me: NodeInfo | None, now: float) -> tuple[str, str]:
    """``(state, reason)``: ``running``, ``pending`` or ``expired``, and why, for ``status``."""
    if me is None:
        return "running", ""
    if not me.approved:
        return "pending", (f"waiting for an admin to approve this node "
                           f"(wgmesh control nodes approve {me.name}); it has no peers until then")
    if me.expired(now):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(me.key_expiry))
        return "expired", (f"node key expired at {when}: peers dropped it; re-authenticate "
                           f"with an auth key or ask an admin (wgmesh control nodes extend)")
    return "running", ""


def warn_at(key_expiry: float, now: float, warn_s: float = KEY_EXPIRING_S) -> float | None:
    """When to emit ``key_expiring`` for ``key_expiry`` (None: it never expires).

    ``warn_s`` ahead, but never more than a tenth of the time left, so a key
    issued for an hour is not reported as expiring at once.
    """
    if key_expiry <= 0:
        return None
    return key_expiry - min(warn_s, max(0.0, key_expiry - now) / 10)


class KeyExpiryWatch:
    """Emits ``key_expiring`` once per expiry time, on the running loop's clock."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None],
                 warn_s: float = KEY_EXPIRING_S) -> None:
        self.emit, self.warn_s = emit, warn_s
        self._expiry = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def update(self, key_expiry: float) -> None:
        """The key expiry the netmap gives now; reschedules when it changed."""
        if key_expiry == self._expiry:
            return
        self.close()
        self._expiry = key_expiry
        now = time.time()
        at = warn_at(key_expiry, now, self.warn_s)
        if at is not None and key_expiry > now:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, at - now), self._fire, key_expiry)

    def _fire(self, key_expiry: float) -> None:
        self._timer = None
        self.emit("key_expiring", {"key_expiry": key_expiry,
                                   "in_s": round(max(0.0, key_expiry - time.time()), 1)})

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
