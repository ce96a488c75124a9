"""Sans-I/O pieces of control: policy compiler, audit chain, fan-out world, helpers."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import attrs
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh import netmap as nm
from wgmesh.control import addressing, credentials
from wgmesh.control.audit import GENESIS, AuditEntry, entry_hash, verify
from wgmesh.control.client import Backoff
from wgmesh.control.policy import DEFAULT_POLICY, PolicyError, node_selectors, parse_policy
from wgmesh.control.store.records import Change, NodeRecord
from wgmesh.control.world import World
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key

pytestmark = pytest.mark.unit
ULA = "fd00:1:2::/48"


def test_policy_compiles_groups_ports_and_caps() -> None:
    p = parse_policy({"tags": ["tag:web"], "groups": {"group:ops": ["alice", "tag:web"]},
                      "rules": [{"src": ["group:ops"], "dst": ["tag:web:80,443,81-90,22"],
                                 "proto": "tcp", "caps": ["file-send"]}]})
    (rule,) = p.rules
    assert rule.src == {"node:alice", "tag:web"}
    web = node_selectors("w1", ["tag:web"])
    assert p.inbound(web)[0][1] == ((22, 22), (80, 90), (443, 443))
    assert p.caps(node_selectors("alice", []), web) == ("file-send",)
    assert p.caps(web, node_selectors("alice", [])) == ()
    assert p.linked(node_selectors("bob", [])) == set()
    assert "tag:web" in p.linked(node_selectors("alice", []))
    assert "node:alice" in p.linked(web)  # visibility is symmetric
    parse_policy(DEFAULT_POLICY)


@pytest.mark.parametrize(("doc", "path"), [
    ([], ""), ({"rules": {}}, "rules"), ({"rules": [{"src": [], "dst": ["*:*"]}]}, "rules[0].src"),
    ({"rules": [{"src": ["*"], "dst": ["*"]}]}, "rules[0].dst[0]"),
    ({"rules": [{"src": ["*"], "dst": ["*:70000"]}]}, "rules[0].dst[0]"),
    ({"rules": [{"src": ["*"], "dst": ["*:9-3"]}]}, "rules[0].dst[0]"),
    ({"rules": [{"src": ["*"], "dst": ["*:*"], "action": "drop"}]}, "rules[0].action"),
    ({"rules": [{"src": ["*"], "dst": ["*:*"], "proto": "sctp"}]}, "rules[0].proto"),
    ({"groups": {"group:a": ["group:b"]}, "rules": []}, "groups.group:a[0]"),
    ({"groups": {"ops": []}}, "groups.ops"),
    ({"rules": [{"src": ["Bad Name"], "dst": ["*:*"]}]}, "rules[0].src[0]"),
])
def test_policy_errors_name_the_path(doc: object, path: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy(doc)
    assert path in [d["path"] for d in e.value.details]


def _chain(n: int) -> list[AuditEntry]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        detail = json.dumps({"i": i})
        h = entry_hash(prev, i, 1000.0 + i, "admin", "x.y", f"t{i}", detail)
        out.append(AuditEntry(i, 1000.0 + i, "admin", "x.y", f"t{i}", detail, prev, h))
        prev = h
    return out


def test_audit_chain_detects_edit_deletion_and_reordering() -> None:
    chain = _chain(5)
    assert verify(chain).ok and verify(chain).entries == 5
    edited = [*chain[:2], attrs.evolve(chain[2], actor="mallory"), *chain[3:]]
    assert verify(edited).first_bad_seq == 3
    assert verify(chain[:2] + chain[3:]).first_bad_seq == 4
    assert not verify([chain[1], chain[0], *chain[2:]]).ok
    forged = attrs.evolve(chain[2], detail='{"i":99}')
    assert verify([*chain[:2], forged]).reason.startswith("entry content")


def _rec(i: int, tags: tuple[str, ...] = (), **kw: object) -> NodeRecord:
    v4, v6 = addressing.address_for(i, ULA)
    base = NodeRecord(id=i, name=f"n{i}", node_key=Key.from_raw(i.to_bytes(32, "big")),
                      disco_key=Key.from_raw((i + 10**6).to_bytes(32, "big")), addr_index=i,
                      ipv4=v4, ipv6=v6, tags=tags, created_at=0.0, key_expiry=0.0)
    return attrs.evolve(base, **kw)


class _Seq:
    def __init__(self) -> None:
        self.n = 0

    def node(self, rec: NodeRecord) -> Change:
        self.n += 1
        return Change(self.n, "node", str(rec.id), json.dumps(rec.to_json()))


def _world(nodes: list[NodeRecord], policy: dict) -> tuple[World, _Seq, dict[int, list[bytes]]]:
    w = World(ULA, clock=lambda: 1000.0)
    w.load(nodes, 1, json.dumps(policy), nm.RelayMap(), 0)
    seq = _Seq()
    got: dict[int, list[bytes]] = {}
    for n in nodes:
        got[n.id] = [b"".join(w.attach(n.id, None, lambda: None))]
    return w, seq, got


PARTITIONED = {"tags": [f"tag:g{g}" for g in range(3)] + ["tag:hub"],
               "rules": [{"src": [f"tag:g{g}"], "dst": [f"tag:g{g}:*"]} for g in range(3)]
               + [{"src": ["*"], "dst": ["tag:hub:*"]}]}


def test_world_reads_records_without_the_sql_layer() -> None:
    """The fan-out core needs the records, not a database: no SQL module, no driver."""
    code = ("import sys, wgmesh.control.world\n"
            "sql = ('sqlite3', 'psycopg', 'wgmesh.control.store.sql',\n"
            "       'wgmesh.control.store.sqlite', 'wgmesh.control.store.postgres')\n"
            "print(' '.join(m for m in sql if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == []


def test_world_fans_out_only_to_nodes_that_see_the_change() -> None:
    nodes = [_rec(i, (f"tag:g{i % 3}",)) for i in range(1, 31)] + [_rec(99, ("tag:hub",))]
    w, seq, first = _world(nodes, PARTITIONED)
    full = nm.decode(first[1][0])
    assert isinstance(full, nm.Netmap)
    assert set(full.peers) == {i for i in range(1, 31) if i % 3 == 1 and i != 1} | {99}
    assert len(nm.decode(first[99][0]).peers) == 30
    w.apply(seq.node(attrs.evolve(nodes[0], endpoints=(nm.Endpoint("192.0.2.1", 7),))))
    assert w.dirty == {i for i in range(2, 31) if i % 3 == 1} | {99}
    dirty = set(w.dirty)
    assert w.flush() == 10
    lines = {nid: w.subs[nid].out[-1] for nid in dirty}
    assert len(set(lines.values())) == 1  # one shared encoding, not one per recipient
    d = nm.decode(next(iter(lines.values())))
    assert isinstance(d, nm.NetmapDelta) and d.peers_changed == (
        nm.PeerChange(id=1, endpoints=(nm.Endpoint("192.0.2.1", 7),)),)


def test_world_delta_size_is_independent_of_mesh_size() -> None:
    sizes = []
    for n in (10, 300):
        nodes = [_rec(i) for i in range(1, n + 1)]
        w, seq, _ = _world(nodes, DEFAULT_POLICY)
        w.apply(seq.node(attrs.evolve(nodes[4], home_relay=2,
                                      endpoints=(nm.Endpoint("198.51.100.4", 41641),))))
        w.flush()
        sizes.append({len(w.subs[r].out[-1]) for r in w.visible[5]})
        assert len(w.visible[5]) == n - 1
        assert len(nm.decode(w.full_map(1)).peers) == n - 1  # chunked encoding joins up
    assert sizes[0] == sizes[1] and len(sizes[0]) == 1


def test_world_policy_change_and_removal_reach_subscribers_as_deltas() -> None:
    nodes = [_rec(1, ("tag:g0",)), _rec(2, ("tag:g1",))]
    w, seq, first = _world(nodes, PARTITIONED)
    m1 = nm.decode(first[1][0])
    assert not m1.peers
    seq.n += 1
    w.apply(Change(seq.n, "policy", "2", json.dumps(DEFAULT_POLICY)))
    w.flush()
    m1 = nm.apply(m1, nm.decode(w.subs[1].take()))
    assert set(m1.peers) == {2} and m1.policy_version == 2 and m1.peers[2].caps == ("file-send",)
    assert nm.packet_allowed(m1.filter, nodes[1].ipv4, nodes[0].ipv4, "udp", 53)
    seq.n += 1
    w.apply(Change(seq.n, "node_removed", "2", "{}"))
    w.flush()
    m1 = nm.apply(m1, nm.decode(w.subs[1].take()))
    assert not m1.peers and 2 not in w.subs


def test_world_resume_replays_only_missed_lines() -> None:
    nodes = [_rec(1), _rec(2)]
    w, seq, _ = _world(nodes, DEFAULT_POLICY)
    w.detach(1, lambda: None)
    mark = w.subs[1].seq
    for relay in (1, 2, 3):
        w.apply(seq.node(attrs.evolve(nodes[1], home_relay=relay)))
        w.flush()
    lines = list(w.attach(1, mark + 1, lambda: None))
    assert [nm.decode(x).peers_changed[0].home_relay for x in lines] == [2, 3]
    # Nothing missed: one keepalive at once, so the node sees its stream up without
    # waiting a keepalive period.
    latest = w.subs[1].seq
    assert [nm.decode(x) for x in w.attach(1, latest, lambda: None)] == [
        nm.Keepalive(seq=latest)]
    assert isinstance(nm.decode(b"".join(w.attach(1, 10**6, lambda: None))), nm.Netmap)


def test_world_expiry_is_reported_then_applied_as_a_change() -> None:
    now = [100.0]
    w = World(ULA, clock=lambda: now[0])
    nodes = [_rec(1), _rec(2, key_expiry=150.0)]
    w.load(nodes, 1, json.dumps(DEFAULT_POLICY), nm.RelayMap(), 0)
    w.attach(1, None, lambda: None)
    assert w.due_expiries() == []
    now[0] = 151.0
    assert w.due_expiries() == [2]
    w.apply(Change(1, "node", "2", json.dumps(nodes[1].to_json())))
    w.flush()
    assert nm.decode(w.subs[1].take()).peers_removed == (2,)
    assert w.live_keys() == [nodes[0].node_key.b64()]


def test_credentials_and_addressing() -> None:
    cid, token, h = credentials.mint(credentials.AUTH_KEY)
    parsed = credentials.parse(token, credentials.AUTH_KEY)
    assert parsed is not None and parsed[0] == cid and credentials.matches(parsed[1], h)
    assert credentials.parse(token, credentials.API_KEY) is None
    assert not credentials.matches(parsed[1] + "x", h)
    assert addressing.next_index(254) == 257 and addressing.next_index(0) == 1
    assert addressing.address_for(257, ULA) == ("100.64.1.1", "fd00:1:2::101")
    assert addressing.new_ula_prefix().endswith("::/48")
    assert addressing.unique_name("a", {"a", "a-2"}) == "a-3"


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(base_s=1, cap_s=8, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    for d, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= d <= ceiling
    b.reset()
    assert b.next_delay() <= 1


POLICIES = [
    DEFAULT_POLICY,
    PARTITIONED,
    {"tags": ["tag:g0", "tag:g1", "tag:g2", "tag:hub"],
     "groups": {"group:x": ["tag:g1", "n3"]},
     "rules": [{"src": ["group:x"], "dst": ["tag:hub:22"], "proto": "tcp",
                "caps": ["file-send"]},
               {"src": ["tag:g0"], "dst": ["tag:g2:80-90"]}]},
]
TAGSETS = [(), ("tag:g0",), ("tag:g1",), ("tag:g2",), ("tag:hub",), ("tag:g0", "tag:hub")]
node_ops = st.tuples(st.just("node"), st.integers(1, 7), st.sampled_from(TAGSETS),
                     st.integers(0, 3), st.booleans(), st.integers(0, 2))
ops = st.lists(st.one_of(
    node_ops, node_ops, node_ops,
    st.tuples(st.just("remove"), st.integers(1, 7)),
    st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1)),
    st.tuples(st.just("relay"), st.integers(1, 3)),
), min_size=1, max_size=40)


@settings(max_examples=examples(150), deadline=None)
@given(ops)
def test_world_incremental_views_match_a_full_rebuild(script: list[tuple]) -> None:
    """After any change sequence, every stream's map (full map + deltas) equals a fresh one."""
    w = World(ULA, clock=lambda: 1000.0)
    w.load([], 1, json.dumps(DEFAULT_POLICY), nm.RelayMap(), 0)
    views: dict[int, nm.Netmap] = {}
    for seq, op in enumerate(script, 1):
        if op[0] == "node":
            _, nid, tags, relay, online, expiry = op
            rec = _rec(nid, tags, home_relay=relay, online=online,
                       key_expiry=(0.0, 5000.0, 10.0)[expiry],
                       endpoints=((nm.Endpoint("192.0.2.1", 1000 + relay),) if relay else ()))
            w.apply(Change(seq, "node", str(nid), json.dumps(rec.to_json())))
        elif op[0] == "remove":
            w.apply(Change(seq, "node_removed", str(op[1]), "{}"))
            views.pop(op[1], None)
        elif op[0] == "policy":
            w.apply(Change(seq, "policy", str(seq), json.dumps(POLICIES[op[1]])))
        else:
            rm = {"regions": [{"region_id": op[1], "code": f"r{op[1]}", "nodes": []}]}
            w.apply(Change(seq, "relay_map", "", json.dumps(rm)))
        w.flush()
        for nid in list(views):
            for line in w.subs[nid].take().splitlines():
                views[nid] = nm.apply(views[nid], nm.decode(line))
        for nid in w.nodes:
            if nid not in views:
                views[nid] = nm.decode(b"".join(w.attach(nid, None, lambda: None)))
        for nid, view in views.items():
            fresh = nm.decode(w.full_map(nid))
            assert attrs.evolve(view, seq=0) == attrs.evolve(fresh, seq=0), (nid, op)


def test_world_since_zero_on_a_fresh_subscriber_is_a_full_map() -> None:
    nodes = [_rec(1), _rec(2)]
    w = World(ULA, clock=lambda: 1000.0)
    w.load(nodes, 1, json.dumps(DEFAULT_POLICY), nm.RelayMap(), 0)
    first = nm.decode(b"".join(w.attach(1, 0, lambda: None)))
    assert isinstance(first, nm.Netmap) and set(first.peers) == {2}


def test_policy_node_names_bind_only_to_assigned_names() -> None:
    doc = {"tags": ["tag:db"], "rules": [{"src": ["ops"], "dst": ["tag:db:*"]}]}
    p = parse_policy(doc)
    assert p.linked(node_selectors(None, [])) == set()  # a self-chosen name selects nothing
    assert "tag:db" in p.linked(node_selectors("ops", []))
    w = World(ULA, clock=lambda: 1000.0)
    squatter, ops = _rec(1, name="ops"), _rec(2, name="laptop")
    w.load([squatter, ops, _rec(3, ("tag:db",), name="db")], 1, json.dumps(doc),
           nm.RelayMap(), 0)
    assert w.visible[1] == set() and w.visible[3] == set()
    w.apply(Change(1, "node", "1", json.dumps(attrs.evolve(squatter, name="ops-2").to_json())))
    w.apply(Change(2, "node", "2", json.dumps(attrs.evolve(ops, name="ops",
                                                           name_assigned=True).to_json())))
    assert w.visible[3] == {2} and w.visible[1] == set()
    with pytest.raises(PolicyError) as e:
        parse_policy({"rules": [{"src": ["*"], "dst": ["*:*"], "caps": [["file-send"], {}]}]})
    assert [d["path"] for d in e.value.details] == ["rules[0].caps[0]", "rules[0].caps[1]"]


def test_keyed_audit_chain_resists_recomputed_hashes() -> None:
    key = b"k" * 32
    old = _chain(3)
    prev, chain = old[-1].hash, list(old)
    for i in range(4, 7):
        action = "audit.keyed" if i == 4 else "x.y"
        h = entry_hash(prev, i, 1000.0 + i, "admin", action, f"t{i}", "{}", key)
        chain.append(AuditEntry(i, 1000.0 + i, "admin", action, f"t{i}", "{}", prev, h, True))
        prev = h
    ok = verify(chain, key)
    assert ok.ok and ok.entries == 6 and ok.keyed_from == 4
    # Rehashing everything as an unkeyed chain (the attacker has no key) is refused...
    forged, prev = [], GENESIS
    for e in chain:
        h = entry_hash(prev, e.seq, e.ts, "mallory", e.action, e.target, e.detail)
        forged.append(attrs.evolve(e, actor="mallory", prev_hash=prev, hash=h, keyed=False))
        prev = h
    assert not verify(forged, key).ok and "keyed" in verify(forged, key).reason
    # ...so is a keyed entry made with another key, and a keyed chain checked with no key.
    assert verify(chain, b"x" * 32).first_bad_seq == 4
    assert not verify(chain, None).ok
    assert verify(old, key).ok is False  # a key exists, so the chain must carry keyed entries
    # Plain entries rewritten in front of a keyed tail the server kept appending to:
    # the keyed part must begin with its audit.keyed entry.
    h = entry_hash(prev, 7, 1007.0, "admin", "x.y", "t7", "{}", key)
    appended = AuditEntry(7, 1007.0, "admin", "x.y", "t7", "{}", prev, h, True)
    assert verify([*forged, appended], key).reason == "the keyed chain does not begin with " \
        "audit.keyed"


def test_rate_limiter_buckets_per_source_and_stays_bounded() -> None:
    from wgmesh.control.ratelimit import RateLimiter

    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0], max_sources=100)
    assert [rl.check("192.0.2.1") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    assert rl.check("192.0.2.2") == 0.0  # another source has its own bucket
    assert rl.check("2001:db8::1") == 0.0
    for _ in range(2):
        rl.check("2001:db8::2")  # the same /64: one bucket
    assert rl.check("2001:db8::3") > 0
    now[0] = 0.5
    assert rl.check("192.0.2.1") == 0.0
    for i in range(1000):
        rl.check(f"10.0.{i // 256}.{i % 256}")
    assert len(rl) <= 100


@pytest.mark.parametrize("url, ok", [
    ("https://control.example:8420", True), ("https://192.0.2.1", True),
    ("http://127.0.0.1:8420", True), ("http://[::1]:8420", True), ("http://localhost", True),
    ("http://192.0.2.1:8420", False), ("http://[2001:db8::1]", False),
    ("http://control.example", False), ("ftp://127.0.0.1", False), ("https://", False)])
def test_credentials_never_go_to_plain_http_off_loopback(url: str, ok: bool) -> None:
    """Node tokens, auth keys and the relay's credential are bearer secrets (issue 13)."""
    from wgmesh.relaynet.server import RelayServer
    from wgmesh.urls import check_credential_url

    if ok:
        check_credential_url(url)
        return
    with pytest.raises(WgmeshError):
        check_credential_url(url)
    with pytest.raises(WgmeshError, match=r"http|expected"):
        RelayServer(control_url=url, relay_credential="c")


@pytest.mark.parametrize(("sqlstate", "status"), [
    ("53100", 507),  # disk_full
    ("53000", 503), ("53200", 503), ("53300", 503), ("53400", 503),  # the rest of class 53
    ("23505", None), ("40001", None),  # not a resource error: left to the caller
])
def test_postgres_resource_errors_become_clear_refusals(sqlstate: str, status: int | None
                                                        ) -> None:
    """The error class psycopg raises for each SQLSTATE (the disk-full one, for real, in
    tests/service/test_control_faults.py): a full disk is the 507 SQLite gives, the
    other resource limits a 503 that says to try again."""
    errors = pytest.importorskip("psycopg.errors")
    from wgmesh.control.store.postgres import resource_error

    clear = resource_error(errors.lookup(sqlstate)("from the server"))
    assert (clear.status if clear else None) == status
    if clear is not None:
        assert "nothing was changed" in clear.message
