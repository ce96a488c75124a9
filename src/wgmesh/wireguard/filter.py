"""The node's inbound packet filter: the ACL rules from the netmap, enforced on the tunnel.

Two enforcers of the same rules:

* :class:`PacketFilter` (sans-I/O) for the userspace device: it sees every
  decrypted inbound packet and every outbound one, keeps connection tracking of
  the flows this node started (so replies pass), and accepts a new inbound flow
  only if a rule does. Decisions are cached per flow, so the per-packet cost is a
  header slice and a dict lookup.
* :func:`nft_ruleset` for the kernel backend: the same policy as an nftables
  table on the WireGuard interface (``ct state established,related`` plays the
  part of the tracking). :func:`nft_replace` and :func:`nft_delete` are the
  scripts that swap it in and take it out; running ``nft`` is the kernel
  backend's business (:mod:`wgmesh.wireguard.nftables`).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from wgmesh.netmap import FilterRule
from wgmesh.wireguard.allowedips import parse_network

__all__ = ["PacketFilter", "nft_delete", "nft_replace", "nft_ruleset", "parse_flow"]

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
_PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMP6: "icmp"}
FLOW_TTL = {TCP: 3600.0, UDP: 180.0, ICMP: 30.0, ICMP6: 30.0}
MAX_FLOWS = 65536
MAX_DECISIONS = 16384

Flow = tuple[int, bytes, int, bytes, int]  # proto, src, sport, dst, dport


# IPv6 extension headers a flow can hide behind: hop-by-hop, routing, fragment,
# destination options, AH. The walk is bounded so a chain of them costs O(1).
HOPOPT, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51
_EXTENSIONS = frozenset((HOPOPT, ROUTING, FRAGMENT, DSTOPTS, AH))
MAX_EXTENSIONS = 8


def _skip_ipv6_extensions(pkt: bytes | memoryview) -> tuple[int, int, bool] | None:
    """(upper protocol, its offset, is a non-first fragment) of an IPv6 packet.

    None when the chain is truncated or longer than :data:`MAX_EXTENSIONS`: a packet
    whose real protocol cannot be found is malformed, never judged by a header's type.
    """
    proto, off, seen = pkt[6], 40, 0
    while proto in _EXTENSIONS:
        if seen == MAX_EXTENSIONS or len(pkt) < off + 8:
            return None
        seen += 1
        nxt = pkt[off]
        if proto == FRAGMENT:
            if ((pkt[off + 2] << 8) | pkt[off + 3]) & 0xFFF8:  # fragment offset != 0
                return nxt, off + 8, True
            size = 8
        elif proto == AH:
            size = (pkt[off + 1] + 2) * 4
        else:
            size = (pkt[off + 1] + 1) * 8
        if len(pkt) < off + size:
            return None
        proto, off = nxt, off + size
    return proto, off, False


def parse_flow(pkt: bytes | memoryview) -> Flow | None:
    """(proto, src, sport, dst, dport) of an IP packet; ICMP echo id stands in for ports.

    None for anything too short to be IP. IPv6 extension headers are walked to the
    real protocol. Non-first fragments carry no ports and get port -1.
    """
    if len(pkt) < 20:
        return None
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
        if (pkt[6] & 0x1F) or pkt[7]:  # fragment offset != 0
            return proto, src, -1, dst, -1
        off = ihl
    elif v == 6 and len(pkt) >= 40:
        src, dst = bytes(pkt[8:24]), bytes(pkt[24:40])
        walked = _skip_ipv6_extensions(pkt)
        if walked is None:
            return None
        proto, off, later_fragment = walked
        if later_fragment:
            return proto, src, -1, dst, -1
    else:
        return None
    if proto in (TCP, UDP) and len(pkt) >= off + 4:
        return proto, src, (pkt[off] << 8) | pkt[off + 1], dst, (pkt[off + 2] << 8) | pkt[off + 3]
    if proto in (ICMP, ICMP6) and len(pkt) >= off + 6:
        ident = (pkt[off + 4] << 8) | pkt[off + 5]
        return proto, src, ident, dst, ident
    return proto, src, 0, dst, 0


class PacketFilter:
    """Default-deny inbound filter with connection tracking (see the module docstring)."""

    def __init__(self, rules: Sequence[FilterRule] = ()) -> None:
        self.flows: OrderedDict[Flow, float] = OrderedDict()
        self.counters = {"accepted": 0, "dropped": 0, "tracked": 0, "malformed": 0}
        self.set_rules(rules)

    def set_rules(self, rules: Sequence[FilterRule]) -> None:
        self._rules = [
            (tuple(parse_network(c) for c in r.src), tuple(parse_network(c) for c in r.dst),
             r.ports, r.proto) for r in rules]
        self._decisions: OrderedDict[tuple[int, bytes, bytes, int], bool] = OrderedDict()
        self.allow_all = any(
            p == "any" and ports == ((0, 65535),)
            and any(n.prefixlen == 0 and n.version == 4 for n in s)
            and any(n.prefixlen == 0 and n.version == 6 for n in s)
            and any(n.prefixlen == 0 and n.version == 4 for n in d)
            and any(n.prefixlen == 0 and n.version == 6 for n in d)
            for s, d, ports, p in self._rules)

    def outbound(self, pkt: bytes | memoryview, now: float) -> None:
        """A packet we send into the tunnel: its flow's replies become acceptable."""
        if self.allow_all:
            return
        f = parse_flow(pkt)
        if f is None:
            return
        proto, src, sport, dst, dport = f
        key = (proto, dst, dport, src, sport)  # as the reply will look
        self.flows[key] = now + FLOW_TTL.get(proto, 60.0)
        self.flows.move_to_end(key)
        if len(self.flows) > MAX_FLOWS:
            self.flows.popitem(last=False)

    def inbound(self, pkt: bytes | memoryview, now: float) -> bool:
        """Should this decrypted packet from a peer reach us?"""
        if self.allow_all:
            self.counters["accepted"] += 1
            return True
        f = parse_flow(pkt)
        if f is None:
            self.counters["malformed"] += 1
            return False
        exp = self.flows.get(f)
        if exp is not None and exp >= now:
            self.counters["tracked"] += 1
            return True
        proto, src, _sport, dst, dport = f
        if proto in (ICMP, ICMP6):
            # Only echo requests open a flow by rule; other ICMP passes with a tracked flow.
            dport = 0
        ok = self._decide(proto, src, dst, dport)
        self.counters["accepted" if ok else "dropped"] += 1
        return ok

    def _decide(self, proto: int, src: bytes, dst: bytes, port: int) -> bool:
        key = (proto, src, dst, port)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        name = _PROTO_NAMES.get(proto, "other")
        ok = any(p in ("any", name) and (port < 0 or any(lo <= port <= hi for lo, hi in ports))
                 and any(s in n for n in sn) and any(d in n for n in dn)
                 for sn, dn, ports, p in self._rules)
        self._decisions[key] = ok
        if len(self._decisions) > MAX_DECISIONS:
            self._decisions.popitem(last=False)
        return ok


def _set(cidrs: Iterable[str], version: int) -> str | None:
    nets = [str(n) for c in cidrs if (n := ipaddress.ip_network(c, strict=False)).version
            == version]
    return "{ " + ", ".join(nets) + " }" if nets else None


def _table(ifname: str) -> str:
    """The name of wgmesh's nftables table for ``ifname`` (family ``inet``)."""
    return f"wgmesh_{ifname.replace('-', '_')}"


def nft_ruleset(ifname: str, rules: Sequence[FilterRule]) -> str:
    """An nftables table that enforces ``rules`` on packets arriving from ``ifname``: for
    this host (``input``) and, on a subnet router, for the networks behind it (``forward``)."""
    body = [f'    iifname "{ifname}" ct state established,related accept']
    for r in rules:
        ports = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in r.ports)
        protos = ["tcp", "udp"] if r.proto == "any" else [r.proto]
        for v, fam in ((4, "ip"), (6, "ip6")):
            src, dst = _set(r.src, v), _set(r.dst, v)
            if src is None or dst is None:
                continue
            match = f'    iifname "{ifname}" {fam} saddr {src} {fam} daddr {dst}'
            if r.ports == ((0, 65535),) and r.proto == "any":
                body.append(f"{match} accept")
                continue
            for proto in protos:
                if proto == "icmp":
                    icmp = "icmp" if v == 4 else "icmpv6"
                    body.append(f"{match} meta l4proto {icmp} accept")
                else:
                    body.append(f"{match} {proto} dport {{ {ports} }} accept")
    body.append(f'    iifname "{ifname}" drop')
    lines = [f"table inet {_table(ifname)} {{"]
    for hook in ("input", "forward"):
        lines += [f"  chain {hook} {{",
                  f"    type filter hook {hook} priority filter; policy accept;", *body, "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def nft_delete(ifname: str) -> str:
    """An ``nft -f`` script that removes wgmesh's table for ``ifname``, if there is one
    (declaring the table first makes the delete succeed when it is missing)."""
    table = _table(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


def nft_replace(ifname: str, rules: Sequence[FilterRule]) -> str:
    """An ``nft -f`` script that swaps in the table for ``rules`` as one transaction:
    there is no moment without a filter, and a failed script leaves the old one."""
    return nft_delete(ifname) + nft_ruleset(ifname, rules)
