"""One peer's state: handshake, the previous/current/next keypairs, timers, counters.

Pure data plus the kernel's keypair rotation rules (``noise.c``); the decisions that
use it are in :mod:`wgmesh.wireguard.device`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from wgmesh.wireguard.noise import CookieGenerator, Handshake, LocalIdentity
from wgmesh.wireguard.session import Keypair

__all__ = ["MAX_STAGED", "Peer"]

MAX_STAGED = 128  # packets held while a handshake is under way, as the kernel does


class Peer:
    """State for one remote public key. Deadlines are clock values or None (unarmed)."""

    def __init__(self, local: LocalIdentity | None, public: bytes, cookie_lifetime: float) -> None:
        self.public = public
        self.preshared_key = bytes(32)
        self.endpoint: tuple[str, int] | None = None
        # Relay hook: when set, this peer's WireGuard packets go to relay(bytes) not UDP.
        self.relay: Callable[[bytes], object] | None = None
        self.persistent_keepalive = 0
        self.cookies = CookieGenerator(public, cookie_lifetime)
        self.handshake: Handshake | None = None
        self.handshake_index: int | None = None
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall: float | None = None
        self.handshakes_completed = 0
        # timers.c state
        self.handshake_attempts = 0
        self.last_sent_handshake = float("-inf")
        self.sent_lastminute_handshake = False
        self.need_another_keepalive = False
        self.t_retransmit: float | None = None
        self.t_send_keepalive: float | None = None
        self.t_new_handshake: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent: float | None = None
        self.set_identity(local)

    def set_identity(self, local: LocalIdentity | None) -> None:
        """(Re)derive the handshake for our static key; None while we have no key."""
        self.handshake = None
        if local is not None and local.public != self.public:
            try:
                self.handshake = Handshake(local, self.public, self.preshared_key)
            except ValueError:  # a low-order public key can never complete a handshake
                self.handshake = None

    @property
    def destination(self) -> Callable[[bytes], object] | tuple[str, int] | None:
        """Where this peer's packets go: the relay when one is set, else the UDP endpoint."""
        return self.relay or self.endpoint

    def keypairs(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def deadlines(self) -> list[float]:
        return [t for t in (self.t_retransmit, self.t_send_keepalive, self.t_new_handshake,
                            self.t_zero_keys, self.t_persistent) if t is not None]

    def install(self, kp: Keypair) -> list[Keypair]:
        """Add a fresh keypair as the kernel does; returns the keypairs dropped.

        The initiator may use its new key at once (it becomes current). The responder
        keeps it as *next* until the initiator's first data packet proves the
        initiator has it too.
        """
        dropped: list[Keypair] = []
        if kp.initiator:
            if self.next is not None:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous, self.next = self.next, None
                if self.current is not None:
                    dropped.append(self.current)
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = kp
        else:
            dropped += [k for k in (self.next, self.previous) if k is not None]
            self.next, self.previous = kp, None
        return dropped

    def received_with(self, kp: Keypair) -> list[Keypair] | None:
        """A packet authenticated under ``kp``: promote *next*. None if nothing changed."""
        if kp is not self.next:
            return None
        dropped = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, kp, None
        return dropped

    def wipe(self) -> list[Keypair]:
        dropped = self.keypairs()
        self.current = self.previous = self.next = None
        self.staged.clear()
        if self.handshake is not None:
            self.handshake.clear()
        return dropped
