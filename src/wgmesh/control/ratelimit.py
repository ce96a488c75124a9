"""Per-source token buckets for unauthenticated endpoints (sans-I/O: the caller passes a clock).

A source is an IPv4 address or an IPv6 /64 (one host usually owns a whole
/64, so per-address buckets would be free to multiply). The table is bounded:
past ``max_sources`` it is cut back to nine tenths (amortised O(1) per
request): buckets that have refilled completely, and so carry no state worth
keeping, go first, then the least recently used.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimiter", "source_of"]


def source_of(remote: str) -> str:
    """The bucket key of a peer address: the address itself, or its /64 for IPv6."""
    try:
        a = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if a.version == 6 and a.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((a, 64), strict=False))
    return str(a.ipv4_mapped or a) if a.version == 6 else str(a)


class RateLimiter:
    """``rate`` requests a second per source, in bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float],
                 max_sources: int = 65536) -> None:
        self.rate, self.burst, self.clock, self.max_sources = rate, burst, clock, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, remote: str) -> float:
        """Take a token for ``remote``: 0.0 if allowed, else the seconds until one is free."""
        key, now = source_of(remote), self.clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_sources:
            self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        keep = self.max_sources * 9 // 10
        full = [k for k, (t, at) in self._buckets.items()
                if t + (now - at) * self.rate >= self.burst]
        for k in full[: len(self._buckets) - keep]:
            del self._buckets[k]
        while len(self._buckets) > keep:
            self._buckets.popitem(last=False)
