"""A userspace WireGuard interface whose only path to its peer is a relay.

Run in a lab host: ``relay_wg_node.py IFNAME KEYFILE ADDR/24 RELAYS PEERKEY PEERADDR``.
This is the whole bridge between the two components::

    relay = RelayClientThread(key, relays, on_packet=backend.inject_from_relay)
    backend.set_peer_relay(peer, functools.partial(relay.send, peer))

Prints one JSON line when up; runs until SIGTERM.
"""

from __future__ import annotations

import functools
import json
import signal
import sys

from wgmesh.keys import Key, PrivateKey
from wgmesh.relaynet.client import RelayClientThread
from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig
from wgmesh.wireguard.userspace import UserspaceBackend


def main() -> int:
    ifname, keyfile, addr, relays, peer_b64, peer_addr = sys.argv[1:7]
    key = PrivateKey.load(keyfile)
    peer = Key(peer_b64)
    backend = UserspaceBackend(ifname, uapi=False)
    backend.up(InterfaceConfig(ifname, key, addresses=[addr]))
    backend.set_peers([PeerConfig(peer, allowed_ips=[f"{peer_addr}/32"])])
    relay = RelayClientThread(key, relays.split(","), on_packet=backend.inject_from_relay)
    relay.start(timeout=20)
    backend.set_peer_relay(peer, functools.partial(relay.send, peer))
    print(json.dumps({"ready": True, "ifname": ifname}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: backend.down())
    backend.wait()
    relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
