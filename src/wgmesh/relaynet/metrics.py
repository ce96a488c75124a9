"""The relay's counters as Prometheus/OpenMetrics text, read at scrape time.

The collector reads the dict of :meth:`RelayServer.metrics` (the same numbers as
the JSON ``/metrics``; a relay of several workers sums theirs first) when Prometheus
scrapes, so forwarding a packet costs nothing more than the counter increments it
already did. Labels come from fixed sets (directions, drop reasons named in the
code), never from keys or addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["RelayCollector", "exposition", "relay_registry", "wants_prometheus"]

#: JSON gauge key -> (metric name, help)
_GAUGES = {
    "clients": ("clients", "nodes connected to this relay"),
    "home_clients": ("home_clients", "connected nodes whose home region this relay serves"),
    "connections": ("connections", "admitted TCP connections (HTTP, nodes, mesh)"),
    "pending_connections": ("pending_connections", "connections still in the handshake"),
    "mesh_peers_connected_in": ("mesh_peers_in", "region relays connected to this one"),
    "mesh_links_up": ("mesh_links_up", "this relay's own links to the other region relays"),
    "remote_clients": ("remote_clients", "nodes reachable through a mesh link"),
    "queued_bytes": ("queued_bytes", "bytes queued for slow readers, all connections"),
}
#: counter key -> direction label of wgmesh_relay_frames_total
_FRAMES = {"packets_in": "in", "packets_out": "out", "packets_mesh_in": "mesh_in",
           "packets_mesh_out": "mesh_out"}
_OTHER_COUNTERS = {
    "clients_accepted": "node handshakes accepted",
    "http_requests": "HTTP requests (relay upgrades, /metrics, /health)",
    "stun_requests": "STUN Binding requests received",
    "stun_replies": "STUN Binding answers sent",
    "allow_list_fetches": "allow-list fetches from control that succeeded",
    "clients_moved_in": "node connections moved here from another worker of this relay, "
                        "to the worker of the node they talk with",
    "clients_kept_tls": "times a node's connection would have moved to another worker but "
                        "stayed, being TLS",
}


class RelayCollector(Collector):
    """One relay's metrics (``metrics()`` gives a :meth:`RelayServer.metrics` dict at each
    scrape), prefixed ``wgmesh_relay_``."""

    def __init__(self, metrics: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics()
        counters, drops = m["counters"], m["drops"]
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(f"wgmesh_relay_{name}", doc, value=m[key])
        yield GaugeMetricFamily("wgmesh_relay_queue_max_bytes",
                                "the deepest queue of one connected node, in bytes",
                                value=m["queue_max_bytes"])
        if m["allow_list_size"] is not None:
            yield GaugeMetricFamily("wgmesh_relay_allow_list_size",
                                    "node keys control allows", value=m["allow_list_size"])
        frames = CounterMetricFamily("wgmesh_relay_frames", "packets relayed, by direction",
                                     labels=["direction"])
        for key, direction in _FRAMES.items():
            frames.add_metric([direction], counters.get(key, 0))
        yield frames
        sent = CounterMetricFamily("wgmesh_relay_bytes", "packet bytes relayed, by direction",
                                   labels=["direction"])
        sent.add_metric(["in"], counters.get("bytes_in", 0))
        sent.add_metric(["out"], counters.get("bytes_out", 0))
        yield sent
        for key, doc in _OTHER_COUNTERS.items():
            yield CounterMetricFamily(f"wgmesh_relay_{key}", doc, value=counters.get(key, 0))
        dropped = CounterMetricFamily("wgmesh_relay_drops", "frames, connections and "
                                      "requests dropped, by reason", labels=["reason"])
        for reason, n in sorted(drops.items()):
            dropped.add_metric([reason], n)
        yield dropped


def wants_prometheus(accept: str) -> bool:
    """Does this ``Accept`` header ask for Prometheus/OpenMetrics text (as Prometheus' does)
    rather than the JSON every other client gets?"""
    accept = accept.lower()
    return "openmetrics" in accept or "text/plain" in accept


def relay_registry(metrics: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own for one relay (many servers may share a process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(metrics))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[str, str]:
    """A relay's registry in the text format ``accept`` prefers: (body, content type)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry).decode(), content_type
