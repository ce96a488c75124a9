"""Subnet routes and exit nodes in control: approval, primary routers, and what the ACL opens.

Pure (no I/O, no clock), used by :class:`~wgmesh.control.world.World`:

* :func:`effective_routes`: a node's routes that carry traffic: advertised by the node
  *and* approved, by an admin (``wgmesh control routes approve``) or by the policy's
  ``autoApprovers`` for the node's tags. An approval without an advertisement, or the
  reverse, routes nothing.
* :class:`Primaries`: one primary router per prefix. The current primary keeps the
  prefix as long as it is online; when it goes offline the lowest-id online router
  takes over, and a recovered router does *not* take it back (no flapping). Exit-node
  routes (``/0``) have no primary: the client picks its exit node.
* :func:`route_selectors` and :func:`inbound`: a policy ``dst`` CIDR selects the routers
  whose routes overlap it, and their packet filters accept the rule's sources into the
  overlap (``*`` covers the node and all its routes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from wgmesh.control.policy import Policy, Rule, _merge_ports

__all__ = ["EXIT_ROUTES", "Primaries", "effective_routes", "inbound", "is_exit",
           "parse_routes", "route_selectors"]

#: What ``--advertise-exit-node`` advertises.
EXIT_ROUTES = ("0.0.0.0/0", "::/0")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _net(text: str) -> Net:
    return ipaddress.ip_network(text, strict=False)


def is_exit(route: str) -> bool:
    return _net(route).prefixlen == 0


def parse_routes(values: Iterable[object], limit: int = 64) -> list[str]:
    """Canonical CIDRs (host bits cleared), or ValueError naming the bad one."""
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a CIDR string")
        try:
            out.append(str(_net(v)))
        except ValueError:
            raise ValueError(f"{v!r} is not a CIDR") from None
    if len(out) > limit:
        raise ValueError(f"at most {limit} routes")
    return sorted(set(out))


def _overlap(a: Net, b: Net) -> Net | None:
    """The smaller of two nested networks, None if they are disjoint (or of two families)."""
    if a.version != b.version:
        return None
    if a.subnet_of(b):  # type: ignore[arg-type]
        return a
    if b.subnet_of(a):  # type: ignore[arg-type]
        return b
    return None


def effective_routes(advertised: Iterable[str], approved: Iterable[str],
                     selectors: frozenset[str], policy: Policy) -> tuple[str, ...]:
    """The advertised routes that are approved by an admin or by ``autoApprovers``."""
    admin = set(approved)
    out = []
    for r in advertised:
        net = _net(r)
        if r in admin:
            out.append(r)
        elif net.prefixlen == 0:
            if selectors & policy.auto_exit:
                out.append(r)
        elif any(selectors & who and _overlap(net, _net(p)) == net
                 for p, who in policy.auto_routes):
            out.append(r)
    return tuple(out)


def route_selectors(routes: Iterable[str], policy: Policy) -> frozenset[str]:
    """``cidr:X`` for each policy destination CIDR X that overlaps one of ``routes``."""
    nets = [_net(r) for r in routes]
    if not nets:
        return frozenset()
    return frozenset(f"cidr:{c}" for c in policy.cidrs
                     if any(_overlap(_net(c), n) for n in nets))


def inbound(policy: Policy, selectors: frozenset[str], own: tuple[str, ...],
            routes: tuple[str, ...]) -> list[tuple[Rule, tuple[str, ...],
                                                  tuple[tuple[int, int], ...]]]:
    """(rule, destination CIDRs, ports) for each rule letting traffic into a node with
    ``selectors``, its own addresses ``own`` and approved ``routes``."""
    out = []
    for rule in policy.rules:
        by_dst: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for sels, ports in rule.dst:
            hit = sels & selectors
            if not hit:
                continue
            dst: set[str] = set()
            if any(not s.startswith("cidr:") for s in hit):
                dst |= set(own)
            if "*" in hit:
                dst |= set(routes)
            for s in hit:
                if s.startswith("cidr:"):
                    dst |= {str(o) for r in routes
                            if (o := _overlap(_net(s[5:]), _net(r))) is not None}
            if dst:
                by_dst.setdefault(tuple(sorted(dst)), []).extend(ports)
        for dst_t, ports_l in by_dst.items():
            out.append((rule, dst_t, _merge_ports(ports_l)))
    return out


class Primaries:
    """The primary router of each (non-exit) prefix, sticky (see the module docstring)."""

    def __init__(self) -> None:
        self.primary: dict[str, int] = {}

    def elect(self, routers: Mapping[int, tuple[tuple[str, ...], bool]]) -> set[int]:
        """Re-elect from ``routers`` (node id -> (effective routes, online)); returns the
        ids whose carried routes changed."""
        cands: dict[str, list[tuple[bool, int]]] = {}
        for nid, (routes, online) in routers.items():
            for r in routes:
                if not is_exit(r):
                    cands.setdefault(r, []).append((online, nid))
        new: dict[str, int] = {}
        for prefix, c in cands.items():
            cur = self.primary.get(prefix)
            up = sorted(n for on, n in c if on)
            if cur in up or (not up and cur in {n for _, n in c}):
                new[prefix] = cur
            else:
                new[prefix] = up[0] if up else min(n for _, n in c)
        changed = {n for p in set(self.primary) | set(new)
                   if self.primary.get(p) != new.get(p)
                   for n in (self.primary.get(p), new.get(p)) if n is not None}
        self.primary = new
        return changed

    def carried(self, nid: int, routes: tuple[str, ...]) -> tuple[str, ...]:
        """The routes peers should send to ``nid``: exit routes, and prefixes it is primary of."""
        return tuple(r for r in routes if is_exit(r) or self.primary.get(r) == nid)
