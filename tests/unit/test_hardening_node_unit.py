"""Hardening of the node's own inputs (issue 14): the local API, the userspace packet
filter's IPv6 parsing, and the file-drop inbox."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from budget import examples
from droptools import BOB, LoopServer
from hypothesis import given, settings
from hypothesis import strategies as st
from polling import wait_for

from wgmesh.drop.inbox import Inbox
from wgmesh.drop.protocol import DropRefused
from wgmesh.drop.sender import send_file
from wgmesh.drop.server import DEFAULT_QUOTA
from wgmesh.keys import PrivateKey
from wgmesh.netmap import FilterRule
from wgmesh.node.agent import local_methods
from wgmesh.node.api import AsyncNode
from wgmesh.node.localapi import MAX_REQUEST, LocalAPIError, LocalAPIServer, call
from wgmesh.wireguard.crypto import dh_generate, dh_public
from wgmesh.wireguard.device import Device
from wgmesh.wireguard.filter import MAX_EXTENSIONS, PacketFilter, parse_flow

pytestmark = pytest.mark.unit

ME6, PEER6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
TCP, UDP, HOPOPT, ROUTING, FRAGMENT, DSTOPTS, AH = 6, 17, 0, 43, 44, 60, 51


# ---- item 6: a local-API call missing a parameter gets an answer -----------------------
@pytest.mark.parametrize(("method", "params", "answer"), [
    ("ping", {}, "ping: missing parameter 'peer'"),
    ("file_send", {"peer": "x"}, "file_send: missing parameter 'paths'"),
    ("file_send", {"peer": "x", "paths": "a.txt"}, "paths must be a list"),
    ("ping", {"peer": "x", "count": "many"}, "ping: bad parameter"),
])
def test_local_api_bad_params_get_a_clear_error(tmp_path: Path, method: str,
                                                params: dict[str, object], answer: str) -> None:
    async def run() -> None:
        node = AsyncNode("http://127.0.0.1:9", state_dir=tmp_path / "state")
        api = LocalAPIServer(tmp_path / "api.sock", local_methods(node))
        await api.start()
        try:
            with pytest.raises(LocalAPIError, match=answer):
                await asyncio.to_thread(call, method, params, path=tmp_path / "api.sock",
                                        timeout=10)
        finally:
            await api.close()
    asyncio.run(run())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=20)
request_lines = st.one_of(
    st.binary(max_size=300),  # not JSON, not UTF-8, no newline, ...
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"method": st.sampled_from(["echo", "nope"]) | json_values},
                          optional={"params": json_values}).map(
        lambda v: json.dumps(v).encode()),
    st.integers(1, 40_000).map(lambda n: b"[" * n + b"]" * n),  # nested past the stack
    st.integers(1, 3).map(lambda n: b"x" * (n * MAX_REQUEST)),  # past the line limit
)


@settings(max_examples=examples(200))
@given(line=request_lines)
def test_fuzz_local_api_answers_every_request_once(line: bytes) -> None:
    """The local API's request codec: whatever line arrives, one JSON answer, ``result`` or
    ``error``, and no logged error (a traceback per bad request would flood the logs)."""
    async def echo(params: dict[str, object]) -> object:
        return params

    async def run(path: Path) -> bytes:
        api = LocalAPIServer(path, {"echo": echo})
        await api.start()
        try:
            r, w = await asyncio.open_unix_connection(str(path), limit=4 * MAX_REQUEST)
            w.write(line + b"\n")
            await w.drain()
            answer = await asyncio.wait_for(r.read(), 10)
            w.close()
            return answer
        finally:
            await api.close()

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            answer = asyncio.run(run(Path(tmp) / "api.sock"))
    finally:
        logging.getLogger().removeHandler(handler)
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer[:200]
    reply = json.loads(answer)
    assert isinstance(reply, dict) and len(reply) == 1 and set(reply) <= {"result", "error"}
    assert not errors, [e.getMessage() for e in errors]
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        req = None
    if b"\n" not in line and isinstance(req, dict) and req.get("method") == "echo" \
            and isinstance(req.get("params") or {}, dict):
        assert reply == {"result": req.get("params") or {}}


# ---- item 9: the filter walks IPv6 extension headers -----------------------------------
def ipv6(src: str, dst: str, chain: list[tuple[int, bytes]], proto: int, sport: int,
         dport: int) -> bytes:
    """An IPv6 packet: ``chain`` is (header type, header bytes) before the upper header."""
    nexts = [t for t, _ in chain] + [proto]
    body = b"".join(bytes([nexts[i + 1]]) + h[1:] for i, (_t, h) in enumerate(chain))
    body += struct.pack("!HH", sport, dport) + bytes(16)
    return (struct.pack("!IHBB", 6 << 28, len(body), nexts[0], 64)
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + body)


def opts(units: int = 0) -> bytes:
    """A hop-by-hop / routing / destination-options header of ``units`` extra 8-byte units."""
    return bytes([0, units]) + bytes(6 + 8 * units)


AH_HDR = bytes([0, 4]) + bytes(22)  # (4 + 2) * 4 = 24 bytes
FIRST_FRAG = bytes([0, 0, 0, 1]) + bytes(4)  # offset 0, more fragments
LATER_FRAG = bytes([0, 0, 0x05, 0x01]) + bytes(4)  # offset 160 bytes

CHAINS = {
    "hop-by-hop": [(HOPOPT, opts())],
    "routing": [(ROUTING, opts(1))],
    "first fragment": [(FRAGMENT, FIRST_FRAG)],
    "destination options": [(DSTOPTS, opts(2))],
    "AH": [(AH, AH_HDR)],
    "all of them": [(HOPOPT, opts()), (DSTOPTS, opts()), (ROUTING, opts()),
                    (FRAGMENT, FIRST_FRAG), (AH, AH_HDR), (DSTOPTS, opts(1))],
}


@pytest.mark.parametrize("chain", CHAINS.values(), ids=CHAINS.keys())
def test_ipv6_traffic_behind_extension_headers_is_judged_by_its_real_port(
        chain: list[tuple[int, bytes]]) -> None:
    f = PacketFilter([FilterRule(src=(f"{PEER6}/128",), dst=(f"{ME6}/128",),
                                 ports=((80, 80),), proto="tcp")])
    assert parse_flow(ipv6(PEER6, ME6, chain, TCP, 40000, 80))[::2] == (TCP, 40000, 80)
    assert f.inbound(ipv6(PEER6, ME6, chain, TCP, 40000, 80), now=0)
    assert not f.inbound(ipv6(PEER6, ME6, chain, TCP, 40000, 22), now=0)
    assert not f.inbound(ipv6(PEER6, ME6, chain, UDP, 40000, 80), now=0)


def test_a_flow_we_start_behind_an_extension_header_opens_only_its_replies() -> None:
    f = PacketFilter([])
    hbh = [(HOPOPT, opts())]
    f.outbound(ipv6(ME6, PEER6, hbh, UDP, 5353, 9999), now=0)
    assert f.inbound(ipv6(PEER6, ME6, [(DSTOPTS, opts())], UDP, 9999, 5353), now=1)
    # before the walk every packet behind a header was one flow (proto 0, ports 0), so
    # this one sent by us opened the door to anything the peer sent behind a header
    assert not f.inbound(ipv6(PEER6, ME6, hbh, TCP, 1, 22), now=1)
    assert not f.inbound(ipv6(PEER6, ME6, hbh, UDP, 9999, 5354), now=1)


def test_hostile_extension_chains_are_malformed() -> None:
    f = PacketFilter([FilterRule(src=(f"{PEER6}/128",), dst=(f"{ME6}/128",),
                                 ports=((80, 80),), proto="tcp")])
    too_long = [(DSTOPTS, opts())] * (MAX_EXTENSIONS + 1)
    truncated = ipv6(PEER6, ME6, [(HOPOPT, opts(3))], TCP, 1, 80)[:48]
    for pkt in (ipv6(PEER6, ME6, too_long, TCP, 1, 80), truncated):
        assert parse_flow(pkt) is None
        assert not f.inbound(pkt, now=0)
    assert f.counters["malformed"] == 2
    # a later fragment carries no ports, as for IPv4
    later = parse_flow(ipv6(PEER6, ME6, [(FRAGMENT, LATER_FRAG)], TCP, 1, 80))
    assert later is not None and later[0] == TCP and later[2] == later[4] == -1


# ---- item 10: file drop cannot fill the receiver's disk --------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[list[LoopServer]]:
    servers: list[LoopServer] = []
    yield servers
    for s in servers:
        s.close()


def _offset(s: LoopServer, name: str, size: int) -> None:
    """Ask for the resume offset of an offer: the receiver admits it or refuses."""
    from wgmesh.drop.sender import Connection, read_response
    c = Connection("127.0.0.1", s.server.port, 10, None)
    try:
        c.putrequest("GET", f"/v1/offset?name={name}&size={size}&sha256={'0' * 64}")
        c.endheaders()
        status, body = read_response(c)
    finally:
        c.close()
    if status != 200:
        raise DropRefused(status, str(body.get("error")))


def test_an_inbox_has_a_quota_by_default(tmp_path: Path, server: list[LoopServer]) -> None:
    server.append(s := LoopServer(tmp_path / "inbox"))
    _offset(s, "small", 1 << 20)
    with pytest.raises(DropRefused, match="inbox quota") as e:  # whatever the disk holds
        _offset(s, "huge", DEFAULT_QUOTA + 1)
    assert e.value.status == 413


def _plant_partial(inbox: Inbox, sender: str, name: str, size: int, age: float = 0) -> Path:
    part = inbox.partial_path(sender, name, 1 << 30, "0" * 64)
    part.write_bytes(b"p" * size)
    os.utime(part, (time.time() - age, time.time() - age))
    return part


def test_one_senders_abandoned_partials_cannot_lock_out_the_others(
        tmp_path: Path, server: list[LoopServer]) -> None:
    server.append(s := LoopServer(tmp_path / "inbox", quota=4000))
    alice = PrivateKey.generate().public.b64()
    _plant_partial(s.server.inbox, BOB.node_key.b64(), "bob-1", 700)
    _plant_partial(s.server.inbox, alice, "alice-1", 900)
    # bob's unfinished 700 bytes leave him room for 300 more, not 301
    _offset(s, "bob-2", 300)
    with pytest.raises(DropRefused, match="per-sender quota") as e:
        _offset(s, "bob-2", 301)
    assert e.value.status == 413
    # a single offer (nothing else unfinished) may still use what the quota has left
    shutil.rmtree(s.server.inbox.partial_dir)
    s.server.inbox.create()
    _plant_partial(s.server.inbox, alice, "alice-1", 900)
    _offset(s, "bob-big", 3100)
    with pytest.raises(DropRefused, match="inbox quota"):
        _offset(s, "bob-big", 3101)


def test_abandoned_partials_are_pruned_while_running(tmp_path: Path,
                                                     server: list[LoopServer]) -> None:
    server.append(s := LoopServer(tmp_path / "inbox", partial_max_age=60, prune_interval=0.1))
    inbox = s.server.inbox
    fresh = _plant_partial(inbox, BOB.node_key.b64(), "fresh", 10)
    old = _plant_partial(inbox, BOB.node_key.b64(), "old", 10, age=120)
    wait_for(lambda: not old.exists(), timeout=10, what="the old partial pruned")
    assert fresh.exists()
    data = os.urandom(3000)  # and transfers still complete while the pruner runs
    src = tmp_path / "after.bin"
    src.write_bytes(data)
    assert send_file("127.0.0.1", src, port=s.server.port).name == "after.bin"
    assert hashlib.sha256((inbox.dir / "after.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()


def test_receive_into_a_dir_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """Across file systems the move copies through a temporary file in DIR; a symlink
    planted under any name there must not redirect that copy."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        inbox = Inbox(Path(shm) / "inbox")
        inbox.create()
        if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("needs the inbox and DIR on two file systems")
        (inbox.dir / "report.txt").write_bytes(b"from a peer")
        dest = tmp_path / "dest"
        dest.mkdir()
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        for name in (".report.txt.wgmesh-tmp", "report.txt"):
            (dest / name).symlink_to(victim)
        moved = inbox.move_to(dest)
        assert victim.read_bytes() == b"precious"
        assert [m.name for m in moved] == ["report (1).txt"]
        assert moved[0].read_bytes() == b"from a peer" and not moved[0].is_symlink()
        assert sorted(os.listdir(dest)) == [".report.txt.wgmesh-tmp", "report (1).txt",
                                            "report.txt"]


# ---- item 14: the device's endpoint source cache (sans-I/O part) -----------------------
def test_only_authenticated_packets_choose_the_address_replies_leave_from() -> None:
    a_priv, b_priv = dh_generate(), dh_generate()
    a, b = Device(a_priv), Device(b_priv)
    pa, pb = a.add_peer(dh_public(b_priv)), b.add_peer(dh_public(a_priv))
    a.allowed.insert("10.0.0.2/32", pa)
    b.allowed.insert("10.0.0.1/32", pb)
    addr_a, addr_b = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
    second, other = ipaddress.ip_address("192.0.2.22").packed, bytes(4)
    a.set_endpoint(pa, addr_b)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 21, 0, 0, 64, 17, 0,
                      ipaddress.ip_address("10.0.0.1").packed,
                      ipaddress.ip_address("10.0.0.2").packed)
    a.send(hdr + b"x", now=1000)
    [(initiation, _)] = a.drain()[0]
    b.arrived_at = other  # noise from a stranger: no source is recorded for it
    b.receive(bytes(len(initiation)), ("198.51.100.9", 1), 1000)
    b.receive(b"\x01" + bytes(147), ("198.51.100.9", 1), 1000)
    assert b.sources == {}
    b.arrived_at = second  # a's initiation reached b's second address
    b.receive(initiation, addr_a, 1000)
    assert b.sources == {addr_a: second} and pb.endpoint == addr_a
    [(_response, dest)] = b.drain()[0]
    assert dest == addr_a
    b.arrived_at = other  # a replay is not authenticated again: the source stays
    b.receive(initiation, addr_a, 1001)
    assert b.drops["replayed_initiation"] == 1 and b.sources == {addr_a: second}
    b.set_endpoint(pb, addr_a)  # configured by hand: the routing table picks again
    assert b.sources == {}
