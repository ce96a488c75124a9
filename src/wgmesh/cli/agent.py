"""``wgmesh up`` (the node agent, in the foreground) and the commands that talk to it:
``down``, ``status``, ``ping``, ``pin``/``unpin``, and the peer-name lookup the file
commands use.

The agent itself is :mod:`wgmesh.node.agent`; everything here is argparse, printing,
and calls over its local API socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from typing import Any

from wgmesh.cli.output import socket_option
from wgmesh.display import text_table
from wgmesh.errors import WgmeshError
from wgmesh.node.events import EVENT_NAMES
from wgmesh.node.localapi import DEFAULT_SOCKET, call
from wgmesh.node.status import PEER_COLUMNS, PeerStatus, PingResult, Status
from wgmesh.wireguard.backend import DEFAULT_MTU

__all__ = ["add_parser", "resolve_peer"]


def _up(a: argparse.Namespace) -> int:
    from wgmesh.libc import steady_heap
    from wgmesh.node.agent import run_agent

    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def announce(st: Status) -> None:
        print(f"wgmesh up: {st.name} {st.ipv4} ({st.backend_reason}); "
              f"local API {a.socket}", flush=True)

    steady_heap()  # relayed packets arrive in big reads (the relay bridge, the device)
    asyncio.run(run_agent(a.control, authkey=a.authkey, state_dir=a.state_dir,
                          backend=a.backend, hostname=a.hostname, ifname=a.ifname,
                          listen_port=a.port, socket_path=a.socket, on_up=announce,
                          metrics_listen=a.metrics_listen, metrics_any=a.metrics_listen_any,
                          control_key=a.control_key, control_ca=a.control_ca,
                          node_options=_routing_options(a)))
    return 0


def _routing_options(a: argparse.Namespace) -> dict[str, Any]:
    """``up``'s route, exit-node, MTU and DNS flags as AsyncNode keyword arguments."""
    return {"advertise_routes": [r for r in a.advertise_routes.split(",") if r],
            "accept_routes": a.accept_routes, "snat_subnet_routes": a.snat_subnet_routes,
            "advertise_exit_node": a.advertise_exit_node, "exit_node": a.exit_node,
            "exit_node_allow_lan_access": a.exit_node_allow_lan_access, "mtu": a.mtu,
            "dns": not a.no_dns, "dns_resolv_conf": a.dns_resolv_conf,
            "dns_hosts_file": a.dns_hosts_file}


def _down(a: argparse.Namespace) -> int:
    try:
        call("down", path=a.socket)
    except WgmeshError:
        if a.state_dir is None:
            raise
        from wgmesh.node.routes import undo_host_changes

        undo_host_changes(a.state_dir)  # the agent was killed: restore routes and rules
        print("wgmesh: no agent running; host routes and rules restored")
        return 0
    print("wgmesh: agent stopping")
    return 0


def _status(a: argparse.Namespace) -> int:
    st = call("status", path=a.socket)
    if a.explain is not None:
        peer = next((p for p in st["peers"]
                     if a.explain in (p["name"], p["ipv4"], p["ipv6"])), None)
        if peer is None:
            raise WgmeshError(f"no peer {a.explain!r} in the running node's netmap")
        print(json.dumps(peer) if a.json else PeerStatus(**peer).explain())
        return 0
    if a.json:
        print(json.dumps(st))
        return 0
    print(f"{st['name']}  {st['ipv4']}  {st['ipv6']}  backend {st['backend']}  "
          f"port {st['listen_port']}  home relay {st['home_relay']}  control "
          f"{'online' if st['control_online'] else 'offline'}")
    if st.get("state", "running") != "running":
        print(f"{st['state']}: {st['state_reason']}")
    routes = st.get("routes") or {}
    mtu = st.get("mtu")
    if st.get("interface_mtu") not in (None, mtu):
        mtu = f"{st['interface_mtu']} (asked {mtu}, lowered to the narrowest path)"
    if st.get("mtu") not in (None, DEFAULT_MTU) or mtu != st.get("mtu") \
            or routes.get("advertised") or routes.get("accept_routes") or routes.get("exit_node"):
        print(f"mtu {mtu}  advertising {','.join(routes.get('advertised', [])) or '-'}"
              f"  accept routes {'yes' if routes.get('accept_routes') else 'no'}  exit node "
              f"{routes.get('exit_active') or routes.get('exit_node') or '-'}")
    if st.get("dns"):
        print(f"mesh DNS {st['dns']['domain']}  system hook {st['dns']['hook']}")
    if st.get("control_rejected"):
        print(f"refused from control (kept the last good netmap): {st['control_rejected']}")
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


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: say true or false")


def _pin(a: argparse.Namespace) -> int:
    call("pin", {"peer": a.peer, "mode": a.mode}, path=a.socket)
    print(f"{a.peer}: pinned to {a.mode}")
    return 0


def _unpin(a: argparse.Namespace) -> int:
    call("unpin", {"peer": a.peer}, path=a.socket)
    print(f"{a.peer}: unpinned")
    return 0


def _events(a: argparse.Namespace) -> int:
    evs = call("events", {"name": a.name} if a.name else {}, path=a.socket)
    if a.json:
        print(json.dumps(evs))
        return 0
    rows = [{"time": time.strftime("%H:%M:%S", time.localtime(e["at"])), "event": e["name"],
             "data": " ".join(f"{k}={v}" for k, v in e["data"].items())} for e in evs]
    print(text_table(rows, ["time", "event", "data"]) if rows else "no events")
    return 0


def _pin_mode(text: str) -> str:
    if text in ("direct", "relay") or (text.isascii() and text.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: direct, relay or a relay region id")


def resolve_peer(ref: str, socket_path: str | None = None) -> str:
    """A peer name to its tunnel address, asking the running agent; an address as is
    (so ``file send ADDR`` needs no agent, like ``python -m wgmesh.cli.file``)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(ref.strip("[]")))
    for p in call("status", path=socket_path or DEFAULT_SOCKET)["peers"]:
        if ref in (p["name"], p["ipv4"], p["ipv6"]):
            return str(p["ipv4"])
    raise WgmeshError(f"no peer {ref!r} in the running node's netmap")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``up``, ``down``, ``status``, ``ping``, ``pin``, ``unpin`` and ``events``."""
    sock = socket_option

    up = sub.add_parser("up", help="join a mesh: run the node agent (foreground)")
    up.add_argument("--control", required=True, metavar="URL", help="control service URL")
    up.add_argument("--authkey", metavar="KEY", help="auth key (needed on first start)")
    up.add_argument("--control-key", metavar="KEY",
                    help="pin the control key (ctrlkey:...; `wgmesh control key` prints it); "
                         "default: the one in the auth key, else trust the first one seen")
    up.add_argument("--control-ca", metavar="FILE",
                    help="CA bundle for a control service with a private CA")
    up.add_argument("--state-dir", default="/var/lib/wgmesh",
                    help="keys, identity, cached netmap (default /var/lib/wgmesh)")
    up.add_argument("--backend", default="auto", choices=["auto", "kernel", "userspace"])
    up.add_argument("--hostname", help="node name to ask for (default: the host name)")
    up.add_argument("--ifname", default="wgmesh0", help="WireGuard interface name")
    up.add_argument("--port", type=int, default=0, help="WireGuard UDP port (0: any)")
    up.add_argument("--metrics-listen", metavar="IP:PORT",
                    help="serve Prometheus metrics there (default: off)")
    up.add_argument("--metrics-listen-any", action="store_true",
                    help="allow --metrics-listen on 0.0.0.0 or :: (every network)")
    up.add_argument("--advertise-routes", default="", metavar="CIDR,...",
                    help="offer to route to these networks behind this node (once approved)")
    up.add_argument("--accept-routes", action="store_true",
                    help="use the subnet routes other nodes offer (off by default)")
    up.add_argument("--snat-subnet-routes", type=_bool, default=True, metavar="true|false",
                    help="masquerade traffic this node routes into its subnets (default true)")
    up.add_argument("--advertise-exit-node", action="store_true",
                    help="offer this node as an exit node (the /0 routes, once approved)")
    up.add_argument("--exit-node", metavar="NAME",
                    help="send internet traffic through this peer (an approved exit node)")
    up.add_argument("--exit-node-allow-lan-access", action="store_true",
                    help="with --exit-node: keep the local LAN direct")
    up.add_argument("--mtu", type=int, default=DEFAULT_MTU,
                    help=f"tunnel interface MTU (default {DEFAULT_MTU})")
    up.add_argument("--no-dns", action="store_true",
                    help="serve no mesh DNS (NAME.DOMAIN on the tunnel address, port 53)")
    up.add_argument("--dns-resolv-conf", metavar="FILE",
                    help="without systemd-resolved: point this resolv.conf at the mesh DNS "
                         "(restored on down)")
    up.add_argument("--dns-hosts-file", metavar="FILE",
                    help="keep a managed block of mesh names in this hosts file")
    up.add_argument("-v", "--verbose", action="store_true")
    sock(up)
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the running agent and remove its interface")
    down.add_argument("--state-dir", help="if no agent answers (it was killed): restore the "
                                          "host routes and rules it recorded here")
    sock(down)
    down.set_defaults(func=_down)

    st = sub.add_parser("status", help="this node and its peers: paths, latency, traffic")
    st.add_argument("--json", action="store_true")
    st.add_argument("--explain", metavar="PEER",
                    help="why PEER's path is what it is, and the candidates tried")
    sock(st)
    st.set_defaults(func=_status)

    pg = sub.add_parser("ping", help="ping a peer through the tunnel, showing the path")
    pg.add_argument("peer", help="peer name or tunnel address")
    pg.add_argument("-c", "--count", type=int, default=1)
    pg.add_argument("--timeout", type=float, default=5.0)
    pg.add_argument("--json", action="store_true")
    sock(pg)
    pg.set_defaults(func=_ping)

    pn = sub.add_parser("pin", help="hold a peer's path: direct, relay or a relay region id")
    pn.add_argument("peer", help="peer name or tunnel address")
    pn.add_argument("mode", type=_pin_mode, metavar="MODE",
                    help="direct | relay | REGION_ID (the pin_failed event says when a "
                         "direct pin cannot be had)")
    sock(pn)
    pn.set_defaults(func=_pin)

    un = sub.add_parser("unpin", help="let traversal choose a peer's path again")
    un.add_argument("peer", help="peer name or tunnel address")
    sock(un)
    un.set_defaults(func=_unpin)

    ev = sub.add_parser("events", help="the agent's recent events (path changes, pin_failed, "
                                       "key_expiring, ...)")
    ev.add_argument("--name", choices=EVENT_NAMES, metavar="NAME",
                    help=f"only events of this kind ({', '.join(EVENT_NAMES)})")
    ev.add_argument("--json", action="store_true")
    sock(ev)
    ev.set_defaults(func=_events)
