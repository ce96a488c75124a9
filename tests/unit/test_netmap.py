"""Netmap models, wire codec and apply(): round trips, fuzzing, delta semantics."""

from __future__ import annotations

import contextlib
import json

import attrs
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh import netmap as nm
from wgmesh.keys import Key

pytestmark = pytest.mark.unit

keys = st.binary(min_size=32, max_size=32).map(Key.from_raw)
names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
tokens = st.lists(st.from_regex(r"\Atag:[a-z0-9]{1,8}\Z"), max_size=3).map(tuple)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
endpoints = st.builds(nm.Endpoint, ip=st.one_of(ipv4s, ipv6s),
                      port=st.integers(1, 65535), kind=st.sampled_from(["stun", "local"]))
peers = st.builds(
    nm.Peer, id=st.integers(1, 10**6), name=names, node_key=keys, disco_key=keys,
    ipv4=ipv4s, ipv6=ipv6s, allowed_ips=st.just(("100.64.0.1/32",)),
    endpoints=st.lists(endpoints, max_size=3).map(tuple), home_relay=st.integers(0, 9),
    online=st.booleans(), last_seen=times, key_expiry=times, tags=tokens,
    caps=st.sampled_from([(), ("file-send",)]),
    routes=st.sampled_from([(), ("198.51.100.0/24",), ("0.0.0.0/0", "::/0")]))
nodes = st.builds(nm.NodeInfo, id=st.integers(1, 10**6), name=names, node_key=keys,
                  disco_key=keys, ipv4=ipv4s, ipv6=ipv6s, tags=tokens, key_expiry=times)
rules = st.builds(nm.FilterRule, src=st.just(("100.64.0.0/10",)),
                  dst=st.just(("100.64.0.1/32",)),
                  ports=st.sampled_from([((0, 65535),), ((22, 22), (80, 90))]),
                  proto=st.sampled_from(nm.PROTOS), caps=st.sampled_from([(), ("file-send",)]))
relay_maps = st.just(nm.RelayMap(regions=(nm.RelayRegion(
    region_id=1, code="lab", name="Lab", nodes=(nm.RelayNode(
        name="r1", url="http://203.0.113.10:8443", stun_port=3478),)),)))
changes = st.builds(
    nm.PeerChange, id=st.integers(1, 10**6),
    endpoints=st.none() | st.lists(endpoints, max_size=2).map(tuple),
    home_relay=st.none() | st.integers(0, 9), online=st.none() | st.booleans(),
    last_seen=st.none() | times, key_expiry=st.none() | times)
lock_heads = st.just("") | st.binary(min_size=32, max_size=32).map(bytes.hex)
netmaps = st.builds(
    nm.Netmap, seq=st.integers(0, 10**9), self_node=nodes,
    peers=st.lists(peers, max_size=4).map(lambda ps: {p.id: p for p in ps}),
    relay_map=relay_maps, filter=st.lists(rules, max_size=3).map(tuple),
    policy_version=st.integers(0, 100), lock_head=lock_heads)
deltas = st.builds(
    nm.NetmapDelta, seq=st.integers(0, 10**9),
    peers_upsert=st.lists(peers, max_size=3).map(tuple),
    peers_removed=st.lists(st.integers(1, 10**6), max_size=3).map(tuple),
    peers_changed=st.lists(changes, max_size=3).map(tuple),
    self_node=st.none() | nodes, relay_map=st.none() | relay_maps,
    filter=st.none() | st.lists(rules, max_size=2).map(tuple),
    policy_version=st.none() | st.integers(0, 100), lock_head=st.none() | lock_heads)


@given(st.one_of(netmaps, deltas, st.builds(nm.Keepalive, seq=st.integers(0, 10**9))))
def test_codec_round_trip(msg: nm.Message) -> None:
    line = nm.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert nm.decode(line) == msg


@settings(max_examples=examples(300))
@given(st.binary(max_size=200))
def test_decode_garbage_raises_only_format_error(data: bytes) -> None:
    with contextlib.suppress(nm.NetmapFormatError):
        nm.decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                               max_size=4),
    max_leaves=20)


@settings(max_examples=examples(300))
@given(netmaps, st.data())
def test_decode_mutated_messages(msg: nm.Netmap, data: st.DataObject) -> None:
    """Replace one field anywhere in a valid message: valid result or NetmapFormatError."""
    obj = nm.to_json(msg)
    target = obj
    path = data.draw(st.lists(st.integers(0, 20), max_size=4))
    for step in path:
        if isinstance(target, dict) and target:
            k = sorted(target)[step % len(target)]
            if isinstance(target[k], dict | list) and target[k]:
                target = target[k]
                continue
            target[k] = data.draw(json_values)
            break
        if isinstance(target, list) and target:
            i = step % len(target)
            if isinstance(target[i], dict | list) and target[i]:
                target = target[i]
                continue
            target[i] = data.draw(json_values)
            break
    with contextlib.suppress(nm.NetmapFormatError):
        nm.decode(json.dumps(obj))


def _peer(pid: int, **kw: object) -> nm.Peer:
    base = nm.Peer(id=pid, name=f"n{pid}", node_key=Key.from_raw(bytes([pid]) * 32),
                   disco_key=Key.from_raw(bytes([pid + 100]) * 32),
                   ipv4=f"100.64.0.{pid}", ipv6=f"fd7a:1::{pid}",
                   allowed_ips=(f"100.64.0.{pid}/32", f"fd7a:1::{pid}/128"))
    return attrs.evolve(base, **kw)


def _map() -> nm.Netmap:
    me = nm.NodeInfo(id=1, name="me", node_key=Key.from_raw(b"\1" * 32),
                     disco_key=Key.from_raw(b"\2" * 32), ipv4="100.64.0.1", ipv6="fd7a:1::1")
    return nm.Netmap(seq=10, self_node=me, peers={2: _peer(2), 3: _peer(3)})


def test_apply_add_change_remove() -> None:
    m = _map()
    d = nm.NetmapDelta(seq=11, peers_upsert=(_peer(4),), peers_removed=(3,),
                       peers_changed=(nm.PeerChange(id=2, online=True, home_relay=7,
                                                    endpoints=(nm.Endpoint("1.2.3.4", 5),)),))
    m2 = nm.apply(m, d)
    assert m2.seq == 11 and sorted(m2.peers) == [2, 4]
    assert m2.peers[2].online and m2.peers[2].home_relay == 7
    assert m2.peers[2].endpoints == (nm.Endpoint("1.2.3.4", 5),)
    assert m2.peers[2].name == "n2"  # untouched fields survive a change
    assert sorted(m.peers) == [2, 3]  # the input map is not modified


def test_apply_stale_delta_is_ignored() -> None:
    m = _map()
    assert nm.apply(m, nm.NetmapDelta(seq=10, peers_removed=(2,))) is m
    assert nm.apply(m, nm.NetmapDelta(seq=3, peers_removed=(2,))) is m


def test_apply_key_rotation_replaces_peer_by_id() -> None:
    new = _peer(2, node_key=Key.from_raw(b"\x99" * 32))
    m2 = nm.apply(_map(), nm.NetmapDelta(seq=12, peers_upsert=(new,)))
    assert m2.peers[2].node_key == new.node_key
    assert m2.peer_by_key(_peer(2).node_key) is None and m2.peer_by_key(new.node_key) == new


def test_apply_policy_and_relay_map() -> None:
    rule = nm.FilterRule(src=("100.64.0.2/32",), dst=("100.64.0.1/32",),
                         ports=((22, 22),), proto="tcp")
    rm = nm.RelayMap(regions=(nm.RelayRegion(region_id=1, code="x"),))
    m2 = nm.apply(_map(), nm.NetmapDelta(seq=11, filter=(rule,), relay_map=rm,
                                         policy_version=5))
    assert m2.filter == (rule,) and m2.relay_map == rm and m2.policy_version == 5
    m3 = nm.apply(m2, nm.NetmapDelta(seq=12, peers_removed=(9,)))
    assert m3.filter == (rule,) and m3.relay_map == rm  # absent means unchanged


def test_filter_default_deny_and_ports() -> None:
    rules = [nm.FilterRule(src=("100.64.0.2/32",), dst=("100.64.0.1/32",),
                           ports=((22, 22), (8000, 8010)), proto="tcp")]
    assert nm.packet_allowed(rules, "100.64.0.2", "100.64.0.1", "tcp", 22)
    assert nm.packet_allowed(rules, "100.64.0.2", "100.64.0.1", "tcp", 8005)
    assert not nm.packet_allowed(rules, "100.64.0.2", "100.64.0.1", "udp", 22)
    assert not nm.packet_allowed(rules, "100.64.0.3", "100.64.0.1", "tcp", 22)
    assert not nm.packet_allowed([], "100.64.0.2", "100.64.0.1", "tcp", 22)


def test_endpoint_text_form() -> None:
    assert str(nm.Endpoint("1.2.3.4", 5)) == "1.2.3.4:5"
    assert str(nm.Endpoint("2001:db8::1", 5)) == "[2001:db8::1]:5"
    assert nm.Endpoint.parse("[2001:db8::1]:5") == nm.Endpoint("2001:db8::1", 5)
    with pytest.raises(nm.NetmapFormatError):
        nm.Endpoint.parse("1.2.3.4")
    with pytest.raises(nm.NetmapFormatError):
        nm.Endpoint.parse("1.2.3.4:99999")


def test_relay_node_stun_address_defaults_to_url_host() -> None:
    n = nm.RelayNode(name="r", url="https://203.0.113.5:443/relay")
    assert n.stun_address == ("203.0.113.5", 3478)
    assert nm.RelayNode(name="r", url="https://x", stun_port=0).stun_address is None


def test_decode_deep_nesting_is_a_format_error() -> None:
    with pytest.raises(nm.NetmapFormatError):
        nm.decode(b"[" * 100_000)


def test_decode_errors_name_the_field() -> None:
    obj = nm.to_json(_map())
    obj["peers"][0]["node_key"] = "nope"
    with pytest.raises(nm.NetmapFormatError, match=r"peers\[0\]\.node_key"):
        nm.decode(json.dumps(obj))


def test_peer_routes_are_additive_on_the_wire() -> None:
    """A peer without routes encodes as before (old decoders see nothing new), and a
    message from an older control (no ``routes`` key) decodes with none."""
    p = _peer(3)
    assert "routes" not in nm.to_json(p)
    routed = attrs.evolve(p, routes=("198.51.100.0/24",))
    assert nm.to_json(routed)["routes"] == ["198.51.100.0/24"]
    msg = attrs.evolve(_map(), peers={3: routed})
    assert nm.decode(nm.encode(msg)) == msg
    with pytest.raises(nm.NetmapFormatError, match="routes"):
        nm.from_json({**nm.to_json(msg), "peers": [{**nm.to_json(routed), "routes": ["x"]}]})
