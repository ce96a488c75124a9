"""What ``Node.status()`` and ``Node.ping()`` return: typed, JSON-able, and readable.

``repr`` gives an aligned text table (terminal, logs); ``_repr_html_`` gives an
HTML table for Jupyter.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from wgmesh.display import html_table, text_table

__all__ = ["PeerStatus", "PingResult", "Status"]


def _ago(ts: float | None) -> str | None:
    if not ts:
        return None
    return f"{max(0, time.time() - ts):.0f}s ago"


@attrs.frozen
class PeerStatus:
    name: str
    ipv4: str
    ipv6: str
    key: str
    online: bool
    path: str  # "direct" | "relay"
    endpoint: str | None  # ip:port when direct
    relay_region: int | None
    rtt_ms: float | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int

    @property
    def via(self) -> str:
        if self.path == "direct" and self.endpoint:
            return f"direct {self.endpoint}"
        return f"relay region {self.relay_region}" if self.relay_region else "relay"

    def row(self) -> dict[str, Any]:
        return {"peer": self.name, "address": self.ipv4, "path": self.via,
                "latency": None if self.rtt_ms is None else f"{self.rtt_ms:.1f} ms",
                "handshake": _ago(self.last_handshake), "rx": self.rx_bytes,
                "tx": self.tx_bytes}


PEER_COLUMNS = ["peer", "address", "path", "latency", "handshake", "rx", "tx"]


@attrs.frozen
class Status:
    name: str
    ipv4: str | None
    ipv6: str | None
    public_key: str
    backend: str | None
    backend_reason: str
    listen_port: int | None
    home_relay: int | None
    endpoints: list[str]
    control_online: bool
    peers: list[PeerStatus]

    def peer(self, name_or_ip: str) -> PeerStatus | None:
        return next((p for p in self.peers if name_or_ip in (p.name, p.ipv4, p.ipv6)), None)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        head = (f"{self.name} {self.ipv4} ({self.backend}, port {self.listen_port}, "
                f"home relay {self.home_relay}, control "
                f"{'online' if self.control_online else 'offline'})")
        return head + "\n" + text_table([p.row() for p in self.peers], PEER_COLUMNS)

    def _repr_html_(self) -> str:
        return html_table([p.row() for p in self.peers], PEER_COLUMNS,
                          caption=f"{self.name} {self.ipv4} ({self.backend})")


@attrs.frozen
class PingResult:
    peer: str
    ip: str
    rtt_ms: float | None
    path: str
    endpoint: str | None
    relay_region: int | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        via = (f"direct {self.endpoint}" if self.path == "direct" and self.endpoint
               else f"relay region {self.relay_region}")
        if self.rtt_ms is None:
            return f"no reply from {self.peer} ({self.ip}) via {via}"
        return f"pong from {self.peer} ({self.ip}) via {via} in {self.rtt_ms:.1f}ms"
