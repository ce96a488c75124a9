"""What ``Node.status()`` and ``Node.ping()`` return: typed, JSON-able, and readable.

``repr`` gives an aligned text table (terminal, logs); ``_repr_html_`` gives an
HTML table for Jupyter.
"""

from __future__ import annotations

import html
import time
from typing import Any

import attrs

__all__ = ["PeerStatus", "PingResult", "Status", "html_table", "text_table"]


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [["-" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def html_table(rows: list[dict[str, Any]], columns: list[str], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('-' if r.get(c) is None else str(r.get(c)))}</td>"
                         for c in columns) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
