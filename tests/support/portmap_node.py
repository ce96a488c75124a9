"""A port mapper on a lab host, as a node runs it: ``python portmap_node.py PORT [options]``.

Holds a UDP socket on PORT (the stand-in WireGuard port) and a
:class:`~wgmesh.node.portmapper.PortMapper` for it. Prints one JSON object a line:
``{"endpoint": "ip:port" | null}`` on every change, ``{"report": ...}`` when the first
round settles, ``{"got": text, "from": "ip:port"}`` for each datagram on PORT
(answered with ``pong``), and ``{"closed": report}`` after SIGTERM made it delete its
mapping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
from pathlib import Path
from typing import Any

from wgmesh.node.portmapper import PortMapper
from wgmesh.portmap import Address


def emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


class Listener(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        emit(got=data.decode(errors="replace"), **{"from": f"{addr[0]}:{addr[1]}"})
        self.transport.sendto(b"pong", addr)  # type: ignore[attr-defined]


async def main(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", a.port))
    await loop.create_datagram_endpoint(Listener, sock=sock)

    def changed(ep: Address | None) -> None:
        emit(endpoint=None if ep is None else f"{ep[0]}:{ep[1]}")

    pm = PortMapper(a.port, methods=a.methods, gateway=a.gateway, on_change=changed,
                    state_file=Path(a.state) if a.state else None, lifetime=a.lifetime,
                    check_interval=a.check, retry_interval=a.retry, remap_spread=0.5,
                    upnp_timeout=4, upnp_discover_ms=500)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pm.start()
    await pm.wait_settled()
    emit(report=pm.report())
    await stop.wait()
    await pm.close()
    emit(closed=pm.report())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--methods", nargs="+", default=["pcp", "natpmp", "upnp"])
    ap.add_argument("--gateway")
    ap.add_argument("--state")
    ap.add_argument("--lifetime", type=int, default=600)
    ap.add_argument("--check", type=float, default=1.0)
    ap.add_argument("--retry", type=float, default=5.0)
    asyncio.run(main(ap.parse_args()))
