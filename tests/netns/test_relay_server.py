"""RelayServer and RelayClient on loopback: forwarding, presence, misbehaviour, mesh, TLS.

Real sockets and a real server in the test's event loop; every wait is a poll
with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_for
from stuntools import query

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import (
    MAGIC,
    MAX_FRAME,
    NONCE_LEN,
    FrameDecoder,
    FrameError,
    FrameType,
    encode_frame,
    frame_client_hello,
    frame_send,
    frame_server_hello,
    frame_server_info,
    open_client_hello,
    parse_server_hello,
)
from wgmesh.relaynet.client import RelayClient, RelayClientThread
from wgmesh.relaynet.connection import RelayConnectError, RelayConnection
from wgmesh.relaynet.server import RelayServer

MESH_KEY = bytes(range(32))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def until(pred: Callable[[], object], timeout: float = 10.0,
                what: str | Callable[[], str] = "") -> None:
    """polling.wait_for on a worker thread, so the loop under test runs while it polls
    (``pred`` only reads: counters, dicts and lists the loop fills)."""
    await asyncio.to_thread(wait_for, pred, timeout, what or str(pred), 0.01)


async def serving(**kw: Any) -> tuple[RelayServer, str]:
    srv = RelayServer(**kw)
    await srv.start("127.0.0.1", 0, stun_port=0)
    return srv, f"http://127.0.0.1:{srv.port}"


class Inbox:
    def __init__(self) -> None:
        self.packets: list[tuple[Key, bytes]] = []
        self.peers: list[tuple[Key, bool, int]] = []

    def recv(self, src: Key, data: bytes) -> None:
        self.packets.append((src, data))

    def peer(self, key: Key, present: bool, reason: int) -> None:
        self.peers.append((key, present, reason))


async def http_get(port: int, path: str, extra: str = "") -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def raw_upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A hand-driven client up to SERVER_HELLO; returns the hello body."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: wgmesh-relay\r\nConnection: Upgrade\r\n\r\n")
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    hdr = await r.readexactly(5)
    body = await r.readexactly(int.from_bytes(hdr[1:], "big"))
    return r, w, body


async def closed_by_server(r: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(5):
            while await r.read(65536):
                pass
    except (ConnectionError, TimeoutError):
        return True
    return True


def test_forwarding_metrics_and_presence() -> None:
    async def main() -> None:
        srv, url = await serving()
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        ia, ib = Inbox(), Inbox()
        a = await RelayConnection.open(url, ka, on_recv=ia.recv, on_peer=ia.peer)
        b = await RelayConnection.open(url, kb, on_recv=ib.recv, on_peer=ib.peer)
        a.send(kb.public, b"to b")
        b.send(ka.public, b"to a")
        await until(lambda: ia.packets and ib.packets)
        assert ib.packets == [(ka.public, b"to b")] and ia.packets == [(kb.public, b"to a")]
        assert await a.ping() > 0
        # unknown destination: dropped; a never heard from it, so it is told nothing
        stranger = PrivateKey.generate().public
        a.send(stranger, b"?")
        await until(lambda: srv.drops["unknown_dest"] == 1)
        # b leaves: a (who talked with b both ways) hears it, and that b is not here
        b.close()
        await until(lambda: (kb.public, False, 0) in ia.peers, what="PEER_GONE")
        for _ in range(50):
            a.send(kb.public, b"?")
        await until(lambda: srv.drops["unknown_dest"] == 51)
        await until(lambda: (kb.public, False, 1) in ia.peers, what="PEER_GONE not-here")
        assert ia.peers.count((kb.public, False, 1)) == 1  # one notice, not one per packet
        # b returns: a hears that too
        b = await RelayConnection.open(url, kb, on_recv=ib.recv)
        await until(lambda: (kb.public, True, 0) in ia.peers, what="PEER_PRESENT")
        assert not [p for p in ia.peers if p[0] == stranger]
        status, body = await http_get(srv.port, "/metrics")
        m = json.loads(body)
        assert status == 200 and m["clients"] == 2
        assert m["counters"]["packets_out"] == 2 and m["counters"]["bytes_out"] == 8
        assert m["drops"]["unknown_dest"] == 51
        assert (await http_get(srv.port, "/health")) == (200, b"ok")
        a.close()
        b.close()
        await srv.close()

    run(main())


def test_newest_connection_wins() -> None:
    async def main() -> None:
        srv, url = await serving()
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        old_in, new_in = Inbox(), Inbox()
        old = await RelayConnection.open(url, kb, on_recv=old_in.recv)
        new = await RelayConnection.open(url, kb, on_recv=new_in.recv)
        await until(lambda: old.closed, what="old connection closed")
        assert old.close_reason.startswith("replaced")
        a = await RelayConnection.open(url, ka)
        a.send(kb.public, b"x")
        await until(lambda: new_in.packets)
        assert not old_in.packets and srv.drops["replaced"] == 1 and len(srv._clients) == 2
        for c in (a, new):
            c.close()
        await srv.close()

    run(main())


def test_bad_http_and_unauthenticated_frames() -> None:
    async def main() -> None:
        srv, url = await serving()
        assert (await http_get(srv.port, "/nope"))[0] == 404
        assert (await http_get(srv.port, "/relay"))[0] == 426  # no Upgrade header
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
        assert await closed_by_server(r)
        # a SEND before authenticating: closed, counted, nothing delivered
        victim_in = Inbox()
        kv = PrivateKey.generate()
        victim = await RelayConnection.open(url, kv, on_recv=victim_in.recv)
        r, w, _ = await raw_upgrade(srv.port)
        w.write(frame_send(kv.public, b"spoof"))
        assert await closed_by_server(r)
        # a hello sealed by one key but claiming another: refused
        r, w, hello = await raw_upgrade(srv.port)
        server_key, challenge = parse_server_hello(hello)
        forged = bytearray(frame_client_hello(PrivateKey.generate(), server_key, challenge,
                                              nonce=os.urandom(NONCE_LEN)))
        forged[5 + 8:5 + 40] = kv.public.raw
        w.write(bytes(forged))
        assert await closed_by_server(r)
        # an oversize frame header after authenticating
        bad = await RelayConnection.open(url, PrivateKey.generate())
        assert bad.transport is not None
        bad.transport.write(bytes((FrameType.SEND,)) + (MAX_FRAME + 1).to_bytes(4, "big"))
        await until(lambda: bad.closed, what="oversize close")
        await until(lambda: srv.drops["bad_frame"] == 1)
        assert srv.drops["unauthenticated"] == 1 and srv.drops["auth_failed"] == 1
        assert srv.drops["bad_http"] >= 2
        assert not victim_in.packets and len(srv._clients) == 1
        victim.close()
        await srv.close()

    run(main())


def test_half_open_connections_time_out() -> None:
    async def main() -> None:
        srv, url = await serving(handshake_timeout=0.5, idle_timeout=1.0, keepalive=0.4)
        _, w = await asyncio.open_connection("127.0.0.1", srv.port)  # says nothing
        _, w2, _ = await raw_upgrade(srv.port)  # upgrades, never authenticates
        # an authenticated client that goes silent (its keepalive timer stopped)
        mute = await RelayConnection.open(url, PrivateKey.generate(), keepalive=3600)
        await until(lambda: srv.drops["handshake_timeout"] == 2, what="handshake timeouts")
        await until(lambda: srv.drops["idle_timeout"] == 1, what="idle timeout")
        await until(lambda: mute.closed, what="the silent client sees the relay hang up")
        assert not srv._clients
        # a live client is kept across several idle periods
        live = await RelayConnection.open(url, PrivateKey.generate(), keepalive=0.2)
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await until(lambda: time.monotonic() - t0 > 2.5, timeout=5)
        assert not live.closed and srv.drops["idle_timeout"] == 1
        for x in (w, w2):
            x.close()
        live.close()
        await srv.close()

    run(main())


def test_slow_client_never_stalls_others() -> None:
    async def main() -> None:
        srv, url = await serving(queue_frames=64, write_timeout=1.0)
        ka, kb, ks = (PrivateKey.generate() for _ in range(3))
        ib = Inbox()
        a = await RelayConnection.open(url, ka, queue_frames=100000)
        b = await RelayConnection.open(url, kb, on_recv=ib.recv)
        slow = await RelayConnection.open(url, ks)
        assert slow.transport is not None
        slow.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.transport.pause_reading()  # a reader that stopped reading
        packet = bytes(1400)
        n_packets = 10000  # 14 MB at the slow reader: past every kernel and transport buffer
        for i in range(n_packets):
            a.send(ks.public, packet)
            a.send(kb.public, i.to_bytes(4, "big"))
            if i % 100 == 0:
                await a.drain()
                await asyncio.sleep(0)
        await until(lambda: len(ib.packets) == n_packets, timeout=30, what="b got everything")
        assert [int.from_bytes(d, "big") for _, d in ib.packets] == list(range(n_packets))
        await until(lambda: srv.drops["write_timeout"] == 1, what="slow client cut off")
        assert srv.drops["queue_full"] > 0, srv.drops
        assert ks.public.raw not in srv._clients
        for c in (a, b, slow):
            c.close()
        await srv.close()

    run(main())


def test_stalled_readers_share_one_queue_budget() -> None:
    """Issue 14 item 1: each stalled reader holds at most queue_bytes, all of them together
    at most queue_budget; both are freed with the connections."""
    async def main() -> None:
        srv, url = await serving(queue_bytes=128 * 1024, queue_budget=256 * 1024,
                                 write_timeout=30.0)
        sender = await RelayConnection.open(url, PrivateKey.generate(), queue_frames=100000)
        keys = [PrivateKey.generate() for _ in range(4)]
        stalled = [await RelayConnection.open(url, k) for k in keys]
        for c in stalled:
            assert c.transport is not None
            c.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.transport.pause_reading()
        for _ in range(150):  # ~40 MB: past every kernel buffer of the four
            for k in keys:
                sender.send(k.public, bytes(64 * 1024 - 100))
            await sender.drain()
            await asyncio.sleep(0)  # a yield: the relay forwards this round
            assert srv.queue_budget.used <= 256 * 1024
            assert all(c.queued_bytes <= 128 * 1024 for c in srv._clients.values())
        await until(lambda: srv.drops["queue_budget"] > 0, what=lambda: f"{srv.drops}")
        # four stalled readers would hold 2 frames each by their own cap: the budget binds
        assert 128 * 1024 < srv.queue_budget.used <= 256 * 1024
        for c in stalled:
            c.close()
        await until(lambda: len(srv._clients) == 1, what="the stalled readers gone")
        assert srv.queue_budget.used == 0
        sender.close()
        await srv.close()

    run(main())


def test_rate_limit_drops_the_excess() -> None:
    async def main() -> None:
        srv, url = await serving(rate_limit_bps=8 * 200_000)  # 200 kB/s, burst 128 KiB
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        ib = Inbox()
        a = await RelayConnection.open(url, ka, queue_frames=100000)
        await RelayConnection.open(url, kb, on_recv=ib.recv)
        for _ in range(1000):  # 1.4 MB at once
            a.send(kb.public, bytes(1400))
        await until(lambda: srv.counters["packets_in"] == 1000)
        assert 90 <= len(ib.packets) <= 200
        assert srv.drops["rate_limited"] == 1000 - srv.counters["packets_out"]
        await srv.close()

    run(main())


def test_stun_responder() -> None:
    with RelayServer(host="127.0.0.1", stun_port=0) as srv:  # on its own loop thread
        addr, rtt = query(("127.0.0.1", srv.stun_port), rto=0.05)
        assert addr[0] == "127.0.0.1" and rtt > 0
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"not stun", ("127.0.0.1", srv.stun_port))
        s.close()
        wait_for(lambda: srv.drops["stun_invalid"] == 1, 10, "the invalid datagram counted")
        assert srv.counters["stun_replies"] >= 1  # more if the client had to retransmit
        assert srv.metrics()["counters"]["stun_requests"] >= 2
    assert srv._stun is not None and srv._stun.transport is None  # closed on exit


def test_mesh_forwards_one_hop_and_checks_the_key() -> None:
    async def main() -> None:
        s1, u1 = await serving(mesh_key=MESH_KEY)
        s2, u2 = await serving(mesh_key=MESH_KEY, mesh_peers=[u1])
        s1.add_mesh_peer(u2)
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        ia, ib = Inbox(), Inbox()
        a = await RelayConnection.open(u1, ka, on_recv=ia.recv)
        b = await RelayConnection.open(u2, kb, on_recv=ib.recv)
        await until(lambda: kb.public.raw in s1.mesh.remote and ka.public.raw in s2.mesh.remote,
                    what="presence over the mesh")
        a.send(kb.public, b"a->b")
        b.send(ka.public, b"b->a")
        await until(lambda: ia.packets and ib.packets, what="mesh delivery")
        assert ib.packets == [(ka.public, b"a->b")] and ia.packets == [(kb.public, b"b->a")]
        assert s1.counters["packets_mesh_out"] == 1 and s2.counters["packets_mesh_in"] == 1
        # b leaves s2: s1 forgets it
        b.close()
        await until(lambda: kb.public.raw not in s1.mesh.remote)
        # a relay with the wrong mesh key is refused
        s3 = RelayServer(mesh_key=bytes(32), mesh_peers=[u1])
        await s3.start("127.0.0.1", 0)
        await until(lambda: s1.drops["mesh_auth_failed"] >= 1, what="mesh refusal")
        assert s3.metrics()["mesh_links_up"] == 0
        # and a node may not present a mesh key to get FORWARD powers
        with pytest.raises(RelayConnectError, match="mesh key mismatch"):
            await RelayConnection.open(u1, PrivateKey.generate(), mesh_key=bytes(32))
        a.close()
        for s in (s3, s2, s1):
            await s.close()

    run(main())


class FakeRelay:
    """Speaks the relay protocol at an address, as an impostor would: presents
    ``presented`` (its own key unless told to claim another's), records every byte
    it is sent, opens what it can, and answers a hello it can open with a
    SERVER_INFO sealed by its own key (it holds no mesh key, so no mesh proof)."""

    def __init__(self, key: PrivateKey, presented: Key | None = None) -> None:
        self.key = key
        self.presented = presented or key.public
        self.received = bytearray()
        self.opened: list[dict[str, Any]] = []  # hello infos it could read
        self.hellos = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            self.received += await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: wgmesh-relay\r\n"
                    b"Connection: Upgrade\r\n\r\n")
            challenge = os.urandom(32)
            w.write(frame_server_hello(self.presented, challenge))
            dec = FrameDecoder()
            while data := await r.read(65536):
                self.received += data
                for t, body in dec.feed(data):
                    if t != FrameType.CLIENT_HELLO:
                        continue
                    self.hellos += 1
                    try:
                        hello = open_client_hello(self.key, challenge, body)
                    except FrameError:
                        w.write(encode_frame(FrameType.SERVER_INFO, b'{"v": 2}'))
                        continue
                    self.opened.append(hello.info)
                    w.write(frame_server_info(self.key, hello, {"v": 2},
                                              nonce=os.urandom(NONCE_LEN)))
        w.close()

    def learned(self, secret: bytes) -> bool:
        """Did the secret reach it in any form it could read?"""
        seen = bytes(self.received) + json.dumps(self.opened).encode()
        return secret in seen or secret.hex().encode() in seen

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_fake_relay_at_a_mesh_peer_address_learns_nothing() -> None:
    """Issue 13 §3: whoever answers at a mesh peer's address never obtains the mesh key,
    and is refused: pinned (it names another key: refused before the hello), unpinned
    (it can read the hello sealed to its own key, which holds only a one-time proof,
    and cannot prove the mesh key back), or replaying the real relay's key (it cannot
    open the hello, nor prove the key)."""
    async def main() -> None:
        real = PrivateKey.generate()
        cases = {"pinned": (FakeRelay(PrivateKey.generate()), f"#{real.public.b64()}"),
                 "unpinned": (FakeRelay(PrivateKey.generate()), ""),
                 "claims the real key": (FakeRelay(PrivateKey.generate(), real.public),
                                         f"#{real.public.b64()}")}
        relays = []
        for fake, pin in cases.values():
            relays.append(await serving(mesh_key=MESH_KEY,
                                        mesh_peers=[await fake.start() + pin]))
        await until(lambda: all(srv.mesh.links[0].last_error for srv, _ in relays),
                    what="every fake refused")
        errors = [srv.mesh.links[0].last_error for srv, _ in relays]
        assert "presented key" in errors[0] and "pinned" in errors[0]
        assert "does not hold the region's mesh key" in errors[1]
        assert "did not prove the key" in errors[2]
        for name, (fake, _) in cases.items():
            assert not fake.learned(MESH_KEY), name
        assert cases["pinned"][0].hellos == 0  # refused before sending anything sealed
        assert "mesh_proof" in cases["unpinned"][0].opened[0]  # a proof, not the key
        for srv, _ in relays:
            assert srv.metrics()["mesh_links_up"] == 0 and not srv.mesh.remote
            await srv.close()
        for fake, _ in cases.values():
            await fake.close()

    run(main())


def test_client_refuses_a_relay_that_cannot_prove_its_key() -> None:
    async def main() -> None:
        srv, url = await serving()
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        # the relay's real key, pinned: accepted (and by the region client too)
        ok = await RelayConnection.open(f"{url}#{srv.public_key.b64()}", ka)
        assert ok.server_key == srv.public_key
        async with RelayClient(kb, {1: [f"{url}#{srv.public_key.b64()}"]}) as b:
            assert await b.ping() > 0
        # a wrong expected key: refused with a clear reason, and nothing accepted
        wrong = PrivateKey.generate().public
        with pytest.raises(RelayConnectError, match=re.escape(
                f"presented key {srv.public_key}, not its pinned key {wrong}")):
            await RelayConnection.open(f"{url}#{wrong.b64()}", kb)
        before = srv.counters["clients_accepted"]
        c = RelayClient(kb, [f"{url}#{wrong.b64()}"], backoff_min=0.05)
        with pytest.raises(RelayConnectError):
            await c.start(wait=1.0)
        await c.close()
        assert srv.counters["clients_accepted"] == before
        # an impostor naming the real key cannot prove it
        fake = FakeRelay(PrivateKey.generate(), srv.public_key)
        fake_url = await fake.start()
        with pytest.raises(RelayConnectError, match="did not prove the key"):
            await RelayConnection.open(f"{fake_url}#{srv.public_key.b64()}", ka)
        with pytest.raises(RelayConnectError, match="did not prove the key"):
            await RelayConnection.open(fake_url, ka)  # unpinned: still its own claim
        ok.close()
        await fake.close()
        await srv.close()

    run(main())


def test_nested_hello_is_refused_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 item 6: a sealed hello whose info is "[[[[..." gets a CLOSE with the reason;
    nothing is logged at ERROR (it used to log a full traceback on every try)."""
    from nacl.public import Box
    from nacl.public import PublicKey as NaclPublicKey

    async def main() -> None:
        srv, url = await serving()
        for _ in range(3):
            r, w, hello = await raw_upgrade(srv.port)
            server_key, challenge = parse_server_hello(hello)
            node = PrivateKey.generate()
            sealed = Box(node.nacl(), NaclPublicKey(server_key.raw)).encrypt(
                challenge + b"[" * 4000, os.urandom(NONCE_LEN))
            w.write(encode_frame(FrameType.CLIENT_HELLO, MAGIC + node.public.raw + sealed))
            hdr = await r.readexactly(5)
            assert hdr[0] == FrameType.CLOSE
            reason = (await r.readexactly(int.from_bytes(hdr[1:], "big"))).decode()
            assert reason == "hello refused: CLIENT_HELLO info is nested too deeply"
            assert await closed_by_server(r)
        assert srv.drops["auth_failed"] == 3 and "internal_error" not in srv.drops
        # the relay still serves
        await (await RelayConnection.open(url, PrivateKey.generate())).ping()
        await srv.close()

    with caplog.at_level(logging.DEBUG, logger="wgmesh"):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_strangers_cannot_watch_keys_come_and_go() -> None:
    """Issue 14 item 13: presence only for keys a client talked with both ways."""
    async def main() -> None:
        srv, url = await serving()
        kk, kp, kw = (PrivateKey.generate() for _ in range(3))
        ip, iw = Inbox(), Inbox()
        target = await RelayConnection.open(url, kk)
        peer = await RelayConnection.open(url, kp, on_peer=ip.peer)
        watcher = await RelayConnection.open(url, kw, on_peer=iw.peer)
        watcher.send(kk.public, b"hello?")  # a stranger registers interest in the target
        peer.send(kk.public, b"hi")  # a real peer talks with it both ways
        target.send(kp.public, b"hi")
        await until(lambda: srv.counters["packets_out"] == 3)
        target.close()
        await until(lambda: (kk.public, False, 0) in ip.peers, what="the peer hears it leave")
        watcher.send(kk.public, b"still there?")
        peer.send(kk.public, b"still there?")
        await until(lambda: (kk.public, False, 1) in ip.peers, what="not-here to the peer")
        target = await RelayConnection.open(url, kk)
        await until(lambda: (kk.public, True, 0) in ip.peers, what="the peer hears it return")
        await watcher.ping()  # everything sent to the watcher before this has arrived
        assert iw.peers == [], iw.peers
        for c in (target, peer, watcher):
            c.close()
        await srv.close()

    run(main())


def test_metrics_can_be_restricted() -> None:
    async def main() -> None:
        srv, _ = await serving()  # default: this host only (loopback here)
        assert (await http_get(srv.port, "/metrics"))[0] == 200
        await srv.close()
        srv, _ = await serving(metrics_allow=["192.0.2.0/24"])
        status, body = await http_get(srv.port, "/metrics")
        assert status == 403 and b"server_key" not in body
        assert (await http_get(srv.port, "/health")) == (200, b"ok")
        assert srv.drops["metrics_forbidden"] == 1
        await srv.close()
        with pytest.raises(WgmeshError, match="metrics allow-list"):
            RelayServer(metrics_allow=["not-a-cidr"])

    run(main())


def _self_signed(tmp: Path, ip: str | None = None) -> tuple[Path, Path]:
    """A throwaway CA-less certificate for "localhost" (and ``ip``), as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost")]
                + ([x509.IPAddress(ipaddress.ip_address(ip))] if ip else [])), False)
            .sign(key, hashes.SHA256()))
    tmp.mkdir(parents=True, exist_ok=True)
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def test_tls_and_relay_client(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)

    async def main() -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        srv = RelayServer()
        await srv.start("127.0.0.1", 0, ssl=server_ctx)
        url = f"https://localhost:{srv.port}"
        client_ctx = ssl.create_default_context(cafile=str(cert))
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        async with RelayClient(ka, [url], ssl=client_ctx) as a, \
                RelayClient(kb, [url], ssl=client_ctx) as b:
            assert await a.send(kb.public, b"over tls")
            async for src, data in b:
                assert (src, data) == (ka.public, b"over tls")
                break
            assert await b.ping() > 0
            assert a.status()["home_region"] == 1
        # an untrusted certificate is refused
        with pytest.raises(RelayConnectError):
            await RelayConnection.open(url, ka, timeout=3)
        await srv.close()

    run(main())


def test_client_fails_over_within_the_region() -> None:
    async def main() -> None:
        s1, u1 = await serving(mesh_key=MESH_KEY)
        s2, u2 = await serving(mesh_key=MESH_KEY, mesh_peers=[u1])
        s1.add_mesh_peer(u2)
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        got: list[bytes] = []
        # b is on s2; a prefers s1 (listed first), with s2 as its fallback
        b = RelayClient(kb, [u2, u1], on_packet=lambda s, d: got.append(d))
        a = RelayClient(ka, [u1, u2], backoff_min=0.05)
        await b.start()
        await a.start()
        assert a.status()["links"][1]["url"].startswith(u1)
        await until(lambda: ka.public.raw in s2.mesh.remote or (bool(
            a.send_nowait(kb.public, b"probe")) and False), timeout=0.1) if False else None
        await until(lambda: ka.public.raw in s2.mesh.remote and kb.public.raw in s1.mesh.remote,
                    what="presence over the mesh")
        await a.send(kb.public, b"via mesh")
        await until(lambda: b"via mesh" in got)
        await s1.close()  # a's relay dies
        await until(lambda: ka.public.raw in s2._clients, what="a moved to s2")
        await a.send(kb.public, b"after failover")
        await until(lambda: b"after failover" in got)
        assert a.status()["links"][1]["connects"] == 2
        await a.close()
        await b.close()
        await s2.close()

    run(main())


def test_client_leaves_a_connection_whose_address_is_gone() -> None:
    """A roam: the host lost the address a relay connection goes out from, so the relay's
    answers cannot come back. The client dials again at once, not at its idle timeout; a
    change that keeps the connection's address leaves it alone."""
    async def main() -> None:
        srv, url = await serving()
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        got: list[bytes] = []
        async with RelayClient(ka, [url], idle_timeout=600) as a, \
                RelayClient(kb, [url], on_packet=lambda s, d: got.append(d)):
            a.addresses_changed({"127.0.0.1", "192.0.2.7"})  # still ours: nothing to do
            assert await a.ping() > 0  # would wait for a new connection had it left
            assert a.status()["links"][1]["connects"] == 1
            a.addresses_changed({"192.0.2.7"})  # 127.0.0.1 went away
            await until(lambda: a.status()["links"][1]["connects"] == 2,
                        what="a new connection")
            await a.send(kb.public, b"after the roam")
            await until(lambda: b"after the roam" in got)
        await srv.close()

    run(main())


def test_thread_client_for_blocking_callers() -> None:
    with RelayServer(host="127.0.0.1") as srv:  # on its own loop thread
        url = f"http://127.0.0.1:{srv.port}"
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        got: list[bytes] = []
        with RelayClientThread(ka, [url], on_packet=lambda s, d: None) as a, \
                RelayClientThread(kb, [url], on_packet=lambda s, d: got.append(d)):
            for i in range(500):
                a.send(kb.public, i.to_bytes(2, "big"))
            wait_for(lambda: len(got) >= 500, 10, "500 packets", interval=0.01)
        assert [int.from_bytes(d, "big") for d in got] == list(range(500))


def test_client_thread_that_cannot_connect_stops_its_loop() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    client = RelayClientThread(PrivateKey.generate(), [url], on_packet=lambda s, d: None)
    try:
        with pytest.raises(RelayConnectError):
            client.start(timeout=0.5)
        assert client._thread.loop.is_closed()
    finally:
        dead.close()


# ---- fuzzing the live server -------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RelayServer]:
    """A relay on its own loop thread, so hypothesis can drive it with blocking sockets."""
    with RelayServer(host="127.0.0.1") as srv:
        yield srv


def _blocking_client(port: int, key: PrivateKey) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: wgmesh-relay\r\n\r\n")
    buf = b""
    while True:
        buf += s.recv(4096)
        _, sep, rest = buf.partition(b"\r\n\r\n")
        if sep and len(rest) >= 5 + 72:
            break
    (_, body), = FrameDecoder().feed(rest[:5 + 72])
    server_key, challenge = parse_server_hello(body)
    s.sendall(frame_client_hello(key, server_key, challenge, nonce=os.urandom(NONCE_LEN)))
    return s


frame_types = st.sampled_from([int(t) for t in FrameType] + [0, 99, 255])


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pre_auth=st.booleans(),
       frames=st.lists(st.tuples(frame_types, st.binary(max_size=80)), max_size=6),
       tail=st.binary(max_size=40))
def test_fuzz_server_survives_anything(fuzz_server: RelayServer, pre_auth: bool,
                                       frames: list[tuple[int, bytes]], tail: bytes) -> None:
    srv = fuzz_server
    if pre_auth:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"GET /relay HTTP/1.1\r\nUpgrade: wgmesh-relay\r\n\r\n")
    else:
        s = _blocking_client(srv.port, PrivateKey.generate())
    with contextlib.suppress(OSError):  # the server may have closed on us: a fine outcome
        s.sendall(b"".join(bytes((t,)) + len(b).to_bytes(4, "big") + b for t, b in frames) + tail)
    s.close()
    # the server still serves a well-behaved pair
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a, b = _blocking_client(srv.port, ka), _blocking_client(srv.port, kb)
    try:
        dec = FrameDecoder()
        frames_b: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + 5
        while not any(t == FrameType.SERVER_INFO for t, _ in frames_b):
            assert time.monotonic() < deadline
            data = b.recv(65536)
            frames_b += dec.feed(data.partition(b"\r\n\r\n")[2] if b"HTTP/1.1" in data else data)
        a.sendall(frame_send(kb.public, b"alive"))
        while not any(t == FrameType.RECV for t, _ in frames_b):
            assert time.monotonic() < deadline
            frames_b += dec.feed(b.recv(65536))
    finally:
        a.close()
        b.close()
    assert encode_frame(FrameType.KEEPALIVE)  # codec still importable; server loop alive


def test_allow_list_from_the_real_control_service(tmp_path: Path) -> None:
    from wgmesh.control.client import ControlClient
    from wgmesh.control.server import ControlServer

    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path) as control:
        admin = ControlClient(control.url, api_key=control.admin_key)
        credential = admin.create_api_key(role="relay")["key"]
        auth = admin.create_auth_key(reusable=True)["key"]
        member = PrivateKey.generate()
        ControlClient(control.url).register(member, PrivateKey.generate().public, "member",
                                            auth_key=auth)

        async def main() -> None:
            srv, url = await serving(control_url=control.url, relay_credential=credential,
                                     allow_refresh=0.2)
            # control folds a registration in asynchronously: poll until it is listed
            await until(lambda: member.public.raw in (srv.allowed or ()), what="allow-list")
            ok = await RelayConnection.open(url, member)
            with pytest.raises(RelayConnectError, match="not allowed"):
                await RelayConnection.open(url, PrivateKey.generate())
            assert srv.drops["not_allowed"] == 1
            # removed from control: the relay drops it at the next refresh
            loop = asyncio.get_running_loop()
            node_id = next(n["id"] for n in await loop.run_in_executor(None, admin.nodes))
            await loop.run_in_executor(None, admin.delete_node, node_id)
            await until(lambda: ok.closed, what="member disconnected")
            assert ok.close_reason.startswith("node no longer allowed")
            await srv.close()

        run(main())


def test_bad_relay_credential_fails_closed(tmp_path: Path) -> None:
    from wgmesh.control.server import ControlServer

    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path) as control:
        async def main() -> None:
            srv, url = await serving(control_url=control.url,
                                     relay_credential="wga_0000000000000000_" + "x" * 43,
                                     allow_refresh=0.2)
            await until(lambda: srv.drops["allow_list_fetch_failed"] >= 1)
            with pytest.raises(RelayConnectError, match="not allowed"):
                await RelayConnection.open(url, PrivateKey.generate())
            await srv.close()

        run(main())


def test_allow_list_over_https_with_a_private_ca(tmp_path: Path) -> None:
    """`relay serve --control https://... --control-ca FILE`: the credential goes only over
    TLS, verified against the given CA; without that CA the fetch fails closed."""
    import ssl

    from wgmesh.control.client import ControlClient
    from wgmesh.control.server import ControlServer
    from wgmesh.lab.tls import LabCA

    ca = LabCA(tmp_path / "ca")
    cert, key = ca.issue("control", "127.0.0.1")
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path / "ctl", tls_cert=cert,
                       tls_key=key) as control:
        assert control.url.startswith("https://")
        admin = ControlClient(control.url, api_key=control.admin_key, ca=str(ca.path))
        credential = admin.create_api_key(role="relay")["key"]
        auth = admin.create_auth_key(reusable=True)["key"]
        member = PrivateKey.generate()
        ControlClient(control.url, ca=str(ca.path)).register(
            member, PrivateKey.generate().public, "member", auth_key=auth)

        async def main() -> None:
            trusting = ssl.create_default_context(cafile=str(ca.path))
            srv, url = await serving(control_url=control.url, relay_credential=credential,
                                     control_ssl=trusting, allow_refresh=0.2)
            await until(lambda: member.public.raw in (srv.allowed or ()), what="allow-list")
            await RelayConnection.open(url, member)
            await srv.close()
            blind, url = await serving(control_url=control.url, relay_credential=credential,
                                       allow_refresh=0.2)
            await until(lambda: blind.drops["allow_list_fetch_failed"] >= 1)
            with pytest.raises(RelayConnectError, match="not allowed"):
                await RelayConnection.open(url, member)
            await blind.close()

        run(main())


def test_cross_region_reaches_the_peers_home_relay() -> None:
    async def main() -> None:
        s1, u1 = await serving()
        s2, u2 = await serving()  # another region: not meshed
        regions = {1: [u1], 2: [u2]}
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        a = RelayClient(ka, regions, home_region=1, on_packet=lambda s, d: got_a.append(d))
        b = RelayClient(kb, regions, home_region=2, on_packet=lambda s, d: got_b.append(d))
        await a.start()
        await b.start()
        a.set_peer_region(kb.public, 2)
        b.set_peer_region(ka.public, 1)
        assert await a.send(kb.public, b"to region 2")
        await until(lambda: got_b == [b"to region 2"])
        assert await b.send(ka.public, b"to region 1")
        await until(lambda: got_a == [b"to region 1"])
        assert a.home_region == 1 and set(a.status()["links"]) == {1, 2}
        assert ka.public.raw in s2._clients  # a dialled b's home relay itself
        assert s1.counters["packets_out"] == 1 and s2.counters["packets_out"] == 1
        await a.close()
        await b.close()
        await s1.close()
        await s2.close()

    run(main())


def test_client_counts_what_its_backed_up_link_drops() -> None:
    """A relay link that cannot write drops its oldest frames (as UDP may); the node
    must see that in the client's status, not in a connection object it replaces on
    every reconnect."""
    async def main() -> None:
        srv, url = await serving()
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        a = RelayClient(ka, [url], queue_frames=16, on_packet=lambda s, d: None)
        await a.start()
        await until(lambda: ka.public.raw in srv._clients)
        conn = srv._clients[ka.public.raw]
        assert conn.transport is not None
        conn.transport.pause_reading()  # the relay stops reading a: a's socket backs up
        packet = bytes(1400)
        sent = 20000  # 28 MB: past every kernel and transport buffer of a's socket
        for i in range(sent):
            assert a.send_nowait(kb.public, packet)
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the transport write what it can
        await until(lambda: a.status()["drops"].get("queue_full", 0) > 0,
                    what="queue_full drops at a's backed-up link")
        drops = a.status()["drops"]["queue_full"]
        assert 0 < drops < sent
        await a.close()
        await srv.close()

    run(main())


def test_relay_map_arrives_later_and_changes() -> None:
    async def main() -> None:
        s1, u1 = await serving()
        s2, u2 = await serving()
        homes: list[int] = []
        c = RelayClient(PrivateKey.generate(), [], on_home_change=homes.append)
        with pytest.raises(RelayConnectError, match="empty"):
            await c.start()
        assert not c.send_nowait(PrivateKey.generate().public, b"x")  # no relay: a drop
        assert c.drops["not_connected"] == 1
        await c.set_relays({5: [u1]})
        await c.wait_connected()
        assert homes == [5] and len(s1._clients) == 1
        await c.set_relays({6: [u2]})  # region 5 withdrawn: re-home
        await c.wait_connected()
        assert homes == [5, 6] and c.home_region == 6
        await until(lambda: not s1._clients and len(s2._clients) == 1)
        await c.close()
        await s1.close()
        await s2.close()

    run(main())


def test_twins_with_one_key_back_off_instead_of_spinning() -> None:
    async def main() -> None:
        srv, url = await serving()
        key = PrivateKey.generate()
        twins = [RelayClient(key, [url], backoff_min=0.05, backoff_max=0.5) for _ in range(2)]
        for t in twins:
            await t.start()
        t0 = time.monotonic()
        await until(lambda: time.monotonic() - t0 > 2.0, timeout=5)
        replaced = srv.drops["replaced"]
        assert 1 <= replaced <= 25, replaced  # newest wins each time, but at a bounded rate
        for t in twins:
            await t.close()
        await srv.close()

    run(main())


def test_workers_of_one_relay_are_one_relay_to_the_region() -> None:
    """Two servers meshed as the workers of one relay (what ``--workers 2`` runs in two
    processes) and a region relay that dialled only the first: a node on the second
    worker and a node on the region relay reach each other both ways and the region
    relay hears the node leave; the workers' listener refuses nodes and wrong keys."""
    async def main() -> None:
        key, sibling_key = PrivateKey.generate(), os.urandom(32)
        names = [f"\0wgmesh-test-{os.getpid()}-{i}" for i in range(2)]  # abstract sockets
        listeners = []
        for name in names:
            s = socket.socket(socket.AF_UNIX)
            s.bind(name)
            s.listen()
            s.setblocking(False)
            listeners.append(s)
        w1, u1 = await serving(private_key=key, mesh_key=MESH_KEY)
        w2, _ = await serving(private_key=key, mesh_key=MESH_KEY)
        await w1.serve_siblings(listeners[0], sibling_key, [names[1]])
        await w2.serve_siblings(listeners[1], sibling_key, [names[0]])
        region, ux = await serving(mesh_key=MESH_KEY, mesh_peers=[u1])
        w1.add_mesh_peer(ux)
        w2.add_mesh_peer(ux)
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        ia, ib = Inbox(), Inbox()
        a = await RelayConnection.open(ux, ka, on_recv=ia.recv)
        b = await RelayConnection.open(f"http://127.0.0.1:{w2.port}", kb, on_recv=ib.recv)
        await until(lambda: kb.public.raw in region.mesh.remote
                    and ka.public.raw in w2.mesh.remote, what="presence across workers")
        a.send(kb.public, b"a->b")  # region -> w1 (the link it dialled) -> w2 -> b
        b.send(ka.public, b"b->a")  # w2 -> region, over w2's own link
        await until(lambda: ia.packets and ib.packets, what="delivery both ways")
        assert ib.packets == [(ka.public, b"a->b")] and ia.packets == [(kb.public, b"b->a")]
        assert w1.counters["packets_sibling_out"] == 1 and w2.counters["packets_sibling_in"] == 1
        b.close()
        await until(lambda: kb.public.raw not in region.mesh.remote, what="b gone, for the region")
        # the workers' listener: no nodes, no relay without the workers' key
        with pytest.raises(RelayConnectError, match="own workers"):
            await RelayConnection.open("http://w", PrivateKey.generate(), unix=names[0])
        with pytest.raises(RelayConnectError, match="mesh key mismatch"):
            await RelayConnection.open("http://w", PrivateKey.generate(), mesh_key=MESH_KEY,
                                       unix=names[0])
        a.close()
        for s in (region, w2, w1):
            await s.close()

    run(main())
