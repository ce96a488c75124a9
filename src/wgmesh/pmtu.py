"""Path MTU of one path to a peer, found with padded disco pings (sans-I/O).

A round sends one padded :class:`~wgmesh.disco.Ping` per rung of a small ladder of
tunnel MTUs (twice each, so one lost datagram does not lower the result), each
padded so its datagram is as long as a WireGuard data message carrying a packet of
that size (:data:`WG_OVERHEAD` more). The largest size the peer confirms (the pong
echoes the length the ping arrived with) is the path MTU. The driver sends from
the WireGuard port with DF set where it can (userspace: ``IP_PMTUDISC_DO``), so a
link that would have to fragment drops the probe, like a PMTU black hole on the
internet does, and a probe too large for our own link fails to leave at all.

The direct path and the relay path are measured apart (:class:`PathMtu` each): they
cross different links. A round that gets no answer at all keeps the previous
value: the path itself is down (traversal deals with that), not narrower. An old
peer drops padded pings, so its paths stay unknown (``None``) and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from wgmesh import disco

__all__ = ["LADDER", "MIN_MTU", "WG_OVERHEAD", "PathMtu", "padding_for", "probe_mtus"]

#: A WireGuard data message around a tunnel packet: 16-byte header, 16-byte tag.
WG_OVERHEAD = 32
#: The smallest tunnel MTU probed or set: IPv6 needs 1280 on the interface.
MIN_MTU = 1280
#: Tunnel MTUs left by common underlay MTUs over IPv4 (60 bytes of IP, UDP and
#: WireGuard) and IPv6 (80): 1320 (IPv6 1400), 1340 (a 1400 link), 1360 (1420), 1380
#: (1440 or IPv6 1460), 1392 (1452), 1400 (1460), 1420 (IPv6 1500, the default), 1432
#: (PPPoE 1492), 1440 (IPv4 1500). Only rungs up to the configured MTU are probed.
LADDER = (MIN_MTU, 1320, 1340, 1360, 1380, 1392, 1400, 1420, 1432, 1440)


def probe_mtus(ceiling: int) -> tuple[int, ...]:
    """The rungs to probe under ``ceiling`` (the user's MTU), which is always a rung."""
    top = max(ceiling, MIN_MTU)
    return tuple(sorted({m for m in LADDER if m < top} | {top}))


def padding_for(mtu: int) -> int:
    """Padding that makes a ping as long as a WireGuard packet carrying ``mtu`` bytes."""
    return max(0, mtu + WG_OVERHEAD - disco.PING_LEN)


class PathMtu:
    """Measures one path of one peer. Time is passed in; nothing here does I/O.

    :meth:`start` gives the pings of a round when one is due; the owner sends them on
    the path, feeds pongs to :meth:`on_pong` and calls :meth:`tick` at
    :meth:`next_wakeup`. :attr:`mtu` is the last finished round's answer.
    """

    def __init__(self, *, interval: float, timeout: float = 2.0, copies: int = 2) -> None:
        self.interval = interval
        self.timeout = timeout
        self.copies = copies
        self.mtu: int | None = None
        self.rounds = 0
        self.next_round = float("-inf")
        self._pending: dict[bytes, int] = {}  # txid -> the tunnel MTU it probes
        self._top = 0
        self._best: int | None = None
        self._round_end: float | None = None

    def reset(self) -> None:
        """A new path (another endpoint): forget the old answer, probe at once."""
        self.mtu = self._best = self._round_end = None
        self._pending.clear()
        self.next_round = float("-inf")

    def due(self, now: float) -> bool:
        return self._round_end is None and now >= self.next_round

    def start(self, now: float, ceiling: int, new_txid: Callable[[], bytes]
              ) -> list[tuple[bytes, int]]:
        """The round's probes as ``(txid, padding)``; the owner wraps them in pings."""
        self._pending.clear()
        self._best = None
        rungs = probe_mtus(ceiling)
        self._top = rungs[-1]
        self._round_end = now + self.timeout
        self.next_round = now + self.interval
        out: list[tuple[bytes, int]] = []
        for mtu in rungs:
            for _ in range(self.copies):
                txid = new_txid()
                self._pending[txid] = mtu
                out.append((txid, padding_for(mtu)))
        return out

    def on_pong(self, txid: bytes, size: int) -> bool:
        """True if the pong answers one of this round's probes (then it is consumed).
        It counts only if it confirms the probe arrived whole."""
        mtu = self._pending.pop(txid, None)
        if mtu is None:
            return False
        if size == disco.PING_LEN + padding_for(mtu):
            self._best = max(self._best or 0, mtu)
            if self._best == self._top:  # nothing larger to wait for
                self._finish()
        return True

    def tick(self, now: float) -> None:
        if self._round_end is not None and now >= self._round_end:
            self._finish()

    def next_wakeup(self) -> float:
        return self._round_end if self._round_end is not None else self.next_round

    def _finish(self) -> None:
        self._round_end = None
        self._pending.clear()
        self.rounds += 1
        if self._best is not None:
            self.mtu = self._best
