"""``wgmesh up`` (the node agent, in the foreground) and the commands that talk to it:
``down``, ``status``, ``ping``, and the peer-name lookup the file commands use.

The agent itself is :mod:`wgmesh.node.agent`; everything here is argparse, printing,
and calls over its local API socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from wgmesh.display import text_table
from wgmesh.errors import WgmeshError
from wgmesh.node.localapi import DEFAULT_SOCKET, call
from wgmesh.node.status import PEER_COLUMNS, PeerStatus, PingResult, Status

__all__ = ["add_parser", "resolve_peer"]


def _up(a: argparse.Namespace) -> int:
    from wgmesh.node.agent import run_agent

    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def announce(st: Status) -> None:
        print(f"wgmesh up: {st.name} {st.ipv4} ({st.backend_reason}); "
              f"local API {a.socket}", flush=True)

    asyncio.run(run_agent(a.control, authkey=a.authkey, state_dir=a.state_dir,
                          backend=a.backend, hostname=a.hostname, ifname=a.ifname,
                          listen_port=a.port, socket_path=a.socket, on_up=announce))
    return 0


def _down(a: argparse.Namespace) -> int:
    call("down", path=a.socket)
    print("wgmesh: agent stopping")
    return 0


def _status(a: argparse.Namespace) -> int:
    st = call("status", path=a.socket)
    if a.json:
        print(json.dumps(st))
        return 0
    print(f"{st['name']}  {st['ipv4']}  {st['ipv6']}  backend {st['backend']}  "
          f"port {st['listen_port']}  home relay {st['home_relay']}  control "
          f"{'online' if st['control_online'] else 'offline'}")
    rows = [PeerStatus(**p).row() for p in st["peers"]]
    print(text_table(rows, PEER_COLUMNS) if rows else "no peers")
    return 0


def _ping(a: argparse.Namespace) -> int:
    failed = 0
    for _ in range(a.count):
        r = PingResult(**call("ping", {"peer": a.peer, "timeout": a.timeout}, path=a.socket,
                              timeout=a.timeout + 10))
        print(json.dumps(r.to_json()) if a.json else r)
        failed += r.rtt_ms is None
    return 1 if failed == a.count else 0


def resolve_peer(ref: str, socket_path: str = DEFAULT_SOCKET) -> str:
    """A peer name (or address) to its tunnel address, asking the running agent."""
    for p in call("status", path=socket_path)["peers"]:
        if ref in (p["name"], p["ipv4"], p["ipv6"]):
            return str(p["ipv4"])
    raise WgmeshError(f"no peer {ref!r} in the running node's netmap")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``up``, ``down``, ``status`` and ``ping``."""
    def sock(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", default=DEFAULT_SOCKET,
                       help=f"the agent's local API socket (default {DEFAULT_SOCKET})")

    up = sub.add_parser("up", help="join a mesh: run the node agent (foreground)")
    up.add_argument("--control", required=True, metavar="URL", help="control service URL")
    up.add_argument("--authkey", metavar="KEY", help="auth key (needed on first start)")
    up.add_argument("--state-dir", default="/var/lib/wgmesh",
                    help="keys, identity, cached netmap (default /var/lib/wgmesh)")
    up.add_argument("--backend", default="auto", choices=["auto", "kernel", "userspace"])
    up.add_argument("--hostname", help="node name to ask for (default: the host name)")
    up.add_argument("--ifname", default="wgmesh0", help="WireGuard interface name")
    up.add_argument("--port", type=int, default=0, help="WireGuard UDP port (0: any)")
    up.add_argument("-v", "--verbose", action="store_true")
    sock(up)
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the running agent and remove its interface")
    sock(down)
    down.set_defaults(func=_down)

    st = sub.add_parser("status", help="this node and its peers: paths, latency, traffic")
    st.add_argument("--json", action="store_true")
    sock(st)
    st.set_defaults(func=_status)

    pg = sub.add_parser("ping", help="ping a peer through the tunnel, showing the path")
    pg.add_argument("peer", help="peer name or tunnel address")
    pg.add_argument("-c", "--count", type=int, default=1)
    pg.add_argument("--timeout", type=float, default=5.0)
    pg.add_argument("--json", action="store_true")
    sock(pg)
    pg.set_defaults(func=_ping)
