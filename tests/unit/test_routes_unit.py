"""Subnet routes and exit nodes in control: approval (admin and ``autoApprovers``), the
primary router of each prefix with failover and no flap-back, what peers are told, and
the filter a router gets when a policy destination is a CIDR behind it."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from wgmesh import netmap as nm
from wgmesh.control import addressing
from wgmesh.control.errors import BadRequest
from wgmesh.control.policy import PolicyError, parse_policy
from wgmesh.control.routes import Primaries, effective_routes, inbound, parse_routes
from wgmesh.control.routesapi import routes_field
from wgmesh.control.store import NodeRecord, SQLiteStore
from wgmesh.control.store.records import Change
from wgmesh.control.world import World
from wgmesh.keys import Key

pytestmark = pytest.mark.unit

ULA = "fd7a:115c:a1e0::/48"
LAN = "198.51.100.0/24"
POLICY = {"tags": ["tag:router", "tag:client", "tag:exit"],
          "rules": [{"src": ["tag:client"], "dst": [f"{LAN}:22,80"], "proto": "tcp"},
                    {"src": ["tag:client"], "dst": ["0.0.0.0/0:*"]}],
          "autoApprovers": {"routes": {"198.51.0.0/16": ["tag:router"]},
                            "exitNode": ["tag:exit"]}}


def _rec(i: int, tags: tuple[str, ...] = (), **kw: object) -> NodeRecord:
    v4, v6 = addressing.address_for(i, ULA)
    base = NodeRecord(id=i, name=f"n{i}", node_key=Key.from_raw(i.to_bytes(32, "big")),
                      disco_key=Key.from_raw((i + 10**6).to_bytes(32, "big")), addr_index=i,
                      ipv4=v4, ipv6=v6, tags=tags, created_at=0.0, key_expiry=0.0, online=True)
    return attrs.evolve(base, **kw)


def test_policy_cidr_destinations_and_auto_approvers_validate() -> None:
    p = parse_policy(POLICY)
    assert p.cidrs == {LAN, "0.0.0.0/0"}
    assert p.auto_routes == (("198.51.0.0/16", frozenset({"tag:router"})),)
    assert p.auto_exit == {"tag:exit"}
    with pytest.raises(PolicyError) as e:
        parse_policy({"rules": [{"src": ["10.0.0.0/8"], "dst": ["10.0.0.0/33:*"]}],
                      "autoApprovers": {"routes": {"nope": ["*"]}, "exitNode": "x"}})
    paths = {d["path"] for d in e.value.details}
    assert {"rules[0].src[0]", "rules[0].dst[0]", "autoApprovers.routes.nope",
            "autoApprovers.exitNode"} <= paths


def test_only_advertised_and_approved_routes_are_enabled() -> None:
    p = parse_policy(POLICY)
    router, other = frozenset({"*", "tag:router"}), frozenset({"*"})
    adv = ("198.51.100.0/24", "203.0.113.0/24", "0.0.0.0/0")
    assert effective_routes(adv, (), router, p) == ("198.51.100.0/24",)  # auto: inside /16
    assert effective_routes(adv, (), other, p) == ()  # not the approvers' tag
    assert effective_routes(adv, ("203.0.113.0/24",), other, p) == ("203.0.113.0/24",)
    assert effective_routes((), ("203.0.113.0/24",), other, p) == ()  # approved, not offered
    assert effective_routes(adv, (), frozenset({"*", "tag:exit"}), p) == ("0.0.0.0/0",)
    assert parse_routes(["198.51.100.7/24", "198.51.100.0/24"]) == ["198.51.100.0/24"]
    with pytest.raises(BadRequest, match="not a CIDR"):
        routes_field({"routes": ["198.51.100.0/33"]})


def test_primary_is_sticky_fails_over_and_does_not_flap_back() -> None:
    pr = Primaries()
    assert pr.elect({1: ((LAN,), True), 2: ((LAN,), True)}) == {1}
    assert pr.carried(1, (LAN, "0.0.0.0/0")) == (LAN, "0.0.0.0/0")
    assert pr.carried(2, (LAN, "0.0.0.0/0")) == ("0.0.0.0/0",)  # exit routes: no primary
    assert pr.elect({1: ((LAN,), False), 2: ((LAN,), True)}) == {1, 2}  # 1 offline
    assert pr.primary[LAN] == 2
    assert pr.elect({1: ((LAN,), True), 2: ((LAN,), True)}) == set()  # 1 back: no flap
    assert pr.elect({1: ((LAN,), False), 2: ((LAN,), False)}) == set()  # all down: keep
    assert pr.elect({1: ((LAN,), True)}) == {1, 2}  # 2 gone


def test_router_filter_accepts_the_policy_sources_into_the_lan_only() -> None:
    p = parse_policy(POLICY)
    own = ("100.64.0.1/32", "fd7a::1/128")
    rules = inbound(p, frozenset({"*", "tag:router", f"cidr:{LAN}", "cidr:0.0.0.0/0"}), own,
                    (LAN,))
    assert [(d, ports) for _, d, ports in rules] == [((LAN,), ((22, 22), (80, 80))),
                                                     ((LAN,), ((0, 65535),))]
    star = parse_policy({"rules": [{"src": ["*"], "dst": ["*:*"]}]})
    assert set(inbound(star, frozenset({"*"}), own, (LAN,))[0][1]) == {LAN, *own}


def _netmap(w: World, nid: int) -> nm.Netmap:
    m = nm.decode(b"".join(w.attach(nid, None, lambda: None)))
    assert isinstance(m, nm.Netmap)
    return m


def test_world_tells_peers_the_primary_and_fails_over() -> None:
    w = World(ULA, clock=lambda: 1000.0)
    r1 = _rec(1, ("tag:router",), advertised_routes=(LAN,))
    r2 = _rec(2, ("tag:router",), advertised_routes=(LAN,))
    client, outsider = _rec(3, ("tag:client",)), _rec(4)
    w.load([r1, r2, client, outsider], 1, json.dumps(POLICY), nm.RelayMap(), 10)
    m = _netmap(w, 3)
    assert m.peers[1].routes == (LAN,) and m.peers[2].routes == ()
    assert 1 not in _netmap(w, 4).peers  # no rule links an untagged node to the LAN
    r_filter = _netmap(w, 1).filter
    assert {r.dst for r in r_filter} == {(LAN,)}
    assert all(r.src == (f"{client.ipv4}/32", f"{client.ipv6}/128") for r in r_filter)
    w.apply(Change(11, "node", "1", json.dumps(attrs.evolve(r1, online=False).to_json())))
    w.flush()
    delta = nm.decode(w.subs[3].ring[-1][1])
    assert isinstance(delta, nm.NetmapDelta)
    assert {p.id: p.routes for p in delta.peers_upsert} == {1: (), 2: (LAN,)}
    w.apply(Change(12, "node", "1", json.dumps(r1.to_json())))  # back online: no flap
    assert w.primaries.primary[LAN] == 2


def test_store_records_advertised_and_approved_routes_with_audit(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c.db"))
    store.migrate()
    store.seed_nodes([(Key.from_raw(b"\1" * 32), Key.from_raw(b"\2" * 32), "r", ())])
    rec = store.list_nodes()[0]
    rec = store.update_node(rec.id, routes=[LAN, "0.0.0.0/0"])
    assert rec.advertised_routes == ("0.0.0.0/0", LAN) and rec.approved_routes == ()
    rec = store.approve_routes(f"id:{rec.id}", [LAN, "0.0.0.0/0"], True, "apikey:t")
    rec = store.approve_routes(f"id:{rec.id}", ["0.0.0.0/0"], False, "apikey:t")
    assert rec.approved_routes == (LAN,)
    actions = [e.action for e in store.audit_entries()]
    assert actions[-2:] == ["routes.approve", "routes.reject"]
