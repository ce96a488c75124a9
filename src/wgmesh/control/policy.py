"""ACL policy: parse and validate the JSON, then answer "who sees whom" and "what may pass".

Policy document (default deny: only what a rule accepts passes)::

    {
      "groups": {"group:eng": ["alice-laptop", "tag:dev"]},
      "tags":   ["tag:dev", "tag:server"],
      "rules": [
        {"src": ["group:eng"], "dst": ["tag:server:22,443", "bob:*"], "proto": "tcp"},
        {"src": ["tag:dev"], "dst": ["tag:server:*"], "caps": ["file-send"]}
      ],
      "tagOwners": {"tag:server": ["apikey:0123456789abcdef"]}
    }

Subnet routes and exit nodes: a ``dst`` selector may be a CIDR
(``198.51.100.0/24:*``; ``0.0.0.0/0:*`` for exit-node use): it matches the
routers carrying an approved route that overlaps it, and their filters accept
the sources into that network. ``*`` as a destination covers a router's
approved routes as well as the node itself. ``autoApprovers`` names who may
advertise what without an admin's approval::

    "autoApprovers": {"routes": {"198.51.100.0/24": ["tag:router"]},
                      "exitNode": ["tag:exit"]}

Selectors: ``*`` (every node), ``tag:NAME`` (declared in ``tags``),
``group:NAME`` (members are node names and tags), or a node name. A node name
matches only a name an admin assigned (``wgmesh control nodes rename``): the
name a node derives from its own hostname is for display and DNS, and grants
nothing, so a node cannot squat a selector by registering under its name. A ``dst``
entry is ``selector:ports`` with ports ``*``, ``22``, ``1000-2000`` or a comma
list. ``proto``: any (default) | tcp | udp | icmp. ``tagOwners`` names who may
hand out a tag (to a node, or to an auth key whose nodes then carry it):
``apikey:ID`` (an admin API key) or ``authkey:ID`` (one auth key); a tag it
does not list may be given by any admin key. So an auth key made by a key that
does not own ``tag:server`` can neither be created with it nor register with it. ``caps`` grants the sources
capabilities on the destinations; ``file-send`` lets them send files
(``wgmesh.drop.server``). Two nodes see each other when a rule links them in either
direction (WireGuard needs both ends configured); the packet filter each node
gets only accepts what the rules allow *into* it.

The compiled :class:`Policy` works on *base selectors* (``*``, ``tag:x``,
``node:x``): groups are expanded at compile time, so the control world only
keeps one member set per base selector and never re-evaluates rules per peer.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from wgmesh.control.errors import BadRequest
from wgmesh.netmap import CAPABILITIES, PROTOS

__all__ = ["DEFAULT_POLICY", "NODE_NAME_RE", "TAG_RE", "Policy", "PolicyError", "Rule",
           "node_selectors", "parse_policy"]

#: A fresh network lets every node reach every other and send it files, so it works at once.
DEFAULT_POLICY: dict[str, Any] = {
    "groups": {}, "tags": [],
    "rules": [{"src": ["*"], "dst": ["*:*"], "caps": ["file-send"]}],
}

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
TAG_RE = re.compile(rf"^tag:{_LABEL}$")
_GROUP_RE = re.compile(rf"^group:{_LABEL}$")
#: A node name an admin may assign: a DNS label.
NODE_NAME_RE = re.compile(rf"^{_LABEL}$")
_MAX_RULES = 10_000
_OWNER_RE = re.compile(r"^(apikey|authkey):[0-9a-f]{16}$")


class PolicyError(BadRequest):
    """The policy is invalid; ``details`` lists every problem with its JSON path."""

    code = "invalid_policy"


@attrs.frozen
class Rule:
    src: frozenset[str]
    dst: tuple[tuple[frozenset[str], tuple[tuple[int, int], ...]], ...]
    proto: str
    caps: tuple[str, ...]

    @property
    def dst_selectors(self) -> frozenset[str]:
        return frozenset().union(*(sels for sels, _ in self.dst))


@attrs.frozen
class Policy:
    version: int
    text: str
    rules: tuple[Rule, ...]
    tag_owners: dict[str, frozenset[str]] = attrs.field(factory=dict, eq=False, hash=False)
    #: (prefix, selectors): nodes with these selectors may advertise routes within prefix.
    auto_routes: tuple[tuple[str, frozenset[str]], ...] = ()
    #: Nodes with these selectors may advertise an exit node (the ``/0`` routes).
    auto_exit: frozenset[str] = frozenset()

    @functools.cached_property
    def cidrs(self) -> frozenset[str]:
        """Every CIDR used as a destination selector (without the ``cidr:`` prefix)."""
        return frozenset(s[5:] for r in self.rules for s in r.dst_selectors
                         if s.startswith("cidr:"))

    def may_assign(self, tag: str, *actors: str) -> bool:
        """Whether any of ``actors`` (``apikey:ID``, ``authkey:ID``) may give out ``tag``."""
        owners = self.tag_owners.get(tag)
        return owners is None or not owners.isdisjoint(actors)

    def linked(self, selectors: frozenset[str]) -> set[str]:
        """Base selectors of everything a node with ``selectors`` may see."""
        out: set[str] = set()
        for r in self.rules:
            if r.src & selectors:
                out |= r.dst_selectors
            if r.dst_selectors & selectors:
                out |= r.src
        return out

    def inbound(self, selectors: frozenset[str]) -> list[tuple[Rule, tuple[tuple[int, int], ...]]]:
        """Rules accepting traffic into a node with ``selectors``, with the ports they open."""
        out = []
        for r in self.rules:
            ports = tuple(p for sels, ps in r.dst if sels & selectors for p in ps)
            if ports:
                out.append((r, _merge_ports(ports)))
        return out

    def caps(self, src: frozenset[str], dst: frozenset[str]) -> tuple[str, ...]:
        """Capabilities a node with ``src`` selectors holds on one with ``dst`` selectors."""
        return self.caps_for(self.cap_masks(src)[0] & self.cap_masks(dst)[1])

    def cap_masks(self, selectors: frozenset[str]) -> tuple[int, int]:
        """Bit masks of the capability rules a node is a source / a destination of.

        Per peer pair the capabilities are then one AND and a lookup
        (:meth:`caps_for`), which keeps full maps of big meshes cheap.
        """
        src = dst = 0
        for i, r in enumerate(self._cap_rules):
            if r.src & selectors:
                src |= 1 << i
            if r.dst_selectors & selectors:
                dst |= 1 << i
        return src, dst

    def caps_for(self, mask: int) -> tuple[str, ...]:
        hit = self._caps_memo.get(mask)
        if hit is None:
            got = {c for i, r in enumerate(self._cap_rules) if mask >> i & 1 for c in r.caps}
            hit = self._caps_memo[mask] = tuple(sorted(got))
        return hit

    @functools.cached_property
    def _cap_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.caps)

    @functools.cached_property
    def _caps_memo(self) -> dict[int, tuple[str, ...]]:
        return {}


def node_selectors(name: str | None, tags: Iterable[str]) -> frozenset[str]:
    """A node's base selectors; ``name`` only if an admin assigned it (else ``None``)."""
    return frozenset({"*", *tags} | ({f"node:{name}"} if name is not None else set()))


def _merge_ports(ports: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ports):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def _ports(text: str) -> tuple[tuple[int, int], ...] | str:
    if text == "*":
        return ((0, 65535),)
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not _digits(lo) or (hi and not _digits(hi)):
            return f"bad port {part!r} (use *, 22, 1000-2000 or a comma list)"
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b <= 65535:
            return f"port range {part!r} out of order or beyond 65535"
        out.append((a, b))
    return _merge_ports(out)


def parse_policy(doc: Any, version: int = 0) -> Policy:
    """Validate ``doc`` (a parsed JSON object) and compile it; :class:`PolicyError` lists all faults."""
    errors: list[dict[str, str]] = []

    def err(path: str, message: str) -> None:
        errors.append({"path": path, "message": message})

    if not isinstance(doc, dict):
        raise PolicyError("policy must be a JSON object",
                          [{"path": "", "message": "must be an object"}])
    for k in sorted(set(doc) - {"groups", "tags", "rules", "tagOwners", "autoApprovers"}):
        err(k, "unknown key (expected groups, tags, rules, tagOwners, autoApprovers)")
    tags = doc.get("tags", [])
    declared: set[str] = set()
    if not isinstance(tags, list):
        err("tags", "must be a list of tag:NAME")
    else:
        for i, t in enumerate(tags):
            if not isinstance(t, str) or not TAG_RE.match(t):
                err(f"tags[{i}]", f"{t!r} is not tag:NAME (lowercase letters, digits, -)")
            else:
                declared.add(t)

    def base(sel: Any, path: str, groups_ok: bool, cidr_ok: bool = False) -> set[str]:
        if not isinstance(sel, str):
            err(path, "must be a string")
            return set()
        if sel == "*":
            return {"*"}
        if cidr_ok and "/" in sel:
            net = _network(sel)
            if net is None:
                err(path, f"{sel!r} is not a CIDR")
                return set()
            return {f"cidr:{net}"}
        if sel.startswith("tag:"):
            if sel not in declared:
                err(path, f"{sel} is not declared in \"tags\"")
            return {sel}
        if sel.startswith("group:"):
            if not groups_ok:
                err(path, "groups cannot contain groups")
            elif sel not in groups:
                err(path, f"{sel} is not defined in \"groups\"")
            return set(groups.get(sel, ()))
        if NODE_NAME_RE.match(sel):
            return {f"node:{sel}"}
        err(path, f"{sel!r} is not *, tag:NAME, group:NAME or a node name")
        return set()

    groups: dict[str, set[str]] = {}
    raw_groups = doc.get("groups", {})
    if not isinstance(raw_groups, dict):
        err("groups", "must be an object of group:NAME -> [members]")
        raw_groups = {}
    for g, members in raw_groups.items():
        if not _GROUP_RE.match(g):
            err(f"groups.{g}", "group names are group:NAME")
        if not isinstance(members, list):
            err(f"groups.{g}", "members must be a list")
            continue
        groups[g] = set()
        for i, m in enumerate(members):
            groups[g] |= base(m, f"groups.{g}[{i}]", groups_ok=False)

    rules: list[Rule] = []
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list) or len(raw_rules) > _MAX_RULES:
        err("rules", f"must be a list of at most {_MAX_RULES} rules")
        raw_rules = []
    for i, r in enumerate(raw_rules):
        p = f"rules[{i}]"
        if not isinstance(r, dict):
            err(p, "must be an object with src and dst")
            continue
        for k in sorted(set(r) - {"src", "dst", "proto", "caps", "action"}):
            err(f"{p}.{k}", "unknown key (expected src, dst, proto, caps)")
        if r.get("action", "accept") != "accept":
            err(f"{p}.action", "only \"accept\" exists: everything else is denied by default")
        src: set[str] = set()
        if not isinstance(r.get("src"), list) or not r.get("src"):
            err(f"{p}.src", "must be a non-empty list of selectors")
        else:
            for j, s in enumerate(r["src"]):
                src |= base(s, f"{p}.src[{j}]", groups_ok=True)
        dst = []
        if not isinstance(r.get("dst"), list) or not r.get("dst"):
            err(f"{p}.dst", "must be a non-empty list of selector:ports")
        else:
            for j, d in enumerate(r["dst"]):
                dp = f"{p}.dst[{j}]"
                if not isinstance(d, str) or ":" not in d:
                    err(dp, f"{d!r} must be selector:ports, e.g. tag:server:22 or *:*")
                    continue
                sel, _, ports_text = d.rpartition(":")
                ports = _ports(ports_text)
                if isinstance(ports, str):
                    err(dp, ports)
                    continue
                dst.append((frozenset(base(sel, dp, groups_ok=True, cidr_ok=True)), ports))
        proto = r.get("proto", "any")
        if proto not in PROTOS:
            err(f"{p}.proto", f"{proto!r} is not one of {', '.join(PROTOS)}")
        caps = r.get("caps", [])
        if not isinstance(caps, list):
            err(f"{p}.caps", "must be a list")
            caps = []
        for j, c in enumerate(caps):
            if not isinstance(c, str) or c not in CAPABILITIES:
                err(f"{p}.caps[{j}]",
                    f"unknown capability {c!r} (known: {', '.join(sorted(CAPABILITIES))})")
        rules.append(Rule(src=frozenset(src), dst=tuple(dst), proto=str(proto),
                          caps=tuple(sorted({str(c) for c in caps}))))
    owners: dict[str, frozenset[str]] = {}
    raw_owners = doc.get("tagOwners", {})
    if not isinstance(raw_owners, dict):
        err("tagOwners", "must be an object of tag:NAME -> [apikey:ID | authkey:ID]")
        raw_owners = {}
    for t, who in raw_owners.items():
        if t not in declared:
            err(f"tagOwners.{t}", f"{t} is not declared in \"tags\"")
        if not isinstance(who, list) or not all(
                isinstance(w, str) and _OWNER_RE.match(w) for w in who):
            err(f"tagOwners.{t}", "must be a list of apikey:ID or authkey:ID (16 hex digits)")
            continue
        owners[t] = frozenset(who)
    auto_routes, auto_exit = _auto_approvers(doc.get("autoApprovers", {}), base, err)
    if errors:
        raise PolicyError(f"policy has {len(errors)} error(s): {errors[0]['path']}: "
                          f"{errors[0]['message']}", errors)
    text = json.dumps(doc, sort_keys=True, indent=2)
    return Policy(version=version, text=text, rules=tuple(rules), tag_owners=owners,
                  auto_routes=auto_routes, auto_exit=auto_exit)


def _auto_approvers(raw: Any, base: Callable[..., set[str]], err: Callable[[str, str], None]
                    ) -> tuple[tuple[tuple[str, frozenset[str]], ...], frozenset[str]]:
    """``autoApprovers``: (prefix, selectors) pairs for routes, and the exit-node selectors."""
    if not isinstance(raw, dict) or set(raw) - {"routes", "exitNode"}:
        err("autoApprovers", 'must be {"routes": {CIDR: [selectors]}, "exitNode": [selectors]}')
        return (), frozenset()
    routes, exit_sels = raw.get("routes", {}), raw.get("exitNode", [])
    if not isinstance(routes, dict):
        err("autoApprovers.routes", "must be an object of CIDR -> [selectors]")
        routes = {}
    out = []
    for prefix, sels in routes.items():
        p = f"autoApprovers.routes.{prefix}"
        net = _network(prefix)
        if net is None:
            err(p, f"{prefix!r} is not a CIDR")
        elif not isinstance(sels, list):
            err(p, "must be a list of selectors")
        else:
            out.append((net, frozenset().union(*(base(s, f"{p}[{j}]", groups_ok=True)
                                                 for j, s in enumerate(sels)))))
    if not isinstance(exit_sels, list):
        err("autoApprovers.exitNode", "must be a list of selectors")
        exit_sels = []
    who: set[str] = set()
    for j, sel in enumerate(exit_sels):
        who |= base(sel, f"autoApprovers.exitNode[{j}]", groups_ok=True)
    return tuple(out), frozenset(who)


def _network(text: str) -> str | None:
    """``text`` as a canonical network (host bits cleared), or None if it is not one."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None
