"""The relay bridge on the host (netns tier): plain UDP sockets stand in for the two
kernel WireGuard ports. Packets sent to a bridge endpoint come out at the far side's
port from the far bridge's endpoint for the sender (what kernel roaming needs), in
both directions; a direct peer's relay packets are dropped, not injected."""

from __future__ import annotations

import socket

import pytest
from bridgetools import BridgePair
from polling import wait_for

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Host, Lab
from wgmesh.wireguard.netns import socket_in
from wgmesh.wireguard.proxy import BridgeCounters

pytestmark = pytest.mark.netns

MAX_UDP4 = 65507  # the largest UDP payload over IPv4


def _wg_ports(a: Host, b: Host) -> tuple[socket.socket, socket.socket]:
    """UDP sockets standing in for the kernel WireGuard ports 51820 (a) and 51821 (b),
    with room for the tests' bursts."""
    wg_a = socket_in(a.ns, socket.AF_INET, socket.SOCK_DGRAM)
    wg_b = socket_in(b.ns, socket.AF_INET, socket.SOCK_DGRAM)
    wg_a.bind(("0.0.0.0", 51820))
    wg_b.bind(("0.0.0.0", 51821))
    for s in (wg_a, wg_b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.settimeout(10)
    return wg_a, wg_b


def test_bridge_relays_both_ways_from_the_peer_endpoint(lab: Lab) -> None:
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    ka, kb = PrivateKey.generate().public, PrivateKey.generate().public
    wg_a, wg_b = _wg_ports(a, b)
    try:
        with BridgePair(a.ns, 51820, ka, b.ns, 51821, kb, b.ip) as pair:
            ep_b_at_a = pair.a.add(kb)  # a's kernel endpoint for peer b
            ep_a_at_b = pair.b.add(ka)  # b's kernel endpoint for peer a
            assert ep_b_at_a[0] == "127.0.0.1"
            for i in range(50):
                wg_a.sendto(b"to b %d" % i, ep_b_at_a)
            got = [wg_b.recvfrom(2048) for _ in range(50)]
            assert {d for d, _ in got} == {b"to b %d" % i for i in range(50)}
            assert {src for _, src in got} == {ep_a_at_b}
            wg_b.sendto(b"to a", ep_a_at_b)
            assert wg_a.recvfrom(2048) == (b"to a", ep_b_at_a)
            assert pair.a.counters(kb).to_relay == 50 and pair.b.counters(ka).from_relay == 50

            # a stranger on the loopback can't inject through the bridge socket
            stray = socket_in(a.ns, socket.AF_INET, socket.SOCK_DGRAM)
            stray.sendto(b"stray", ep_b_at_a)
            stray.close()
            # while b is "direct" at a, relayed packets from b are dropped, not injected
            pair.on_loop(lambda: setattr(pair.a._ports[kb.raw], "direct", True))
            wg_b.sendto(b"late relay", ep_a_at_b)
            wait_for(lambda: pair.a.counters(kb).dropped == 1, 10, "drop of a late packet")
            pair.on_loop(lambda: setattr(pair.a._ports[kb.raw], "direct", False))
            wg_b.sendto(b"relay again", ep_a_at_b)
            assert wg_a.recvfrom(2048) == (b"relay again", ep_b_at_a)
            assert pair.b.counters(ka).to_relay == 3
    finally:
        wg_a.close()
        wg_b.close()


def test_a_burst_from_the_relay_reaches_the_kernel_port_whole_and_in_order(lab: Lab) -> None:
    """A burst delivered in one loop iteration leaves as UDP GSO runs: the kernel port
    still receives one datagram per packet, each intact, in order, from the endpoint it
    has for the peer; a shorter packet ends a run, a longer one starts the next, and an
    empty one arrives as an empty datagram. Packets handed over from another thread
    arrive too."""
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    ka, kb = PrivateKey.generate().public, PrivateKey.generate().public
    wg_a, wg_b = _wg_ports(a, b)
    sizes = [1440] * 70 + [148] + [1440] * 3 + [32, 1440, 96, 96, 0, 0, 1440, 1440] + [60] * 90
    sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    try:
        with BridgePair(a.ns, 51820, ka, b.ns, 51821, kb, b.ip) as pair:
            ep_b_at_a = pair.a.add(kb)

            def burst() -> None:
                for p in sent:
                    pair.a.deliver(kb, p)
            pair.on_loop(burst)
            got = [wg_a.recvfrom(2048) for _ in sent]
            assert [d for d, _ in got] == sent
            assert {src for _, src in got} == {ep_b_at_a}
            assert pair.a.counters(kb).from_relay == len(sent)
            assert pair.a.counters(kb).dropped == 0

            pair.a.deliver(kb, b"from another thread")  # not the loop's
            assert wg_a.recvfrom(2048) == (b"from another thread", ep_b_at_a)
    finally:
        wg_a.close()
        wg_b.close()


def _burst_while_busy(lab: Lab, sent: list[bytes], *, batched: bool = True
                      ) -> tuple[list[bytes], BridgeCounters, bool]:
    """``sent`` from a's kernel port to its bridge endpoint for b, all queued while a's
    bridge loop is busy (nothing is read meanwhile): what b's kernel port receives, a's
    counters for b, and whether a's bridge read in batches."""
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    ka, kb = PrivateKey.generate().public, PrivateKey.generate().public
    wg_a, wg_b = _wg_ports(a, b)
    try:
        with BridgePair(a.ns, 51820, ka, b.ns, 51821, kb, b.ip, batched=batched) as pair:
            ep_b_at_a = pair.a.add(kb)
            pair.b.add(ka)

            def burst() -> None:  # runs on the loop
                for p in sent:
                    wg_a.sendto(p, ep_b_at_a)
            pair.on_loop(burst)
            got = [wg_b.recv(MAX_UDP4 + 1) for _ in sent]
            return got, pair.a.counters(kb), pair.a._rx is not None
    finally:
        wg_a.close()
        wg_b.close()


def test_a_burst_from_the_kernel_waits_while_the_loop_is_busy(lab: Lab) -> None:
    """The kernel sends in bursts, and the bridge's loop may be busy meanwhile: 500
    datagrams (720 KB) sent to an endpoint while its loop can't read are all relayed
    once it can, not dropped for a full receive buffer."""
    sent = [i.to_bytes(4, "big") * 360 for i in range(500)]
    got, counters, _ = _burst_while_busy(lab, sent)
    assert sorted(got) == sent
    assert counters.to_relay == len(sent)


@pytest.mark.parametrize("batched", [True, False], ids=["recvmmsg", "recv-each"])
def test_a_burst_from_the_kernel_arrives_byte_exact_in_order(lab: Lab, batched: bool) -> None:
    """What the kernel queued while the loop was busy is read in batches (``recvmmsg``,
    up to 64 datagrams a call; without it, the fallback: one ``recv`` each): a burst of
    varied sizes, empty and maximum-size datagrams among them, reaches the far kernel
    port byte for byte and in order, none lost, merged, split or truncated."""
    sizes = ([0, MAX_UDP4, 1440, 1, 0, 148] + [1440] * 100 + [MAX_UDP4, 32, 0, 0]
             + [60] * 40 + [2000, 1439, 1441, 0])
    sent = [bytes([i % 251 + 1]) * n for i, n in enumerate(sizes)]
    got, counters, took_batches = _burst_while_busy(lab, sent, batched=batched)
    assert took_batches == batched  # the path under test is the one taken
    assert [len(d) for d in got] == sizes
    assert got == sent
    assert counters.to_relay == len(sent)
    assert counters.dropped == 0


def test_bridge_over_the_real_relay(lab: Lab) -> None:
    """The same bridge wired to wgmesh's RelayServer/RelayClient (on loopback): the
    bridge's ``send`` is ``RelayClient.send_nowait``, the client's ``on_packet`` is
    ``RelayBridge.deliver``."""
    from wgmesh.loopthread import LoopThread
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.relaynet.server import RelayServer
    from wgmesh.wireguard.proxy import RelayBridge

    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    pa, pb = PrivateKey.generate(), PrivateKey.generate()
    wg_a, wg_b = _wg_ports(a, b)
    thread = LoopThread("proxy-relay")
    loop = thread.loop

    def run(coro):  # type: ignore[no-untyped-def]
        return thread.call(coro, 30)

    bridges: dict[str, RelayBridge] = {}

    async def setup():  # type: ignore[no-untyped-def]
        srv = RelayServer()
        await srv.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{srv.port}"
        ca = RelayClient(pa, [url], on_packet=lambda k, p: bridges["a"].deliver(k, p))
        cb = RelayClient(pb, [url], on_packet=lambda k, p: bridges["b"].deliver(k, p))
        await ca.start()
        await cb.start()
        bridges["a"] = RelayBridge(loop, ca.send_nowait, 51820, netns=a.ns)
        bridges["b"] = RelayBridge(loop, cb.send_nowait, 51821, netns=b.ns)
        return srv, ca, cb

    srv, ca, cb = run(setup())
    try:
        ep_b, ep_a = bridges["a"].add(pb.public), bridges["b"].add(pa.public)
        # the first packets may race the clients' registration at the relay: retry
        def delivered() -> bool:
            wg_a.sendto(b"hello over the relay", ep_b)
            wg_b.settimeout(0.5)
            try:
                return wg_b.recvfrom(2048) == (b"hello over the relay", ep_a)
            except TimeoutError:
                return False
        wait_for(delivered, 15, "a packet across the relay")
        wg_b.settimeout(10)
        wg_b.sendto(b"and back", ep_a)
        assert wg_a.recvfrom(2048) == (b"and back", ep_b)
    finally:
        async def shut() -> None:
            for br in bridges.values():
                br.close()
            await ca.close()
            await cb.close()
            await srv.close()
        thread.stop_with(shut(), 30)
        wg_a.close()
        wg_b.close()
