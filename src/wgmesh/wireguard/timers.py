"""WireGuard's protocol constants (whitepaper section 6, kernel ``messages.h``).

They live in one frozen :class:`Timing` so tests (and only tests) can scale the
*time* constants down: ``WGMESH_WG_TIME_SCALE=20`` makes REKEY_AFTER_TIME 6 s
instead of 120 s, so a lab test can watch real rekeys happen with a real peer
without waiting minutes. Message-count limits are never scaled.
"""

from __future__ import annotations

import os

import attrs

__all__ = [
    "COUNTER_WINDOW_SIZE",
    "REJECT_AFTER_MESSAGES",
    "REKEY_AFTER_MESSAGES",
    "Timing",
    "timing_from_env",
]

REKEY_AFTER_MESSAGES = 1 << 60
COUNTER_BITS_TOTAL = 8192
COUNTER_WINDOW_SIZE = COUNTER_BITS_TOTAL - 64  # 8128, as the kernel keeps it
REJECT_AFTER_MESSAGES = (1 << 64) - 1 - COUNTER_BITS_TOTAL
MAX_TIMER_HANDSHAKES = 18  # REKEY_ATTEMPT_TIME / REKEY_TIMEOUT
INITIATIONS_PER_SECOND = 50  # per peer: faster initiations are a replayed/flooded handshake


@attrs.frozen
class Timing:
    """Seconds. Defaults are the kernel's."""

    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    rekey_attempt_time: float = 90.0
    rekey_timeout: float = 5.0
    rekey_timeout_jitter: float = 1 / 3
    keepalive_timeout: float = 10.0
    cookie_secret_max_age: float = 120.0
    cookie_secret_latency: float = 5.0
    # How long the device counts as "under load" after a burst of handshakes.
    under_load_hold: float = 1.0

    @property
    def zero_keys_after(self) -> float:
        return 3 * self.reject_after_time

    @property
    def initiator_rekey_on_receive(self) -> float:
        """An initiator's current key is this old on receive: rekey before it dies."""
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout

    @property
    def new_handshake_after(self) -> float:
        """Data sent but nothing heard back for this long: start a new handshake."""
        return self.keepalive_timeout + self.rekey_timeout

    def scaled(self, factor: float) -> Timing:
        """Every time constant divided by ``factor`` (test clocks only)."""
        return Timing(**{f.name: getattr(self, f.name) / factor
                         for f in attrs.fields(Timing)})


def timing_from_env() -> Timing:
    """The kernel's timing, unless the test-only ``WGMESH_WG_TIME_SCALE`` asks for faster."""
    scale = float(os.environ.get("WGMESH_WG_TIME_SCALE", "1") or 1)
    return Timing() if scale == 1 else Timing().scaled(scale)
