"""``wgmesh netcheck``: what this host's network allows, from given STUN servers or from
the running agent's WireGuard port."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import attrs

from wgmesh.cli.output import socket_option
from wgmesh.errors import WgmeshError
from wgmesh.netmap import RelayMap, relay_map_from_json
from wgmesh.node.localapi import call
from wgmesh.node.netcheck import (
    NetcheckReport,
    StunServer,
    format_addr,
    netcheck,
    parse_addr,
    servers_from_relay_map,
)
from wgmesh.node.portmapper import probe

__all__ = ["add_parser", "format_report"]


def format_report(r: NetcheckReport, relay_map: RelayMap | None = None) -> str:
    """The report as aligned lines, relay regions by name when ``relay_map`` is given."""
    def yn(v: bool | None) -> str:
        return "unknown" if v is None else "yes" if v else "no"

    lines = [
        f"UDP:                 {yn(r.udp)}",
        f"IPv4:                {format_addr(r.ipv4) if r.ipv4 else 'no'}",
        f"IPv6:                {format_addr(r.ipv6) if r.ipv6 else 'no'}",
        f"Mapping varies:      {yn(r.mapping_varies_by_dest)}"
        + (" (hard NAT)" if r.hard_nat else ""),
        f"Hairpinning:         {yn(r.hairpin)}",
    ]
    if r.nat_type is not None:
        lines.append(f"NAT type (RFC 3489): {r.nat_type}")
    if r.local_addresses:
        lines.append(f"Local addresses:     {', '.join(r.local_addresses)}")
    if r.region_latency:
        lines.append("Relay regions:")
        for rid, lat in sorted(r.region_latency.items()):
            reg = relay_map.region(rid) if relay_map else None
            name = f"{rid} ({reg.code})" if reg else str(rid)
            ms = "no reply" if lat is None else f"{lat * 1000:.1f} ms"
            star = "  <- preferred" if rid == r.preferred_region else ""
            lines.append(f"  {name}: {ms}{star}")
    if r.portmap is not None:
        lines += _portmap_lines(r.portmap)
    return "\n".join(lines)


def _portmap_lines(pm: dict[str, Any]) -> list[str]:
    held = f"{pm['external']} ({pm['method']})" if pm.get("external") else "none held"
    lines = [f"Port mapping:        gateway {pm.get('gateway') or 'none'}"
             + (f", {held}" if "external" in pm else "")]
    for method, a in pm.get("protocols", {}).items():
        lines.append(f"  {method}: " + (f"maps to {a['external']}" if a["ok"]
                                        else f"no ({a['error']})"))
    return lines


async def _probe_both(servers: list[StunServer], sock: socket.socket | None,
                      a: argparse.Namespace) -> NetcheckReport:
    """STUN and the gateway's port mapping protocols at the same time."""
    mapping = asyncio.ensure_future(probe(timeout=a.timeout + 2))
    report = await asyncio.to_thread(netcheck, servers, sock=sock, timeout=a.timeout,
                                     classic=parse_addr(a.classic) if a.classic else None)
    return attrs.evolve(report, portmap=await mapping)


def _cmd(a: argparse.Namespace) -> int:
    relay_map = None
    servers = [StunServer(parse_addr(s)) for s in a.stun]
    if a.relay_map:
        try:
            relay_map = relay_map_from_json(json.loads(Path(a.relay_map).read_text()))
        except (OSError, ValueError) as e:
            raise WgmeshError(f"--relay-map {a.relay_map}: {e}") from e
        servers += servers_from_relay_map(relay_map)
    if not servers:
        return _from_agent(a)
    sock = None
    if a.port:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", a.port))
        except OSError as e:
            raise WgmeshError(f"--port {a.port}: {e.strerror}") from e
    try:
        report = asyncio.run(_probe_both(servers, sock, a))
    finally:
        if sock is not None:
            sock.close()
    print(json.dumps(report.to_json()) if a.json else format_report(report, relay_map))
    return 0


def _from_agent(a: argparse.Namespace) -> int:
    """No servers given: ask the running node agent, which probes from its WireGuard port
    against its netmap's relays (the mapping its WireGuard packets really get)."""
    try:
        d = call("netcheck", path=a.socket, timeout=a.timeout + 30)
    except WgmeshError as e:
        raise WgmeshError(f"{e}; or give --stun HOST[:PORT] / --relay-map FILE") from None
    print(json.dumps(d) if a.json else format_report(NetcheckReport.from_json(d)))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``wgmesh netcheck``."""
    p = sub.add_parser("netcheck", help="report UDP, reflexive addresses, NAT hardness, "
                                         "relay latency and hairpinning")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--stun", action="append", default=[], metavar="HOST[:PORT]",
                   help="a STUN server (repeat; two or more tell a hard NAT)")
    p.add_argument("--relay-map", metavar="FILE", help="relay map JSON: every relay's STUN")
    p.add_argument("--classic", metavar="HOST[:PORT]",
                   help="also run the RFC 3489 NAT-type test against this CHANGE-REQUEST "
                        "server (e.g. coturn with two addresses)")
    p.add_argument("--port", type=int, default=0, help="probe from this local UDP port")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    socket_option(p, "with no --stun/--relay-map: ask the node agent on this socket "
                     "(env WGMESH_SOCKET)")
    p.set_defaults(func=_cmd)
