"""``wgmesh relay serve --workers 2`` is one relay (issue 18): a real relay process on
loopback whose two workers share its port. Nodes that the kernel hands to different
workers reach each other and see each other come and go; the newest connection of a key
wins across workers; the caps are the relay's, not each worker's; ``/metrics`` sums the
workers; a worker killed -9 is replaced, its nodes reconnect and get through, and its
connections stop counting against the caps; a pair that talks across the workers is moved
onto one, connection and all, without a lost packet (over TLS it is not). Which worker
holds a connection is read from /proc (the relay's end of the TCP connection), not asked
of the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from relayproc import bound_to, metrics_from, relay_process, worker_holding, workers_of

from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.tls import LabCA
from wgmesh.relay import GONE_DISCONNECTED, frame_send
from wgmesh.relaynet.connection import RelayConnectError, RelayConnection

pytestmark = pytest.mark.netns

METRICS = "127.0.0.9"  # a source of its own for /metrics


async def until(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    return await asyncio.to_thread(wait_for, pred, timeout, what, 0.02)


class Node:
    """One relay connection, with what it received."""

    def __init__(self, conn: RelayConnection, key: PrivateKey, worker: int | None,
                 local_port: int) -> None:
        self.conn, self.key, self.worker, self.local_port = conn, key, worker, local_port
        self.packets: list[tuple[Key, bytes]] = []
        self.peers: list[tuple[Key, bool, int]] = []


class Relay:
    """The relay under test at ``port``, run by process ``pid``."""

    def __init__(self, pid: int, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.pid, self.port, self.tls = pid, port, tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def worker_of(self, node: Node) -> int | None:
        """The worker holding ``node``'s connection now."""
        return worker_holding(self.pid, self.port, node.local_port)

    async def node(self, key: PrivateKey | None = None, source: str = "127.0.0.1") -> Node:
        key = key or PrivateKey.generate()
        inbox: list[tuple[Key, bytes]] = []
        peers: list[tuple[Key, bool, int]] = []
        conn = await RelayConnection.open(
            self.url, key, make_socket=bound_to(source), ssl=self.tls,
            on_recv=lambda s, d: inbox.append((s, d)),
            on_peer=lambda k, present, why: peers.append((k, present, why)))
        assert conn.transport is not None
        local_port = conn.transport.get_extra_info("sockname")[1]
        node = Node(conn, key, worker_holding(self.pid, self.port, local_port), local_port)
        node.packets, node.peers = inbox, peers
        return node

    async def admitted(self, source: str, timeout: float = 10.0) -> Node:
        """A node from ``source``, retried while the relay is still at its caps."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self.node(source=source)
            except RelayConnectError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def nodes_on_both(self, source: str = "127.0.0.1") -> tuple[Node, Node, list[Node]]:
        """Connect nodes until two landed on different workers: (one, other, all)."""
        firsts, nodes = await self.nodes_on(2, source)
        return firsts[0], firsts[1], nodes

    async def nodes_on(self, workers: int, source: str = "127.0.0.1"
                       ) -> tuple[list[Node], list[Node]]:
        """Connect nodes until ``workers`` workers hold one each: (the first node on each,
        all of them)."""
        nodes = [await self.node(source=source)]
        while len({n.worker for n in nodes}) < workers:
            assert len(nodes) < 60, "the kernel never picked every worker"
            nodes.append(await self.node(source=source))
        firsts = {n.worker: n for n in reversed(nodes)}
        return sorted(firsts.values(), key=nodes.index), nodes


def run(tmp_path: Path, test: Callable[[Relay], Coroutine[Any, Any, None]], *args: str,
        tls: ssl.SSLContext | None = None, workers: int = 2) -> None:
    """``test`` against a fresh relay of ``workers``; afterwards no worker is left."""
    n = workers
    with relay_process(tmp_path, "--workers", str(n), *args) as (pid, port):
        workers_ = wait_for(lambda: len(workers_of(pid)) == n and workers_of(pid), 10,
                            f"{n} workers")
        asyncio.run(asyncio.wait_for(test(Relay(pid, port, tls)), 120))
        workers_ = [*workers_, *workers_of(pid)]
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers_), 10,
             "every worker gone once the relay stopped")


async def exchange(a: Node, b: Node, tag: bytes) -> None:
    """``a`` and ``b`` send each other a packet; both arrive."""
    a.conn.send(b.key.public, tag + b" a->b")
    b.conn.send(a.key.public, tag + b" b->a")
    await until(lambda: (b.key.public, tag + b" b->a") in a.packets
                and (a.key.public, tag + b" a->b") in b.packets, f"{tag!r} both ways")


def worker_listeners() -> list[str]:
    """Abstract UNIX sockets of relay workers in this namespace (from /proc/net/unix)."""
    rows = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sorted({r.split()[-1] for r in rows
                   if len(r.split()) >= 8 and r.split()[-1].startswith("@wgmesh-relay-")})


def unix_get(name: str, path: bytes) -> bytes:
    """A plain HTTP GET to an abstract UNIX socket (``@name``), as any local process can."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect("\0" + name[1:])
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(4096)


def test_nodes_on_two_workers_are_one_relay(tmp_path: Path) -> None:
    async def test(relay: Relay) -> None:
        a, b, nodes = await relay.nodes_on_both()
        assert None not in {n.worker for n in nodes}
        await exchange(a, b, b"hello")
        # a run of packets (one read, one DELIVER between workers) arrives whole and in order
        for i in range(500):
            a.conn.send(b.key.public, i.to_bytes(4, "big") + bytes(1200))
        await until(lambda: len(b.packets) == 501, "500 packets across workers")
        assert [int.from_bytes(d[:4], "big") for _, d in b.packets[1:]] == list(range(500))
        m = metrics_from(relay.port, METRICS)
        assert m["workers"] == 2 and m["clients"] == len(nodes)
        assert m["counters"]["packets_in"] == m["counters"]["packets_out"] == 502
        assert m["counters"]["packets_sibling_out"] == m["counters"]["packets_sibling_in"] == 502
        text = metrics_from(relay.port, METRICS, "text/plain")  # Prometheus sums them too
        assert f"wgmesh_relay_clients {float(len(nodes))}" in text
        # The workers' own /metrics on their abstract UNIX listeners, which any local
        # process can reach, answer only a sibling (it shows a token of the run's key).
        listeners = worker_listeners()
        assert len(listeners) >= 2
        for name in listeners:
            assert unix_get(name, b"/metrics").startswith(b"HTTP/1.1 403")
        assert metrics_from(relay.port, METRICS)["drops"]["metrics_forbidden"] >= 2
        assert 'wgmesh_relay_frames_total{direction="out"} 502.0' in text
        # b leaves its worker: a, on the other one, hears it is gone (they talked)
        b.conn.close()
        await until(lambda: (b.key.public, False, GONE_DISCONNECTED) in a.peers, "b gone")
        # b's key again and again, until two connections in a row land on different
        # workers: each time the newer connection wins, across workers too
        prev, crossed = await relay.node(b.key), False
        for _ in range(40):
            again = await relay.node(b.key)
            await until(lambda p=prev: p.conn.closed, "the older connection closed")  # type: ignore[misc]
            assert prev.conn.close_reason == "replaced by a newer connection"
            crossed, prev = again.worker != prev.worker, again
            if crossed:
                break
        assert crossed, "the kernel never put two connections in a row on different workers"
        await exchange(a, again, b"again")
        assert not again.conn.closed
        assert (b.key.public, True, 0) in a.peers  # and a heard it came back

    run(tmp_path, test)


def test_caps_are_the_relays_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    per_source, total = 6, 10

    async def test(relay: Relay) -> None:
        before = metrics_from(relay.port, METRICS)  # before the caps are full
        assert before["connections"] == 1 and before["workers"] == 2  # the request itself
        src = [await relay.node(source="127.0.0.2") for _ in range(per_source)]
        with pytest.raises(RelayConnectError):  # the 7th from that source, on either worker
            await relay.node(source="127.0.0.2")
        other = [await relay.node(source="127.0.0.3") for _ in range(total - per_source - 1)]
        m = metrics_from(relay.port, METRICS)  # the 10th connection (a worker's killed later
        assert m["drops"]["too_many_from_source"] == 1  # takes its counts with it)
        other.append(await relay.admitted("127.0.0.3"))  # once the metrics request is gone
        with pytest.raises(RelayConnectError):  # the 11th in all
            await relay.node(source="127.0.0.4")
        nodes = src + other
        by_worker = {w: [n for n in nodes if n.worker == w] for w in workers_of(relay.pid)}
        # a worker killed -9: its nodes lose their connection, the others keep theirs
        victim = max(by_worker, key=lambda w: len(by_worker[w]))
        survivors = [n for n in nodes if n.worker != victim]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: all(n.conn.closed for n in by_worker[victim]), "the victim's nodes cut")
        assert not any(n.conn.closed for n in survivors)
        await until(lambda: len(workers_of(relay.pid)) == 2 and victim not in workers_of(relay.pid),
                    "a new worker")
        # its connections no longer count: its nodes come back, up to the caps again
        back = [await relay.node(n.key, source="127.0.0.2" if n in src else "127.0.0.3")
                for n in by_worker[victim]]
        with pytest.raises(RelayConnectError):
            await relay.node(source="127.0.0.4")
        live = survivors + back
        # every node reaches every other, whichever worker each one is on now
        a = live[0]
        for b in live[1:]:
            await exchange(a, b, b"after the kill")
        for n in live:
            n.conn.close()
        def emptied() -> dict[str, Any] | None:
            try:
                m = metrics_from(relay.port, METRICS)
            except OSError:  # refused: the caps are still full
                return None
            return m if m["connections"] == 1 else None

        m = await until(emptied, "the relay empty again")
        assert m["clients"] == 0 and m["sources"] == 1  # only the metrics request itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, 0)
            pytest.fail("the killed worker is still there")

    run(tmp_path, test, "--max-per-source", str(per_source), "--max-connections", str(total))


async def talk(a: Node, b: Node, until_done: Callable[[], bool], deadline: float) -> int:
    """``a`` and ``b`` send each other numbered 200-byte packets, written straight into
    their connections a frame and a half at a time (so the relay's reads of either end
    mid-frame almost always), ~1,500 packets a second each way, until ``until_done()`` or
    ``deadline`` (loop time). How many each sent."""
    loop = asyncio.get_running_loop()
    ends = []
    for src, dst in ((a, b), (b, a)):
        assert src.conn.transport is not None
        stream = b"".join(frame_send(dst.key.public, i.to_bytes(4, "big") + bytes(196))
                          for i in range(60_000))
        ends.append((src.conn.transport, stream))
    size = len(frame_send(a.key.public, bytes(200)))
    at, n = 0, 0
    while loop.time() < deadline and (n % 20 or not until_done()):  # asks every 20 pieces
        n += 1
        for transport, stream in ends:
            transport.write(stream[at:at + size * 3 // 2])
        at += size * 3 // 2
        await asyncio.sleep(0.001)  # pacing, not waiting for anything
    sent = -(-at // size)
    for transport, stream in ends:
        transport.write(stream[at:sent * size])  # finish the frame begun
    return sent


async def meet(relay: Relay, a: Node, b: Node, meanwhile: Callable[[], None] = lambda: None
               ) -> int:
    """:func:`talk` until ``a`` and ``b`` are on one worker (each held by it alone), then
    a second more; ``meanwhile`` runs at every check. How many packets each sent."""
    loop = asyncio.get_running_loop()
    met = [0.0]

    def together() -> bool:
        meanwhile()
        wa = relay.worker_of(a)
        if not met[0] and wa is not None and wa == relay.worker_of(b):
            met[0] = loop.time()
        return bool(met[0]) and loop.time() > met[0] + 1.0

    sent = await talk(a, b, together, loop.time() + 30)
    assert met[0], "the pair never met on one worker"
    return sent


def numbers(node: Node, src: Node) -> list[int]:
    return [int.from_bytes(d[:4], "big") for k, d in node.packets if k == src.key.public]


async def all_arrived(dst: Node, src: Node, sent: int) -> None:
    """Every packet ``src`` sent ``dst`` arrived once, whole."""
    await until(lambda: len(numbers(dst, src)) >= sent, f"{sent} packets")
    got = [d for k, d in dst.packets if k == src.key.public]
    assert sorted(numbers(dst, src)) == list(range(sent)), "lost or doubled on the move"
    assert all(d[4:] == bytes(196) for d in got), "damaged on the move"


def test_a_talking_pair_meets_on_one_worker(tmp_path: Path) -> None:
    """Two nodes that the kernel put on different workers exchange packets steadily: the
    one with the smaller key is moved to the other's worker (handoff module), on the same
    TCP connection (no new handshake), and nothing either sent is lost, doubled or
    damaged, although the relay reads both in pieces that end mid-frame. Afterwards their packets no longer
    cross between the workers, and the moved node still hears its peer leave."""
    async def test(relay: Relay) -> None:
        a, b, nodes = await relay.nodes_on_both()
        for n in nodes:
            if n not in (a, b):
                n.conn.close()
        before = metrics_from(relay.port, METRICS)
        assert before["counters"].get("clients_moved_in", 0) == 0
        sent = await meet(relay, a, b)
        moved, stayed = sorted((a, b), key=lambda n: n.key.public.raw)  # the smaller key moves
        assert relay.worker_of(stayed) == stayed.worker != moved.worker
        await all_arrived(b, a, sent)
        await all_arrived(a, b, sent)
        assert not a.conn.closed and not b.conn.closed
        m = metrics_from(relay.port, METRICS)
        assert m["counters"]["clients_moved_in"] == m["counters"]["clients_moved_out"] == 1
        assert "wgmesh_relay_clients_moved_in_total 1.0" in metrics_from(relay.port, METRICS,
                                                                           "text/plain")
        assert m["counters"]["clients_accepted"] == before["counters"]["clients_accepted"]
        assert m["counters"]["packets_in"] == m["counters"]["packets_out"]
        assert m["connections"] == before["connections"] - len(nodes) + 2  # caps: still 2
        # met: their packets stay on one worker now
        crossed = m["counters"]["packets_sibling_out"]
        await exchange(a, b, b"after the move")
        assert metrics_from(relay.port, METRICS)["counters"]["packets_sibling_out"] == crossed
        stayed.conn.close()
        await until(lambda: (stayed.key.public, False, GONE_DISCONNECTED) in moved.peers,
                    "the moved node hears its peer leave")

    run(tmp_path, test, "--affinity-packets", "200")


def test_a_third_workers_packets_follow_a_moved_node(tmp_path: Path) -> None:
    """Three workers: while a pair on two of them meets, a node on the third sends to the
    end that moves, steadily (and stays put itself: its key is the larger). Its worker
    learns where that node went only when the new worker says so; until then the old
    worker passes its packets on. None is lost."""
    async def test(relay: Relay) -> None:
        (a, b, c), nodes = await relay.nodes_on(3)
        while c.key.public.raw < min(a.key.public.raw, b.key.public.raw):  # c must stay put
            nodes.append(await relay.node())
            if nodes[-1].worker == c.worker:
                c = nodes[-1]
        for n in nodes:
            if n not in (a, b, c):
                n.conn.close()
        mover = min((a, b), key=lambda n: n.key.public.raw)
        sent_c = [0]

        def c_sends() -> None:  # half what a and b exchange: b stays the mover's partner
            for _ in range(30):
                c.conn.send(mover.key.public, sent_c[0].to_bytes(4, "big") + bytes(196))
                sent_c[0] += 1

        sent = await meet(relay, a, b, c_sends)
        assert relay.worker_of(mover) != mover.worker
        await all_arrived(mover, c, sent_c[0])
        await all_arrived(b if mover is a else a, mover, sent)
        m = metrics_from(relay.port, METRICS)
        assert m["workers"] == 3
        assert m["counters"]["clients_moved_in"] == 1
        assert m["drops"].get("mesh_unknown_dest", 0) == 0
        assert m["counters"]["packets_in"] == m["counters"]["packets_out"]

    run(tmp_path, test, "--affinity-packets", "200", workers=3)


def test_a_pair_over_tls_is_not_moved(tmp_path: Path) -> None:
    """A TLS session cannot leave its process: over ``https`` the relay sees the pair
    cross (``clients_kept_tls``) and leaves it where it is, and it gets through."""
    ca = LabCA(tmp_path / "ca")
    cert, key = ca.issue("relay", "127.0.0.1")

    async def test(relay: Relay) -> None:
        a, b, _ = await relay.nodes_on_both()

        def kept() -> int:  # the times the relay wanted to move one of them and kept it
            m = metrics_from(relay.port, METRICS, tls=relay.tls)
            return int(m["counters"].get("clients_kept_tls", 0))

        loop = asyncio.get_running_loop()
        await talk(a, b, lambda: kept() > 0, loop.time() + 30)
        assert kept(), "the relay never saw the pair cross"
        assert "wgmesh_relay_clients_kept_tls_total" in metrics_from(
            relay.port, METRICS, "text/plain", tls=relay.tls)
        m = metrics_from(relay.port, METRICS, tls=relay.tls)
        assert m["counters"].get("clients_moved_out", 0) == 0
        assert relay.worker_of(a) == a.worker and relay.worker_of(b) == b.worker
        await exchange(a, b, b"still")

    tls = ssl.create_default_context(cafile=str(ca.path))
    run(tmp_path, test, "--affinity-packets", "200", "--tls-cert", str(cert),
        "--tls-key", str(key), tls=tls)
