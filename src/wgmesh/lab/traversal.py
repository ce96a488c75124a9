"""One traversal node over a plain UDP port, for lab tests and the benchmark.

``python -m wgmesh.lab.traversal`` runs the node's production data-plane driver
(:class:`~wgmesh.node.dataplane.DataPlane`: the real :class:`~wgmesh.traversal.Traversal`,
the real relay client for call-me-maybe, netcheck from the port) with no WireGuard
behind it: a :class:`PlainPort` stands in for the WireGuard port. So a lab test sees
exactly the decisions a Node would make through real NATs, and prints them as JSON
lines (``netcheck``, ``relay``, ``path``, ``final``), each stamped with the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from wgmesh.keys import Key, PrivateKey
from wgmesh.traversal import RELAY

__all__ = ["NoWireGuard", "PlainPort"]

Addr = tuple[str, int]


class PlainPort:
    """The :class:`~wgmesh.wireguard.backend.Port` of a bare UDP socket: disco and STUN only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.sock.setblocking(False)
        self.loop = loop

    def start(self, on_datagram: Callable[[bytes, Addr], None],
              on_wireguard_for_relay: Callable[[Key, bytes], None]) -> None:
        def readable() -> None:
            for _ in range(64):
                try:
                    data, src = self.sock.recvfrom(2048)
                except OSError:
                    return
                on_datagram(data, (src[0], src[1]))

        self.loop.add_reader(self.sock.fileno(), readable)

    def send(self, data: bytes, addr: Addr) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, addr)

    def use_relay(self, key: Key) -> None:
        pass  # no WireGuard here: the path decision is what is being measured

    def use_direct(self, key: Key, addr: Addr, handshake: bool = False) -> None:
        pass

    def use_socket(self, key: Key, send: Callable[[bytes], None]) -> None:
        pass

    def inject(self, key: Key, data: bytes) -> None:
        pass

    def seen_endpoint(self, endpoint: Addr | None, path: str) -> Any:
        return RELAY if path == "relay" else endpoint

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class NoWireGuard:
    """A backend with no peers: the data plane polls stats and finds none."""

    kind = "none"

    def stats(self) -> dict[Key, Any]:
        return {}


def _emit(**kw: Any) -> None:
    print(json.dumps({**kw, "wall": time.time()}), flush=True)


async def _node(a: argparse.Namespace) -> None:
    from wgmesh.node.dataplane import DataPlane
    from wgmesh.node.netcheck import StunServer
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.traversal import Candidates, Traversal, TraversalConfig

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    node = PrivateKey.load(a.key_file)
    peer, peer_disco = Key(a.peer), Key(a.peer_disco)
    cfg = TraversalConfig(active_timeout=None, port_search=not a.no_port_search,
                          search_ports=a.search_ports)
    trav = Traversal(PrivateKey.load(a.disco_key_file), node.public, cfg, wall=time.time,
                     random_bytes=os.urandom)
    relay = RelayClient(node, [a.relay])
    done = asyncio.Event()
    directs: list[float] = []

    def on_path(key: Key, st: Any) -> None:
        info = trav.path(key)
        _emit(event="path", t=time.monotonic() - t0, path=st.path, endpoint=st.endpoint,
              rtt=st.rtt, reason=st.reason, sock=info.sock if info else 0)
        if st.path == "direct":
            directs.append(time.monotonic())
            if a.exit_after_direct is not None and len(directs) == a.directs:
                loop.call_later(a.exit_after_direct, done.set)

    servers = [StunServer((h, int(p))) for h, p in (s.rsplit(":", 1) for s in a.stun)]
    cands = Candidates(a.port)
    tasks: set[asyncio.Task[None]] = set()

    async def restun() -> None:
        """What the Node does: netcheck from the port, then publish (here: call-me-maybe)."""
        report = await dp.netcheck(servers)
        cands.update(lan=report.local_addresses, reflexive=[r for r in (report.ipv4,) if r],
                     hard_nat=report.hard_nat)
        _emit(event="netcheck", t=time.monotonic() - t0, ipv4=report.ipv4,
              hard_nat=report.hard_nat, candidates=[str(e) for e in cands.endpoints])
        dp.set_local(list(cands.addrs), report.hard_nat)

    def on_stale(reason: str) -> None:
        task = loop.create_task(restun())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    port = PlainPort(loop, a.port)
    dp = DataPlane(NoWireGuard(), port, relay, trav,  # type: ignore[arg-type]
                   on_path_changed=on_path, on_candidates_stale=on_stale)
    dp.start()
    if a.portmap:
        from wgmesh.node.portmapper import PortMapper

        def on_mapped(ep: Addr | None) -> None:
            """As the Node does: the mapping is a candidate, announced in a new round."""
            cands.update(mapped=[ep] if ep else [])
            _emit(event="portmap", t=time.monotonic() - t0, endpoint=ep)
            dp.set_local(list(cands.addrs), trav.local.hard_nat)

        mapper = PortMapper(a.port, on_change=on_mapped)
        mapper.start()
    await restun()
    await relay.start()
    _emit(event="relay", t=time.monotonic() - t0, rtt=await relay.ping())
    dp.upsert_peer(peer, peer_disco, [], None)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), a.duration)
    finally:
        info = trav.path(peer)
        _emit(event="final", t=time.monotonic() - t0,
              path=info.state.value if info else None,
              endpoint=info.endpoint if info else None, rtt=info.rtt if info else None,
              counters=dict(trav.peers[peer].counters) if peer in trav.peers else {})
        await dp.close()
        await relay.close()
        if a.portmap:
            await mapper.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.lab.traversal",
                                 description="one traversal node on a UDP port (lab use)")
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--disco-key-file", required=True)
    ap.add_argument("--peer", required=True, help="peer node key (base64)")
    ap.add_argument("--peer-disco", required=True, help="peer disco key (base64)")
    ap.add_argument("--relay", required=True, help="relay URL")
    ap.add_argument("--stun", action="append", default=[], help="HOST:PORT (repeat)")
    ap.add_argument("--port", type=int, default=41641)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--search-ports", type=int, default=256)
    ap.add_argument("--no-port-search", action="store_true")
    ap.add_argument("--portmap", action="store_true",
                    help="map the port on the gateway (PCP, NAT-PMP, UPnP-IGD), as a node does")
    ap.add_argument("--exit-after-direct", type=float, metavar="SECONDS",
                    help="stop this long after the path went direct (--directs times)")
    ap.add_argument("--directs", type=int, default=1)
    a = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_node(a))


if __name__ == "__main__":
    main(sys.argv[1:])
