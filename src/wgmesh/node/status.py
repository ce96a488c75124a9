"""What ``Node.status()`` and ``Node.ping()`` return: typed, JSON-able, and readable.

``repr`` gives an aligned text table (terminal, logs); ``_repr_html_`` gives an
HTML table for Jupyter.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from wgmesh.display import html_table, text_table
from wgmesh.node.netcheck import format_addr
from wgmesh.traversal import REASON_OFFLINE, PathInfo, PathState

__all__ = ["PeerStatus", "PingResult", "Status", "path_mtu_json", "path_reason", "tried_json"]


def _ago(ts: float | None) -> str | None:
    if not ts:
        return None
    return f"{max(0, time.time() - ts):.0f}s ago"


def path_reason(info: PathInfo | None, online: bool) -> str:
    """Why a peer's path is what it is; control's word that the peer is offline wins
    over the path machine's own guess while it is relayed."""
    if info is not None and info.state is PathState.DIRECT:
        return info.reason
    if not online:
        return REASON_OFFLINE
    return info.reason if info is not None else "not configured yet"


def tried_json(info: PathInfo | None) -> list[dict[str, Any]]:
    """The candidates traversal probed for a peer, JSON-ready."""
    if info is None:
        return []
    return [{"endpoint": format_addr(c.addr), "socket": c.sock, "sources": list(c.sources),
             "rtt_ms": None if c.rtt is None else round(c.rtt * 1e3, 2), "result": c.result}
            for c in info.tried]


def path_mtu_json(info: PathInfo | None) -> dict[str, int | None]:
    """The measured MTU of the direct path (None when there is none or it is not
    measured yet) and of the relay path."""
    return {"direct": info.mtu_direct if info else None,
            "relay": info.mtu_relay if info else None}


@attrs.frozen
class PeerStatus:
    """One peer as ``status`` shows it; ``reason``, ``candidates`` and ``pinned`` explain
    the path (``wgmesh status --explain PEER``)."""

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
    #: Mesh lock: None (not locked), "signed", "needs signature" or "revoked"; only a
    #: signed peer is in WireGuard.
    lock: str | None = None
    #: Direct thanks to a gateway port mapping (the peer's or ours).
    via_portmap: bool = False
    #: Why the path is what it is, the candidates probed, and the user's pin.
    reason: str = ""
    candidates: list[dict[str, Any]] = attrs.field(factory=list)
    pinned: str | int | None = None
    #: Path MTU (tunnel bytes) found by padded disco pings: {"direct": ..., "relay": ...}.
    path_mtu: dict[str, int | None] = attrs.field(factory=dict)

    @property
    def mtu(self) -> int | None:
        """The measured MTU of the path in use."""
        return self.path_mtu.get("direct" if self.path == "direct" else "relay")

    @property
    def via(self) -> str:
        if self.lock not in (None, "signed"):
            return f"left out: {self.lock}"
        if self.path == "direct" and self.endpoint:
            return f"direct {self.endpoint}" + (" (port mapping)" if self.via_portmap else "")
        return f"relay region {self.relay_region}" if self.relay_region else "relay"

    def row(self) -> dict[str, Any]:
        return {"peer": self.name, "address": self.ipv4, "path": self.via,
                "latency": None if self.rtt_ms is None else f"{self.rtt_ms:.1f} ms",
                "mtu": self.mtu, "handshake": _ago(self.last_handshake), "rx": self.rx_bytes,
                "tx": self.tx_bytes}

    def explain(self) -> str:
        """The story of this peer's path, for a person."""
        lines = [f"{self.name} ({self.ipv4}): {self.via}, because: {self.reason or 'unknown'}"]
        if self.pinned is not None:
            lines.append(f"  pinned to {self.pinned} (wgmesh unpin {self.name} lets "
                         f"traversal choose)")
        if not self.online:
            lines.append("  control says the peer is offline")
        if not self.candidates:
            lines.append("  no candidate addresses known for it yet")
        else:
            lines.append("  candidates tried:")
            lines += [f"    {c['endpoint']:<28} {c['result']:<10} "
                      f"{'' if c['rtt_ms'] is None else str(c['rtt_ms']) + ' ms':<10} "
                      f"from {','.join(c['sources'])}"
                      f"{'' if not c['socket'] else ' (search socket)'}"
                      for c in self.candidates]
        return "\n".join(lines)


PEER_COLUMNS = ["peer", "address", "path", "latency", "mtu", "handshake", "rx", "tx"]


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
    #: Mesh lock (None: not locked): lock_id, head, trusted_keys, rejected.
    lock: dict[str, Any] | None = None
    #: The last netmap message from control that failed verification (and was refused).
    control_rejected: str | None = None
    #: running, pending (awaiting approval) or expired; ``state_reason`` says more.
    state: str = "running"
    state_reason: str = ""
    #: The interface MTU the user asked for (``--mtu``): the ceiling.
    mtu: int | None = None
    #: Subnet routes and exit node: advertised, accept_routes, exit_node, exit_active.
    routes: dict[str, Any] | None = None
    #: The interface MTU now: lowered below ``mtu`` to the narrowest measured path in use.
    interface_mtu: int | None = None
    #: Mesh DNS (None: not served): the domain and the system hook (resolved,
    #: resolv.conf or none).
    dns: dict[str, str] | None = None

    def peer(self, name_or_ip: str) -> PeerStatus | None:
        return next((p for p in self.peers if name_or_ip in (p.name, p.ipv4, p.ipv6)), None)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        head = (f"{self.name} {self.ipv4} ({self.backend}, port {self.listen_port}, "
                f"home relay {self.home_relay}, control "
                f"{'online' if self.control_online else 'offline'})")
        if self.state != "running":
            head += f"\n{self.state}: {self.state_reason}"
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
