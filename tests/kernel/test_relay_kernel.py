"""Kernel tier: kernel WireGuard on two hosts behind UDP-blocking NATs, via a real relay.

The relay is ``wgmesh relay serve`` on a public host; each node's side is the
kernel bridge (:class:`~wgmesh.wireguard.proxy.RelayBridge`, loopback UDP
endpoints) feeding a :class:`~wgmesh.relaynet.client.RelayClient` whose TCP
socket lives in that node's namespace. Ping, then 10 MB with a matching
sha256 through the tunnel (4 MB: the VM is emulated, unlike the host tier's 50 MB).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from flows import transfer

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Lab
from wgmesh.loopthread import LoopThread

pytestmark = [pytest.mark.kernel, pytest.mark.netns]
#: Estimated seconds in the emulated VM (tests/support/vmtier.py balances its VMs by it).
VM_COST_S = 100



def test_kernel_wireguard_through_the_relay(lab: Lab, tmp_path: Path) -> None:
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig
    from wgmesh.wireguard.kernel import KernelBackend
    from wgmesh.wireguard.netns import socket_in
    from wgmesh.wireguard.proxy import RelayBridge

    relay = lab.add_public_host("relay")
    a, b = lab.add_node_host("a", "udp-blocked"), lab.add_node_host("b", "udp-blocked")
    srv = lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen", f"{relay.ip}:3340",
                     "--key-file", str(tmp_path / "relay.key"))
    srv.wait_for_output('"listening"', timeout=120)
    url = f"http://{relay.ip}:3340"
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    wa, wb = KernelBackend("wg0", netns=a.ns), KernelBackend("wg0", netns=b.ns)
    thread = LoopThread("relay-clients")

    async def node(ns: str, key: PrivateKey, port: int) -> tuple[RelayClient, RelayBridge]:
        def make(family: int) -> socket.socket:  # the relay's TCP socket, in the node's netns
            return socket_in(ns, family, socket.SOCK_STREAM)

        bridge_box: list[RelayBridge] = []
        client = RelayClient(key, [url], make_socket=make,
                             on_packet=lambda src, pkt: bridge_box[0].deliver(src, pkt))
        bridge = RelayBridge(thread.loop, client.send_nowait, port, netns=ns)
        bridge_box.append(bridge)
        await client.start(wait=30)
        return client, bridge

    clients = []
    try:
        wa.up(InterfaceConfig("wg0", ka, listen_port=51820, addresses=["100.64.9.1/24"]))
        wb.up(InterfaceConfig("wg0", kb, listen_port=51821, addresses=["100.64.9.2/24"]))
        ca, ba = thread.call(node(a.ns, ka, 51820), 60)
        cb, bb = thread.call(node(b.ns, kb, 51821), 60)
        clients = [ca, cb]
        wa.set_peers([PeerConfig(kb.public, ["100.64.9.2/32"], ba.add(kb.public))])
        wb.set_peers([PeerConfig(ka.public, ["100.64.9.1/32"], bb.add(ka.public))])
        lab.run(a, ["ping", "-c", "3", "-i", "0.3", "-W", "10", "100.64.9.2"], timeout=90)
        payload = tmp_path / "four.bin"  # the VM CPU is emulated: keep CI time sane
        payload.write_bytes(os.urandom(4 * 1024 * 1024))
        transfer(lab, a, b, "100.64.9.2", payload, timeout=600)
        assert ba.counters(kb.public).to_relay > 2800  # the kernel's packets took the relay
    finally:
        for c in clients:
            thread.call(c.close(), 60)
        thread.stop()
        wa.down()
        wb.down()
