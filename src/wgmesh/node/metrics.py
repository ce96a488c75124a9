"""The node agent's Prometheus metrics (``wgmesh up --metrics-listen ADDR``).

Nothing is counted per packet: a scrape takes one :meth:`AsyncNode.status`
(the same numbers as ``wgmesh status --json``) on the node's loop, plus what
the path events said since the last one (path changes, time on the relay).
Per-peer series carry the labels ``name`` and ``key`` (keys of ``status
--json``), so there is one series per peer and metric, never per packet or
endpoint; ``path`` takes two values.

Listening on an unspecified address (0.0.0.0, ::) would publish the mesh's
member list to whoever can reach the host: refused unless asked for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from wgmesh.errors import WgmeshError
from wgmesh.node.events import Event

if TYPE_CHECKING:
    from wgmesh.node.api import AsyncNode
    from wgmesh.node.netcheck import NetcheckReport
    from wgmesh.node.status import Status

__all__ = ["MetricsExporter", "PathTimes", "parse_listen"]

PATHS = ("direct", "relay")
PEER_LABELS = ["name", "key"]


@attrs.define
class _PeerPath:
    path: str
    since: float
    relay_s: float = 0.0
    changes: int = 0


class PathTimes:
    """Per peer: path changes and seconds on the relay, from path events (``now`` given)."""

    def __init__(self) -> None:
        self.peers: dict[str, _PeerPath] = {}

    def seen(self, key: str, path: str, now: float) -> None:
        """A peer now on ``path`` (a peer starts on the relay)."""
        p = self.peers.get(key)
        if p is None:
            self.peers[key] = _PeerPath(path, now)
        elif p.path != path:
            if p.path == "relay":
                p.relay_s += now - p.since
            p.path, p.since = path, now
            p.changes += 1

    def removed(self, key: str) -> None:
        self.peers.pop(key, None)

    def relay_seconds(self, key: str, now: float) -> float:
        p = self.peers.get(key)
        if p is None:
            return 0.0
        return p.relay_s + (now - p.since if p.path == "relay" else 0.0)

    def changes(self, key: str) -> int:
        p = self.peers.get(key)
        return p.changes if p else 0


@attrs.frozen
class _Snapshot:
    status: Status
    netcheck: NetcheckReport | None
    dataplane: dict[str, int]
    relay_s: dict[str, float]
    changes: dict[str, int]


class _NodeCollector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        s = self.exporter.snapshot()
        st = s.status
        yield GaugeMetricFamily("wgmesh_node_control_online", "the netmap stream is up",
                                value=int(st.control_online))
        if st.home_relay is not None:
            yield GaugeMetricFamily("wgmesh_node_home_relay", "home relay region",
                                    value=st.home_relay)
        peers = GaugeMetricFamily("wgmesh_node_peers", "peers by path", labels=["path"])
        for path in PATHS:
            peers.add_metric([path], sum(p.path == path for p in st.peers))
        yield peers
        fam: dict[str, Any] = {
            "path": GaugeMetricFamily("wgmesh_node_peer_path", "1 on the peer's current path",
                                      labels=[*PEER_LABELS, "path"]),
            "online": GaugeMetricFamily("wgmesh_node_peer_online", "control says it is online",
                                        labels=PEER_LABELS),
            "rx": CounterMetricFamily("wgmesh_node_peer_rx_bytes", "WireGuard bytes received",
                                      labels=PEER_LABELS),
            "tx": CounterMetricFamily("wgmesh_node_peer_tx_bytes", "WireGuard bytes sent",
                                      labels=PEER_LABELS),
            "rtt": GaugeMetricFamily("wgmesh_node_peer_rtt_seconds", "last measured round trip",
                                     labels=PEER_LABELS),
            "hs": GaugeMetricFamily("wgmesh_node_peer_handshake_age_seconds",
                                    "since the last WireGuard handshake", labels=PEER_LABELS),
            "relay": CounterMetricFamily("wgmesh_node_peer_relay_seconds",
                                         "time on the relay path", labels=PEER_LABELS),
            "changes": CounterMetricFamily("wgmesh_node_peer_path_changes",
                                           "switches between direct and relay",
                                           labels=PEER_LABELS),
        }
        wall = time.time()
        for p in st.peers:
            labels = [p.name, p.key]
            for path in PATHS:
                fam["path"].add_metric([*labels, path], int(p.path == path))
            fam["online"].add_metric(labels, int(p.online))
            fam["rx"].add_metric(labels, p.rx_bytes)
            fam["tx"].add_metric(labels, p.tx_bytes)
            if p.rtt_ms is not None:
                fam["rtt"].add_metric(labels, p.rtt_ms / 1e3)
            if p.last_handshake:
                fam["hs"].add_metric(labels, max(0.0, wall - p.last_handshake))
            fam["relay"].add_metric(labels, s.relay_s.get(p.key, 0.0))
            fam["changes"].add_metric(labels, s.changes.get(p.key, 0))
        yield from fam.values()
        dp = CounterMetricFamily("wgmesh_node_dataplane", "data-plane events (relayed "
                                 "WireGuard packets in and out, drops)", labels=["event"])
        for event, n in sorted(s.dataplane.items()):
            dp.add_metric([event], n)
        yield dp
        yield from _netcheck(s.netcheck)


def _netcheck(r: NetcheckReport | None) -> Iterator[Metric]:
    if r is None:
        return
    yield GaugeMetricFamily("wgmesh_node_netcheck_udp", "UDP works", value=int(r.udp))
    yield GaugeMetricFamily("wgmesh_node_netcheck_hard_nat", "the NAT maps per destination",
                            value=int(r.hard_nat))
    if r.hairpin is not None:
        yield GaugeMetricFamily("wgmesh_node_netcheck_hairpin", "the NAT hairpins",
                                value=int(r.hairpin))
    lat = GaugeMetricFamily("wgmesh_node_netcheck_region_latency_seconds",
                            "best STUN round trip per relay region", labels=["region"])
    for region, rtt in sorted(r.region_latency.items()):
        if rtt is not None:
            lat.add_metric([str(region)], rtt)
    yield lat


def parse_listen(listen: str, *, allow_any: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) to (host, port); an unspecified host only if allowed."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        port_n = int(port)
    except ValueError:
        raise WgmeshError(f"--metrics-listen {listen!r}: want IP:PORT, e.g. "
                          "127.0.0.1:9101") from None
    if not sep or not 0 < port_n < 65536:
        raise WgmeshError(f"--metrics-listen {listen!r}: want IP:PORT")
    if ip.is_unspecified and not allow_any:
        raise WgmeshError(f"--metrics-listen {listen!r} would serve every network: name one "
                          "address, or add --metrics-listen-any")
    return str(ip), port_n


class MetricsExporter:
    """Serves one node's metrics over HTTP on a thread; scrapes read the node on its loop.

    Make it before ``node.up()`` (it follows path events from the start), then
    :meth:`start` on the node's loop and :meth:`close` when done.
    """

    def __init__(self, node: AsyncNode, listen: str, *, allow_any: bool = False) -> None:
        self.node = node
        self.host, self.port = parse_listen(listen, allow_any=allow_any)
        self.paths = PathTimes()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(self))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._unsubscribe = [node.on("peer_added", self._on_event),
                             node.on("peer_path_changed", self._on_event),
                             node.on("peer_removed", self._on_event)]

    def _on_event(self, e: Event) -> None:
        if e.name == "peer_removed":
            self.paths.removed(e.data["key"])
        else:
            self.paths.seen(e.data["key"], e.data.get("path", "relay"), time.monotonic())

    def start(self) -> None:
        """Listen (the port is :attr:`port` after, when 0 was asked for)."""
        self._loop = asyncio.get_running_loop()
        self._server, _thread = start_http_server(self.port, self.host, self.registry)
        self.port = self._server.server_port

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    async def _snapshot(self) -> _Snapshot:
        st = await self.node.status()
        now = time.monotonic()
        for p in st.peers:  # peers that came before this exporter did
            if p.key not in self.paths.peers:
                self.paths.seen(p.key, p.path, now)
        dp = self.node.dataplane
        return _Snapshot(st, self.node.last_netcheck, dict(dp.counters) if dp else {},
                         {p.key: self.paths.relay_seconds(p.key, now) for p in st.peers},
                         {p.key: self.paths.changes(p.key) for p in st.peers})

    def snapshot(self) -> _Snapshot:
        """The node as of now (called on the HTTP thread; runs on the node's loop)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop).result(10)
