"""Host-side unit tests of the kernel backend's pure parts: the multi-peer
WG_CMD_SET_DEVICE builder, the device-dump parser, the route planner.

Messages are encoded and decoded with pyroute2's own ``wgmsg`` (exactly the
bytes the kernel would get), then applied to a small model of the kernel's
peer semantics, so "diff, encode, apply" is checked to land on the desired state.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import struct
from collections import Counter

import attrs
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh.keys import Key, PrivateKey
from wgmesh.wireguard.backend import BackendError, PeerConfig, PeerStats, diff_peers
from wgmesh.wireguard.kernel import (
    MAX_MESSAGE_BYTES,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    DeviceInfo,
    dump_done,
    dump_request,
    endpoint_diffs,
    parse_dump,
    peer_messages,
    redacted_socket_class,
    route_changes,
    routes_for,
    set_device_message,
)

pytestmark = pytest.mark.unit

KEYS = [Key.from_raw(bytes([i]) * 32) for i in range(1, 40)]


def _wire(peers: list, device_attrs: list | None = None) -> tuple[bytes, object]:
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = set_device_message(7, device_attrs or [], peers)
    msg["header"]["type"] = 0x20
    msg["header"]["flags"] = 1
    msg.encode()
    data = bytes(msg.data)
    back = wgmsg(data)
    back.decode()
    return data, back


def _apply(model: dict[Key, dict], decoded: object) -> None:
    """What the kernel's set_peer does with each peer nest (drivers/net/wireguard/netlink.c)."""
    for p in decoded.get_attr("WGDEVICE_A_PEERS") or ():  # type: ignore[attr-defined]
        key = Key(p.get_attr("WGPEER_A_PUBLIC_KEY"))
        flags = p.get_attr("WGPEER_A_FLAGS") or 0
        if flags & WGPEER_F_REMOVE_ME:
            model.pop(key, None)
            continue
        if key not in model:
            if flags & WGPEER_F_UPDATE_ONLY:
                continue
            model[key] = {"endpoint": None, "keepalive": 0, "psk": bytes(32), "ips": set()}
        peer = model[key]
        ep = p.get_attr("WGPEER_A_ENDPOINT")
        if ep is not None:
            peer["endpoint"] = (ep["addr"], ep["port"])
        ka = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
        if ka is not None:
            peer["keepalive"] = ka
        psk = p.get_attr("WGPEER_A_PRESHARED_KEY")
        if psk is not None:
            peer["psk"] = Key(psk).raw
        if flags & WGPEER_F_REPLACE_ALLOWEDIPS:
            peer["ips"] = set()
        for ip in p.get_attr("WGPEER_A_ALLOWEDIPS") or ():
            peer["ips"].add(ipaddress.ip_network(ip["addr"]))


def _model(peers: list[PeerConfig]) -> dict[Key, dict]:
    return {p.public_key: {"endpoint": p.endpoint, "keepalive": p.persistent_keepalive,
                           "psk": p.preshared_key or bytes(32), "ips": set(p.allowed_ips)}
            for p in peers}


def _roundtrip(current: list[PeerConfig], desired: list[PeerConfig], limit: int
               ) -> tuple[dict, int]:
    cur = {p.public_key: p for p in current}
    model = _model(current)
    batches = peer_messages(cur, diff_peers(cur, desired), limit=limit)
    for batch in batches:
        data, back = _wire(batch)
        assert len(data) <= limit
        _apply(model, back)
    return model, len(batches)


endpoints = st.one_of(
    st.tuples(st.sampled_from(["203.0.113.5", "198.51.100.7", "2001:db8::9"]),
              st.integers(1, 65535)))
nets = st.one_of(
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
              st.integers(0, 2**32 - 1), st.integers(8, 32)),
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
              st.integers(0, 2**128 - 1), st.integers(32, 128)))
peer_sets = st.dictionaries(
    st.sampled_from(KEYS),
    st.tuples(st.lists(nets, max_size=5), endpoints, st.sampled_from([0, 25]),
              st.sampled_from([None, b"\x01" * 32])),
    max_size=12)


def _peers(spec: dict) -> list[PeerConfig]:
    return [PeerConfig(k, ips, ep, ka, psk) for k, (ips, ep, ka, psk) in spec.items()]


@settings(max_examples=examples(150), deadline=None)
@given(peer_sets, peer_sets, st.sampled_from([400, 2000, MAX_MESSAGE_BYTES]))
def test_diff_encode_apply_reaches_desired_state(cur: dict, want: dict, limit: int) -> None:
    current, desired = _peers(cur), _peers(want)
    model, _ = _roundtrip(current, desired, limit)
    assert model == _model(desired)


def test_bulk_add_is_few_messages_and_fits() -> None:
    keys = [Key.from_raw(i.to_bytes(32, "big")) for i in range(1, 1201)]
    desired = [PeerConfig(k, [f"100.64.{i // 250}.{i % 250}/32"], ("203.0.113.9", 40000 + i), 25)
               for i, k in enumerate(keys)]
    model, n = _roundtrip([], desired, MAX_MESSAGE_BYTES)
    assert model == _model(desired)
    # 108 bytes per peer: 1200 peers in 2 messages, where WireGuard.set needs 1200
    assert n == 2


def test_size_estimate_is_exact() -> None:
    desired = _peers({KEYS[0]: ([ipaddress.ip_network("10.0.0.0/8"),
                                 ipaddress.ip_network("fd00::/64")], ("2001:db8::9", 1), 25,
                                b"\x02" * 32),
                      KEYS[1]: ([], ("203.0.113.5", 2), 0, None)})
    (batch,) = peer_messages({}, diff_peers({}, desired), limit=10_000)
    data, _ = _wire(batch)
    _, empty = _wire([])
    # the estimate is what peer_messages budgets with; the real encoding must not exceed it
    assert len(data) - len(bytes(empty.data)) <= 10_000 - 32


def test_endpoint_move_sends_only_the_endpoint() -> None:
    old = PeerConfig(KEYS[0], ["100.64.0.2/32"] + [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)],
                     ("203.0.113.5", 1), 25)
    new = PeerConfig(KEYS[0], old.allowed_ips, ("127.0.0.1", 40001), 25)
    (batch,) = peer_messages({KEYS[0]: old}, diff_peers({KEYS[0]: old}, [new]))
    _, back = _wire(batch)
    (peer,) = back.get_attr("WGDEVICE_A_PEERS")
    names = [a[0] for a in peer["attrs"]]
    assert names == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_ENDPOINT", "WGPEER_A_FLAGS"]
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY


def test_many_allowed_ips_are_continued_in_fragments() -> None:
    ips = [f"10.{i // 256}.{i % 256}.0/24" for i in range(600)]
    old = PeerConfig(KEYS[0], ips[:3], ("203.0.113.5", 1))
    new = PeerConfig(KEYS[0], ips, ("203.0.113.5", 1))
    model, n = _roundtrip([old], [new], MAX_MESSAGE_BYTES)
    assert model == _model([new]) and n == 1
    (batch,) = peer_messages({KEYS[0]: old}, diff_peers({KEYS[0]: old}, [new]))
    flags = [next(v for k, v in f["attrs"] if k == "WGPEER_A_FLAGS") for f in batch]
    assert flags == [WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS,
                     WGPEER_F_UPDATE_ONLY, WGPEER_F_UPDATE_ONLY]


def _dump_part(priv: PrivateKey, peers: list, seq: int = 0) -> bytes:
    """A GET_DEVICE reply as the kernel sends it (its bytes, encoded by pyroute2)."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["header"]["type"], msg["header"]["flags"] = 0x20, 2
    msg["header"]["sequence_number"] = seq
    msg["attrs"] += [["WGDEVICE_A_IFINDEX", 9], ["WGDEVICE_A_IFNAME", "wg0"],
                     ["WGDEVICE_A_PRIVATE_KEY", priv.b64()],
                     ["WGDEVICE_A_PUBLIC_KEY", priv.public.b64()],
                     ["WGDEVICE_A_LISTEN_PORT", 51820], ["WGDEVICE_A_FWMARK", 0x51],
                     ["WGDEVICE_A_PEERS", peers]]
    msg.encode()
    return bytes(msg.data)


def test_the_netlink_socket_never_decodes_the_private_key() -> None:
    """pyroute2 logs every decoded reply at DEBUG (with %s): a reply that carries the
    private key (a device dump, an error echoing a SET_DEVICE request) must decode on the
    backend's socket class with the key left a blob nobody prints."""
    priv = PrivateKey.generate()
    back = redacted_socket_class().dump_class(_dump_part(priv, []))
    back.decode()
    assert back.get_attr("WGDEVICE_A_IFNAME") == "wg0"  # the rest decodes as usual
    assert priv.b64() not in str(back) and priv.raw().hex() not in str(back)


def _ip(net: str) -> dict:
    n = ipaddress.ip_network(net)
    fam = socket.AF_INET if n.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", fam],
                      ["WGALLOWEDIP_A_IPADDR", n.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen]]}


def test_routes_skip_connected_prefixes_and_default() -> None:
    addrs = [ipaddress.ip_interface("100.64.0.1/10"), ipaddress.ip_interface("fd7a::1/48")]
    peers = [PeerConfig(KEYS[0], ["100.64.0.2/32", "fd7a::2/128", "10.5.0.0/24"]),
             PeerConfig(KEYS[1], ["0.0.0.0/0", "::/0", "2001:db8:1::/64", "100.127.0.0/16"])]
    assert {str(n) for n in routes_for(peers, addrs)} == {"10.5.0.0/24", "2001:db8:1::/64"}


def test_a_peer_without_an_endpoint_keeps_the_one_the_data_plane_gave_it() -> None:
    """The node asks for its peers without endpoints: where a peer's packets go is the data
    plane's (traversal moved it, or WireGuard roamed it to a packet's source). Such a peer
    is no update, so a netmap change is not counted, or written, as touching it; a real
    change to it is an update that leaves the endpoint alone."""
    roamed = PeerConfig(KEYS[0], ["100.64.0.2/32"], ("198.51.100.9", 4242), 25)
    assert not diff_peers({KEYS[0]: roamed}, [PeerConfig(KEYS[0], ["100.64.0.2/32"], None, 25)])
    wider = PeerConfig(KEYS[0], ["100.64.0.2/32", "10.9.0.0/24"], None, 25)
    diff = diff_peers({KEYS[0]: roamed}, [wider])
    assert diff.update == (PeerConfig(KEYS[0], wider.allowed_ips, roamed.endpoint, 25),)
    (batch,) = peer_messages({KEYS[0]: roamed}, diff)
    assert "WGPEER_A_ENDPOINT" not in [a[0] for a in batch[0]["attrs"]]


MESH = [ipaddress.ip_interface("100.64.0.1/10"), ipaddress.ip_interface("fd7a::1/48")]
#: 500 peers as a first netmap gives them: mesh addresses, no endpoint yet.
NETMAP = [PeerConfig(Key.from_raw(i.to_bytes(32, "big")),
                     [f"100.64.{i // 250}.{i % 250 + 1}/32", f"fd7a::{i:x}/128"], None, 25)
          for i in range(1, 501)]
BRIDGE = {p.public_key: ("127.0.0.1", 40000 + n) for n, p in enumerate(NETMAP)}
#: A peer nest carrying only an endpoint move (wireguard.h): the nest's header, the
#: public key (4 + 32), the flags (4 + 4) and an IPv4 sockaddr_in (4 + 16).
MOVE_BYTES = 4 + 36 + 8 + 20


def test_a_netmap_of_relayed_peers_moves_in_as_few_messages_as_fit() -> None:
    """The first netmap sends all 500 peers to the relay: their bridge endpoints go out
    together, as many per message as fit, each nest carrying the key, UPDATE_ONLY and
    the endpoint, nothing else (was: one message per peer)."""
    current = {p.public_key: p for p in NETMAP}
    (diff,) = endpoint_diffs(current, BRIDGE)
    assert (len(diff.add), len(diff.update), len(diff.remove)) == (0, 500, 0)
    for limit in (MAX_MESSAGE_BYTES, 10_000):
        batches = peer_messages(current, diff, limit=limit)
        per_message = (limit - 32) // MOVE_BYTES  # 32: the headers and the peers nest
        assert len(batches) == math.ceil(500 / per_message)
        model = _model(NETMAP)
        for batch in batches:
            data, back = _wire(batch)
            assert len(data) <= limit
            for peer in back.get_attr("WGDEVICE_A_PEERS"):
                assert [a[0] for a in peer["attrs"]] == [
                    "WGPEER_A_PUBLIC_KEY", "WGPEER_A_ENDPOINT", "WGPEER_A_FLAGS"]
                assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
            _apply(model, back)
        assert {k: m["endpoint"] for k, m in model.items()} == BRIDGE
    assert len(peer_messages(current, diff)) == 1  # 500 x 68 bytes fit in one


def test_one_move_among_500_peers_is_one_peer_nest() -> None:
    current = {p.public_key: attrs.evolve(p, endpoint=BRIDGE[p.public_key]) for p in NETMAP}
    key = NETMAP[7].public_key
    (diff,) = endpoint_diffs(current, {key: ("198.51.100.7", 4242)})
    assert [p.public_key for p in diff.update] == [key] and not diff.add and not diff.remove
    ((peer,),) = peer_messages(current, diff)
    assert peer["attrs"][1] == ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.7", "port": 4242}]
    # a move to where the peer already is, and one for a peer gone meanwhile: nothing
    assert endpoint_diffs(current, {key: BRIDGE[key], KEYS[0]: ("198.51.100.7", 1)}) == []


def test_a_re_add_removes_then_adds_the_peer_with_its_new_endpoint() -> None:
    """Kernel WireGuard's only way to handshake at once: the peer goes and comes back whole
    (allowed IPs, keepalive) on the new endpoint; other moves of the batch stay updates."""
    current = {p.public_key: p for p in NETMAP[:3]}
    k0, k1 = NETMAP[0].public_key, NETMAP[1].public_key
    moves = {k0: ("203.0.113.5", 51820), k1: ("127.0.0.1", 40001)}
    first, second = endpoint_diffs(current, moves, readd={k0})
    assert first.remove == (k0,) and [p.public_key for p in first.update] == [k1]
    assert second.add == (attrs.evolve(NETMAP[0], endpoint=("203.0.113.5", 51820)),)
    model = _model(NETMAP[:3])
    for diff in (first, second):
        for batch in peer_messages(current, diff):
            _apply(model, _wire(batch)[1])
        current = {**{k: v for k, v in current.items() if k not in diff.remove},
                   **{p.public_key: p for p in (*diff.add, *diff.update)}}
    assert model == _model([attrs.evolve(NETMAP[0], endpoint=moves[k0]),
                            attrs.evolve(NETMAP[1], endpoint=moves[k1]), NETMAP[2]])


def test_a_one_peer_change_touches_only_that_peers_routes() -> None:
    """Routes are counted per peer, so a change costs its own prefixes, not a recount of
    every peer; a prefix two peers route (a subnet behind two routers) stays while one does."""
    routers = [PeerConfig(p.public_key, [*p.allowed_ips, f"10.{n // 250}.{n % 250}.0/24"])
               for n, p in enumerate(NETMAP)]
    twin = PeerConfig(KEYS[0], ["10.0.1.0/24"])  # also routes routers[1]'s subnet
    refs: Counter = Counter()
    assert route_changes(refs, (), [*routers, twin], MESH) == routes_for(routers, MESH)
    assert set(refs) == routes_for(routers, MESH) and len(refs) == 500
    assert route_changes(refs, [routers[5]], (), MESH) == {ipaddress.ip_network("10.0.5.0/24")}
    assert ipaddress.ip_network("10.0.5.0/24") not in refs
    assert route_changes(refs, [twin], (), MESH) == {ipaddress.ip_network("10.0.1.0/24")}
    assert refs[ipaddress.ip_network("10.0.1.0/24")] == 1  # routers[1] still needs it
    assert route_changes(refs, [NETMAP[0]], [NETMAP[0]], MESH) == set()  # mesh: no routes


@settings(max_examples=examples(100), deadline=None)
@given(peer_sets, peer_sets)
def test_counted_routes_are_the_routes_of_the_peers_now(cur: dict, want: dict) -> None:
    before, after = _peers(cur), _peers(want)
    refs: Counter = Counter()
    route_changes(refs, (), before, MESH)
    touched = route_changes(refs, before, after, MESH)
    assert set(refs) == routes_for(after, MESH)
    assert routes_for(before, MESH) ^ routes_for(after, MESH) <= touched


def _done(seq: int, error: int = 0) -> bytes:
    """NLMSG_DONE (``error``: an NLMSG_ERROR with that errno) for dump ``seq``."""
    kind = 2 if error else 3
    return struct.pack("=IHHIIi", 20, kind, 2, seq, 0, -error)


def _parse(priv: PrivateKey, parts: list[list]) -> DeviceInfo:
    """``parts`` (each a list of peer nests) as the replies of dump 77, with an earlier
    dump's late part in front of the first (two messages in one ``recv``)."""
    seq = 77
    stale = _dump_part(priv, [{"attrs": [["WGPEER_A_PUBLIC_KEY", KEYS[9].b64()]]}], seq=76)
    raws = [_dump_part(priv, p, seq=seq) for p in parts]
    replies = [stale + raws[0], *raws[1:], _done(seq)]
    assert [dump_done(r, seq) for r in replies] == [False] * len(raws) + [True]
    return parse_dump(replies, seq)


def test_the_dump_parser_merges_split_peers_and_never_reads_the_private_key() -> None:
    """The kernel splits a big device over messages, repeating a peer whose allowed IPs
    did not fit (wireguard.h); the parser reads the bytes itself (pyroute2's decoder was
    most of an agent's CPU at 500 peers in the VM), ignores other dumps' parts, and has
    nowhere to put the private key."""
    priv = PrivateKey.generate()
    k = KEYS[3]
    first = {"attrs": [["WGPEER_A_PUBLIC_KEY", k.b64()],
                       ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::7", "port": 41641}],
                       ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 5e8}],
                       ["WGPEER_A_RX_BYTES", 1234], ["WGPEER_A_TX_BYTES", 2**40 + 99],
                       ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                       ["WGPEER_A_ALLOWEDIPS", [_ip("100.64.0.2/32"), _ip("10.1.0.0/16")]]]}
    cont = {"attrs": [["WGPEER_A_PUBLIC_KEY", k.b64()],
                      ["WGPEER_A_ALLOWEDIPS", [_ip("fd7a::2/128")]]]}
    never = {"attrs": [["WGPEER_A_PUBLIC_KEY", KEYS[4].b64()],
                       ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.10", "port": 1}]]}
    info = _parse(priv, [[first], [cont, never]])
    assert (info.ifindex, info.ifname, info.listen_port, info.fwmark) == (9, "wg0", 51820, 0x51)
    assert info.public_key == priv.public
    assert set(info.peers) == {k, KEYS[4]}  # not KEYS[9], the other dump's
    assert info.peers[k] == PeerStats(
        public_key=k, endpoint=("2001:db8::7", 41641), last_handshake=1700000000.5,
        rx_bytes=1234, tx_bytes=2**40 + 99, persistent_keepalive=25,
        allowed_ips=tuple(ipaddress.ip_network(n)
                          for n in ("100.64.0.2/32", "10.1.0.0/16", "fd7a::2/128")))
    never_seen = info.peers[KEYS[4]]
    assert never_seen.last_handshake is None and never_seen.endpoint == ("198.51.100.10", 1)
    assert (never_seen.rx_bytes, never_seen.allowed_ips) == (0, ())
    assert priv.b64() not in repr(info) and priv.raw().hex() not in repr(info)


@settings(max_examples=examples(100), deadline=None)
@given(peer_sets, st.integers(0, 2**63), st.integers(0, 2**40), st.integers(1, 3))
def test_the_dump_parser_reads_any_peers_however_split(spec: dict, hs: int, rx: int,
                                                       parts: int) -> None:
    config = _peers(spec)
    peers = [{"attrs": [["WGPEER_A_PUBLIC_KEY", p.public_key.b64()],
                        ["WGPEER_A_ENDPOINT", {"addr": p.endpoint[0], "port": p.endpoint[1]}],
                        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": hs % 2**40, "tv_nsec": 0}],
                        ["WGPEER_A_RX_BYTES", rx], ["WGPEER_A_TX_BYTES", hs],
                        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", p.persistent_keepalive],
                        ["WGPEER_A_ALLOWEDIPS", [_ip(str(n)) for n in p.allowed_ips]]]}
             for p in config]
    split = [peers[i::parts] for i in range(parts)] if peers else [[]]
    info = _parse(PrivateKey.generate(), split)
    assert info.peers == {p.public_key: PeerStats(
        public_key=p.public_key, endpoint=p.endpoint, last_handshake=(hs % 2**40) or None,
        rx_bytes=rx, tx_bytes=hs, allowed_ips=tuple(p.allowed_ips),
        persistent_keepalive=p.persistent_keepalive) for p in config}


def test_dump_request_is_what_pyroute2_encodes_and_errors_are_reported() -> None:
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["header"]["type"], msg["header"]["flags"] = 0x1d, 0x301
    msg["header"]["sequence_number"] = 5
    msg["attrs"].append(["WGDEVICE_A_IFINDEX", 9])
    msg.encode()
    assert dump_request(0x1d, 9, 5) == bytes(msg.data)
    with pytest.raises(BackendError, match="No such device"):
        parse_dump([_done(5, errno.ENODEV)], 5)
    assert parse_dump([b"\x05\x00", _done(5)], 5).peers == {}  # garbage: nothing, no crash
    malformed = struct.pack("=IHHII", 8, 0x20, 2, 5, 0)  # shorter than its own header
    assert dump_done(malformed, 5) and parse_dump([malformed], 5).peers == {}
    assert not dump_done(_done(4), 5)  # another dump's end
    with pytest.raises(BackendError, match="Input/output error"):  # an error with no code
        parse_dump([struct.pack("=IHHII", 16, 2, 2, 5, 0)], 5)
