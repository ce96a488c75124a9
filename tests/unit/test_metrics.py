"""The Prometheus collectors' exposition: names, label sets, one series per peer at most.

No sockets: the collectors read the same objects a scrape would (a relay server
that never listened, a control world, a node status), and the text is parsed
back with prometheus_client's own parser.
"""

from __future__ import annotations

import attrs
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from wgmesh.control.metrics import ControlMetrics
from wgmesh.control.world import World
from wgmesh.errors import WgmeshError
from wgmesh.node.metrics import PathTimes, _NodeCollector, _Snapshot, parse_listen
from wgmesh.node.netcheck import NetcheckReport
from wgmesh.node.status import PeerStatus, Status
from wgmesh.relaynet.metrics import wants_prometheus
from wgmesh.relaynet.server import RelayServer

pytestmark = pytest.mark.unit


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)], from the text a scrape would get."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_relay_exposes_its_counters_with_fixed_labels() -> None:
    srv = RelayServer(host="127.0.0.1")
    srv.counters.update(packets_in=5, bytes_in=700, packets_out=4, bytes_out=600,
                        stun_replies=2)
    srv.drops.update(unknown_dest=1, rate_limited=3)
    s = samples(srv.registry)
    assert s["wgmesh_relay_clients"] == [({}, 0.0)]
    frames = {lab["direction"]: v for lab, v in s["wgmesh_relay_frames_total"]}
    assert frames == {"in": 5, "out": 4, "mesh_in": 0, "mesh_out": 0}
    assert dict((lab["direction"], v) for lab, v in s["wgmesh_relay_bytes_total"]) == {
        "in": 700, "out": 600}
    assert s["wgmesh_relay_stun_replies_total"] == [({}, 2.0)]
    assert {lab["reason"]: v for lab, v in s["wgmesh_relay_drops_total"]} == {
        "unknown_dest": 1, "rate_limited": 3}
    assert "wgmesh_relay_queue_max_bytes" in s and "wgmesh_relay_allow_list_size" not in s
    # two servers in one process: separate registries, no duplicate-name clash
    other = RelayServer(host="127.0.0.1")
    assert samples(other.registry)["wgmesh_relay_frames_total"][0][1] == 0


@pytest.mark.parametrize(("accept", "prom"), [
    ("", False), ("*/*", False), ("application/json", False),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", True),
    ("text/plain", True)])
def test_relay_metrics_content_negotiation(accept: str, prom: bool) -> None:
    assert wants_prometheus(accept) is prom


def test_control_world_and_hooks() -> None:
    m = ControlMetrics()
    world = World("fd7a:115c:a1e0::/48", clock=lambda: 0.0)
    world.stats.update(lines=7, bytes=900)
    m._world.world = world
    m.registrations.labels("ok", "").inc()
    m.registrations.labels("refused", "forbidden").inc(2)
    with m.fanout.time():
        pass
    m.store_latency.labels("register").observe(0.002)
    s = samples(m.registry)
    assert s["wgmesh_control_deltas_total"] == [({}, 7.0)]
    assert s["wgmesh_control_delta_bytes_total"] == [({}, 900.0)]
    assert s["wgmesh_control_streams"] == [({}, 0.0)]
    assert s["wgmesh_control_policy_version"] == [({}, 0.0)]
    assert sorted((lab["result"], lab["reason"], v)
                  for lab, v in s["wgmesh_control_registrations_total"]) == [
        ("ok", "", 1.0), ("refused", "forbidden", 2.0)]
    assert s["wgmesh_control_fanout_seconds_count"] == [({}, 1.0)]
    assert s["wgmesh_control_store_seconds_count"] == [({"op": "register"}, 1.0)]


def test_control_metrics_allow_list() -> None:
    m = ControlMetrics()
    assert m._allowed("127.0.0.1") and m._allowed("::1") and m._allowed("::ffff:127.0.0.1")
    assert not m._allowed("192.0.2.1") and not m._allowed(None)
    assert ControlMetrics(["192.0.2.0/24"])._allowed("192.0.2.9")
    with pytest.raises(WgmeshError, match="allow-list"):
        ControlMetrics(["not a net"])


def test_path_times_count_changes_and_relay_seconds() -> None:
    t = PathTimes()
    t.seen("k", "relay", 10.0)
    assert t.relay_seconds("k", 12.5) == 2.5 and t.changes("k") == 0
    t.seen("k", "direct", 13.0)
    t.seen("k", "direct", 14.0)  # an endpoint change on the same path is no path change
    assert t.relay_seconds("k", 20.0) == 3.0 and t.changes("k") == 1
    t.seen("k", "relay", 21.0)
    assert t.relay_seconds("k", 22.0) == 4.0 and t.changes("k") == 2
    t.removed("k")
    assert t.relay_seconds("k", 30.0) == 0.0 and "k" not in t.peers


def _peer(name: str, path: str, rx: int) -> PeerStatus:
    return PeerStatus(name=name, ipv4="100.64.0.2", ipv6="fd7a::2", key=f"{name}-key=",
                      online=True, path=path, endpoint=None, relay_region=1, rtt_ms=12.0,
                      last_handshake=None, rx_bytes=rx, tx_bytes=2 * rx)


class _Fixed:
    """An exporter whose node is the snapshot given (the collector's only input)."""

    def __init__(self, snap: _Snapshot) -> None:
        self.snap = snap

    def snapshot(self) -> _Snapshot:
        return self.snap


def test_node_exposition_has_one_series_per_peer_labelled_as_status_json() -> None:
    peers = [_peer("a", "direct", 100), _peer("b", "relay", 5), _peer("c", "relay", 0)]
    status = Status(name="me", ipv4="100.64.0.1", ipv6=None, public_key="me=", backend="userspace",
                    backend_reason="", listen_port=1, home_relay=1, endpoints=[],
                    control_online=True, peers=peers)
    report = NetcheckReport(udp=True, ipv4=("198.51.100.1", 1), ipv6=None,
                            mapping_varies_by_dest=False, hairpin=None,
                            region_latency={1: 0.004, 2: None}, preferred_region=1, seen_by={})
    snap = _Snapshot(status, report, {"relay_wg_in": 3}, {"a-key=": 1.5}, {"a-key=": 1})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_NodeCollector(_Fixed(snap)))  # type: ignore[arg-type]
    s = samples(reg)
    per_peer = {n: v for n, v in s.items() if n.startswith("wgmesh_node_peer_")}
    status_keys = set(attrs.asdict(peers[0]))
    for name, series in per_peer.items():
        extra = {"path"} if name == "wgmesh_node_peer_path" else set()
        for labels, _ in series:
            assert set(labels) == {"name", "key"} | extra, name
            assert set(labels) - extra <= status_keys
        assert len(series) == len(peers) * (2 if extra else 1), name
    path = {(lab["name"], lab["path"]): v for lab, v in s["wgmesh_node_peer_path"]}
    assert path[("a", "direct")] == 1 and path[("a", "relay")] == 0 and path[("b", "relay")] == 1
    rx = {lab["name"]: v for lab, v in s["wgmesh_node_peer_rx_bytes_total"]}
    assert rx == {"a": 100, "b": 5, "c": 0}
    assert {lab["name"]: v for lab, v in s["wgmesh_node_peer_relay_seconds_total"]}["a"] == 1.5
    assert {lab["path"]: v for lab, v in s["wgmesh_node_peers"]} == {"direct": 1, "relay": 2}
    assert s["wgmesh_node_netcheck_region_latency_seconds"] == [({"region": "1"}, 0.004)]
    assert s["wgmesh_node_dataplane_total"] == [({"event": "relay_wg_in"}, 3.0)]


def test_metrics_listen_refuses_every_network_unless_asked() -> None:
    assert parse_listen("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert parse_listen("[::1]:9101") == ("::1", 9101)
    for listen in ("0.0.0.0:9101", "[::]:9101"):
        with pytest.raises(WgmeshError, match="--metrics-listen-any"):
            parse_listen(listen)
        assert parse_listen(listen, allow_any=True)[1] == 9101
    for bad in ("9101", "localhost:9101", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(WgmeshError, match="IP:PORT"):
            parse_listen(bad)
