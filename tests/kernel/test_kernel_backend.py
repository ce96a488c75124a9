"""Kernel tier: the netlink backend against the real WireGuard module (in the VM).

One test walks the whole life cycle, because every VM second is dear: create
with a kernel-picked port, IPv4+IPv6 addresses and a subnet route, an MTU change,
handshake and ping both families, a roamed endpoint kept, bulk peer diffs in single
netlink messages cross-checked by the stock ``wg`` tool, adoption of a live interface,
fwmark, stats, key hygiene.
"""

from __future__ import annotations

import asyncio
import logging
import time

import attrs
import pytest
from polling import wait_for

from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.network import Lab
from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_kernel_backend_lifecycle(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    from wgmesh.wireguard.kernel import KernelBackend

    caplog.set_level(logging.DEBUG)
    seen: list[str] = []  # everything any logger emits, pyroute2's DEBUG dumps included
    tap = logging.Handler(logging.DEBUG)
    tap.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(tap)
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    wa, wb = KernelBackend("wg0", netns=a.ns), KernelBackend("wg0", netns=b.ns)
    try:
        wa.up(InterfaceConfig("wg0", ka, listen_port=0, fwmark=0x5157,
                              addresses=["100.64.0.1/24", "fd7a::1/64"]))
        wb.up(InterfaceConfig("wg0", kb, listen_port=51821,
                              addresses=["100.64.0.2/24", "fd7a::2/64", "10.99.0.1/24"]))
        assert wa.listen_port not in (0, 51821) and wb.listen_port == 51821
        info = wa.info()
        assert info.public_key == ka.public and info.fwmark == 0x5157
        assert info.listen_port == wa.listen_port

        peer_b = PeerConfig(kb.public, ["100.64.0.2/32", "fd7a::2/128", "10.99.0.0/24"],
                            (b.ip, 51821), persistent_keepalive=0)
        sent = wa.messages_sent
        diff = wa.set_peers([peer_b])
        assert len(diff.add) == 1 and wa.messages_sent == sent + 1
        wb.set_peers([PeerConfig(ka.public, ["100.64.0.1/32", "fd7a::1/128"],
                                 (a.ip, wa.listen_port))])
        # 10.99.0.0/24 is outside every interface prefix: it gets a route, the rest don't
        assert {str(n) for n in wa.routes} == {"10.99.0.0/24"}
        assert "10.99.0.0/24 dev wg0 proto 119" in lab.run(a, ["ip", "route"]).stdout
        assert "mtu 1420 " in lab.run(a, ["ip", "link", "show", "wg0"]).stdout
        wa.set_mtu(1340)  # what the data plane does when a measured path is narrower
        assert "mtu 1340 " in lab.run(a, ["ip", "link", "show", "wg0"]).stdout

        assert wa.stats()[kb.public].last_handshake is None
        lab.run(a, ["ping", "-c", "1", "-W", "10", "100.64.0.2"])
        lab.run(a, ["ping", "-c", "1", "-W", "5", "fd7a::2"])
        lab.run(a, ["ping", "-c", "1", "-W", "5", "10.99.0.1"])
        st = wa.stats()[kb.public]
        assert st.last_handshake is not None and abs(st.last_handshake - time.time()) < 60
        assert st.rx_bytes > 0 and st.tx_bytes > 0 and st.endpoint == (b.ip, 51821)
        assert wb.stats()[ka.public].endpoint == (a.ip, wa.listen_port)
        # WireGuard roams a peer to the source of its packets (b moves to another port and
        # back). A desired peer without an endpoint, as the node asks for it, keeps where
        # the kernel put it: no update counted, nothing written.
        for port in (51822, 51821):
            lab.run(b, ["wg", "set", "wg0", "listen-port", str(port)])
            lab.run(b, ["ping", "-c", "1", "-W", "5", "100.64.0.1"])
            assert wa.stats()[kb.public].endpoint == (b.ip, port)
            sent = wa.messages_sent
            assert not wa.set_peers([attrs.evolve(peer_b, endpoint=None)])
            assert wa.messages_sent == sent

        # Bulk diff: 300 new peers in one SET_DEVICE message; the stock tool agrees.
        extra = [PeerConfig(Key.from_raw(i.to_bytes(32, "big")), [f"fd7a::1:{i:x}/128"],
                            ("198.51.100.77", 20000 + i), 25) for i in range(1, 301)]
        sent = wa.messages_sent
        diff = wa.set_peers([peer_b, *extra])
        assert (len(diff.add), len(diff.update), len(diff.remove)) == (300, 0, 0)
        assert wa.messages_sent == sent + 1
        assert len(lab.run(a, ["wg", "show", "wg0", "peers"]).stdout.split()) == 301
        # one endpoint move + one removal: one message, only those two peers touched
        moved = [PeerConfig(extra[1].public_key, extra[1].allowed_ips, ("198.51.100.78", 1), 25),
                 *extra[2:], peer_b]
        sent = wa.messages_sent
        diff = wa.set_peers(moved)
        assert (len(diff.add), len(diff.update), len(diff.remove)) == (0, 1, 1)
        assert wa.messages_sent == sent + 1
        dump = lab.run(a, ["wg", "show", "wg0", "endpoints"]).stdout
        assert f"{extra[1].public_key.b64()}\t198.51.100.78:1" in dump
        assert extra[0].public_key.b64() not in dump

        # The data plane's port sends 299 peers to the relay in one loop turn (a first
        # netmap does that): their bridge endpoints go out in one message, off the loop.
        loop = asyncio.new_event_loop()
        port = wa.open_port(loop)
        try:
            port.start(lambda data, addr: None, lambda key, data: None)
            sent = wa.messages_sent
            for p in moved[:-1]:
                port.use_relay(p.public_key)
            loop.run_until_complete(asyncio.sleep(0))
            wait_for(lambda: wa.messages_sent > sent, 30, "the relay endpoints' message")
            bridged = {ln.split("\t")[0]: ln.split("\t")[1] for ln in lab.run(
                a, ["wg", "show", "wg0", "endpoints"]).stdout.splitlines()}
            assert wa.messages_sent == sent + 1
            assert {k for k, ep in bridged.items() if ep.startswith("127.0.0.1:")} == {
                p.public_key.b64() for p in moved[:-1]}
            assert len(set(bridged.values())) == len(moved)  # one bridge socket each
        finally:
            port.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        # Adoption: a second backend on the live interface starts from the kernel's state.
        again = KernelBackend("wg0", netns=a.ns)
        again.up(InterfaceConfig("wg0", ka, listen_port=wa.listen_port, fwmark=0x5157,
                                 addresses=["100.64.0.1/24", "fd7a::1/64"]))
        try:
            assert set(again.peers()) == {p.public_key for p in moved}
            assert again.peers()[kb.public].allowed_ips == peer_b.allowed_ips
            assert {str(n) for n in again.routes} == {"10.99.0.0/24"}
            assert again.set_peers([peer_b]).remove and len(again.peers()) == 1
        finally:
            again.close()  # leaves the link: ``wa`` owns it
        lab.run(a, ["ping", "-c", "1", "-W", "5", "100.64.0.2"])

        secret = (ka.b64(), kb.b64())
        # Device dumps no longer pass through pyroute2 (parse_dump reads the bytes and
        # skips the key); whatever the loggers said, pyroute2's DEBUG included, and every
        # repr must still be free of the key.
        assert seen
        for text in (repr(wa), repr(wa.info()), repr(wa.stats()), caplog.text, *seen):
            assert not any(s in text for s in secret)
    finally:
        logging.getLogger().removeHandler(tap)
        wa.down()
        wb.down()
    assert "wg0" not in lab.run(a, ["ip", "link"]).stdout
