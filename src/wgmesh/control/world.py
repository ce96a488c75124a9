"""The in-memory fan-out core: who sees whom, and what each stream must be told next.

Sans-I/O: :meth:`World.apply` takes committed :class:`~wgmesh.control.store.records.Change`
rows in sequence order, :meth:`World.flush` turns what they changed into one
NDJSON delta line per affected subscriber, and the server only moves bytes.

Why it scales: the world keeps, per live node, the set of nodes it sees
(``visible``, symmetric) and, per base selector (``*``, ``tag:x``,
``node:x``), its live members. A change to node X touches only
``visible[X]`` (O(1) per recipient); nothing is rebuilt per change. A change
that only touches the often-changing fields (endpoints, home relay, online,
last seen) is encoded once as a small patch shared by every recipient. Only a
policy change walks the whole world, and it is rare.

Each subscriber keeps a bounded ring of the lines it was sent, tagged with the
global change sequence, so a stream that reconnects with ``since=<seq>`` gets
just what it missed; if the ring no longer reaches back that far it gets a
full map.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from wgmesh import netmap as nm
from wgmesh.control import routes as rt
from wgmesh.control.errors import NotFound
from wgmesh.control.policy import Policy, node_selectors, parse_policy
from wgmesh.control.store.records import Change, NodeRecord

__all__ = ["Subscriber", "World"]

_HEAVY = ("name", "name_assigned", "node_key", "disco_key", "addr_index", "tags",
          "advertised_routes", "approved_routes")
_J = json.JSONEncoder(separators=(",", ":")).encode


@attrs.define(eq=False)
class Subscriber:
    """One node's stream state on this replica; it outlives a dropped connection for a while."""

    node_id: int
    seq: int = 0
    floor: int = 0
    ring: deque[tuple[int, bytes]] = attrs.field(factory=deque)
    ring_bytes: int = 0
    out: list[bytes] = attrs.field(factory=list)
    out_bytes: int = 0
    wake: Callable[[], None] | None = None
    streams: int = 0
    idle_since: float = 0.0
    closed: bool = False
    overflow: bool = False
    upserts: set[int] = attrs.field(factory=set)
    removed: set[int] = attrs.field(factory=set)
    patches: dict[int, set[str]] = attrs.field(factory=dict)
    self_dirty: bool = False
    filter_dirty: bool = False
    relay_dirty: bool = False
    policy_dirty: bool = False
    lock_dirty: bool = False
    filter_sent: str = ""
    #: A full map went out on this replica, so ``floor``..``seq`` can be resumed.
    synced: bool = False

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        self.out_bytes = 0
        return data


class World:
    """One replica's view of the network and its streams; the caller passes the ``clock``."""

    def __init__(self, ula_prefix: str, *, clock: Callable[[], float],
                 ring_entries: int = 128, ring_bytes: int = 256 * 1024,
                 out_limit: int = 16 * 1024 * 1024, grace_s: float = 120.0,
                 domain: str = "") -> None:
        self.ula_prefix = ula_prefix
        self.clock = clock
        self.ring_entries, self.ring_bytes, self.out_limit = ring_entries, ring_bytes, out_limit
        self.grace_s = grace_s
        self.seq = 0
        self.nodes: dict[int, NodeRecord] = {}
        self.version: dict[int, int] = {}
        self.live: set[int] = set()
        self.members: dict[str, set[int]] = defaultdict(set)
        self.visible: dict[int, set[int]] = {}
        self.policy: Policy = parse_policy({"rules": []})
        self.relay_map = nm.RelayMap()
        self.lock_head = ""  #: the stored mesh lock head (hex); nodes fetch the chain on news
        self.domain = domain  #: the mesh DNS domain in every full map ("": nodes' default)
        self.subs: dict[int, Subscriber] = {}
        self.dirty: set[int] = set()
        #: Live nodes with routes that carry traffic, and who is primary for each prefix.
        self.routers: dict[int, tuple[str, ...]] = {}
        self.primaries = rt.Primaries()
        self._expiries: list[tuple[float, int]] = []
        self._patch_cache: dict[tuple[int, frozenset[str]], tuple[int, str]] = {}
        self._peer_cache: dict[tuple[int, tuple[str, ...]], tuple[int, str]] = {}
        self._cap_masks: dict[int, tuple[int, int]] = {}
        self.stats = {"lines": 0, "bytes": 0, "full_maps": 0, "resumes": 0}

    # ------------------------------------------------------------ loading
    def load(self, nodes: Iterable[NodeRecord], policy_version: int, policy_text: str,
             relay_map: nm.RelayMap, seq: int, lock_head: str = "") -> None:
        """Start from a snapshot (server start, or after falling too far behind)."""
        self.seq = seq
        self.lock_head = lock_head
        self.nodes = {n.id: n for n in nodes}
        self.version = dict.fromkeys(self.nodes, seq)
        self.policy = parse_policy(json.loads(policy_text), policy_version)
        self._cap_masks.clear()
        self.relay_map = relay_map
        now = self.clock()
        self.live = {i for i, n in self.nodes.items() if n.active(now)}
        self.members = defaultdict(set)
        for i in self.live:
            self._join(self.nodes[i])
        self.visible = {i: self._compute_visible(i) for i in self.live}
        self.routers = {i: r for i in self.live if (r := self._routes(self.nodes[i]))}
        self._elect()
        self._expiries = [(n.key_expiry, i) for i, n in self.nodes.items()
                          if i in self.live and n.key_expiry > 0]
        heapq.heapify(self._expiries)
        for sub in list(self.subs.values()):
            # Their views predate the snapshot: make them start over.
            sub.floor = sub.seq = seq + 1
            sub.synced = False
            sub.ring.clear()
            sub.overflow = True
            if sub.wake:
                sub.wake()

    # --------------------------------------------------------- selectors
    def _selectors(self, rec: NodeRecord) -> frozenset[str]:
        base = node_selectors(rec.name if rec.name_assigned else None, rec.tags)
        if not rec.advertised_routes:
            return base
        return base | rt.route_selectors(self._routes(rec), self.policy)

    def _join(self, rec: NodeRecord) -> None:
        for s in self._selectors(rec):
            self.members[s].add(rec.id)

    def _leave(self, rec: NodeRecord) -> None:
        for s in self._selectors(rec):
            self.members[s].discard(rec.id)

    def _compute_visible(self, nid: int) -> set[int]:
        if nid not in self.live:
            return set()
        out: set[int] = set()
        for s in self.policy.linked(self._selectors(self.nodes[nid])):
            out |= self.members.get(s, set())
        out.discard(nid)
        return out

    # ------------------------------------------------------------ changes
    def apply(self, change: Change) -> None:
        """Fold one committed change in; changes must arrive in ``seq`` order."""
        if change.seq <= self.seq:
            return
        self.seq = change.seq
        if change.kind == "node":
            rec = NodeRecord.from_json(json.loads(change.data))
            self._node_changed(self.nodes.get(rec.id), rec)
            self._router_changed(rec.id)
        elif change.kind == "node_removed":
            old = self.nodes.get(int(change.entity))
            if old is not None:
                self._node_changed(old, None)
                self._router_changed(old.id)
        elif change.kind == "policy":
            self._policy_changed(parse_policy(json.loads(change.data), int(change.entity)))
        elif change.kind == "relay_map":
            self.relay_map = nm.relay_map_from_json(json.loads(change.data))
            for sub in self.subs.values():
                sub.relay_dirty = True
                self.dirty.add(sub.node_id)
        elif change.kind == "lock":
            self.lock_head = change.entity
            for sub in self.subs.values():
                sub.lock_dirty = True
                self.dirty.add(sub.node_id)

    def _mark(self, nid: int) -> Subscriber | None:
        sub = self.subs.get(nid)
        if sub is not None:
            self.dirty.add(nid)
        return sub

    def _node_changed(self, old: NodeRecord | None, new: NodeRecord | None) -> None:
        nid = (new or old).id  # type: ignore[union-attr]
        was_live = nid in self.live
        is_live = new is not None and new.active(self.clock())
        heavy = (old is None or new is None or was_live != is_live
                 or any(getattr(old, f) != getattr(new, f) for f in _HEAVY))
        self._cap_masks.pop(nid, None)
        if new is None:
            self.nodes.pop(nid, None)
            self.version.pop(nid, None)
        else:
            self.nodes[nid] = new
            self.version[nid] = self.seq
            if is_live and new.key_expiry > 0 and (old is None
                                                    or old.key_expiry != new.key_expiry):
                heapq.heappush(self._expiries, (new.key_expiry, nid))
        if not heavy:
            assert old is not None and new is not None
            self._light_change(old, new)
            return
        if old is not None and was_live:
            self._leave(old)
        self.live.discard(nid)
        if new is not None and is_live:
            self.live.add(nid)
            self._join(new)
        before = self.visible.pop(nid, set())
        after = self._compute_visible(nid)
        if is_live:
            self.visible[nid] = after
        for r in before - after:
            self.visible[r].discard(nid)
        for r in after - before:
            self.visible[r].add(nid)
        for r in before | after:
            sub = self._mark(r)
            if sub is None:
                continue
            if r in after:
                sub.upserts.add(nid)
                sub.removed.discard(nid)
            else:
                sub.removed.add(nid)
                sub.upserts.discard(nid)
            sub.filter_dirty = True
        own = self._mark(nid)
        if own is None:
            return
        if new is None:
            own.closed = True
            self.subs.pop(nid)
            self.dirty.discard(nid)
            if own.wake:
                own.wake()
            return
        own.removed |= before - after
        own.upserts -= before - after
        own.upserts |= after - before
        own.removed -= after - before
        own.self_dirty = own.filter_dirty = True

    def _light_change(self, old: NodeRecord, new: NodeRecord) -> None:
        fields = {f for f in nm.PATCH_FIELDS if getattr(old, f) != getattr(new, f)}
        if not fields:
            return
        for r in self.visible.get(new.id, ()):
            sub = self.subs.get(r)
            if sub is not None:
                sub.patches.setdefault(new.id, set()).update(fields)
                self.dirty.add(r)
        if "key_expiry" in fields:
            own = self._mark(new.id)
            if own is not None:
                own.self_dirty = True

    def _policy_changed(self, policy: Policy) -> None:
        old_caps = {r.caps and (r.src, r.dst_selectors, r.caps) for r in self.policy.rules}
        self.policy = policy
        self._cap_masks.clear()
        # Route selectors and auto-approvals follow the policy: rejoin under the new one.
        self.members = defaultdict(set)
        for nid in self.live:
            self._join(self.nodes[nid])
        self.routers = {i: r for i in self.live if (r := self._routes(self.nodes[i]))}
        caps_changed = old_caps != {r.caps and (r.src, r.dst_selectors, r.caps)
                                    for r in policy.rules}
        for nid in self.live:
            before = self.visible.get(nid, set())
            after = self._compute_visible(nid)
            self.visible[nid] = after
            sub = self._mark(nid)
            if sub is None:
                continue
            sub.removed |= before - after
            sub.upserts -= before - after
            sub.upserts |= (after if caps_changed else after - before)
            sub.removed -= after
            sub.filter_dirty = sub.policy_dirty = True
        for sub in self.subs.values():
            sub.policy_dirty = True
            self.dirty.add(sub.node_id)
        self._elect()

    # ------------------------------------------------------------- routes
    def _routes(self, rec: NodeRecord) -> tuple[str, ...]:
        """The node's routes that carry traffic: advertised and approved."""
        if not rec.advertised_routes:
            return ()
        return rt.effective_routes(
            rec.advertised_routes, rec.approved_routes,
            node_selectors(rec.name if rec.name_assigned else None, rec.tags), self.policy)

    def _router_changed(self, nid: int) -> None:
        rec = self.nodes.get(nid)
        routes = self._routes(rec) if rec is not None and nid in self.live else ()
        if routes:
            self.routers[nid] = routes
        elif self.routers.pop(nid, None) is None:
            return
        self._elect()

    def _elect(self) -> None:
        """Re-elect primaries (routers are few); peers of a router whose carried routes
        changed get it upserted."""
        changed = self.primaries.elect({i: (r, self.nodes[i].online)
                                        for i, r in self.routers.items()})
        for nid in changed & self.live:
            self.version[nid] = self.seq
            for r in self.visible.get(nid, ()):
                sub = self._mark(r)
                if sub is not None:
                    sub.upserts.add(nid)
                    sub.removed.discard(nid)

    def due_expiries(self) -> list[int]:
        """Live nodes whose key expiry has passed.

        The server records them in the store, so the expiry reaches every
        stream as an ordinary change with its own sequence number (a delta
        without a new number would be dropped by :func:`netmap.apply`).
        """
        now, due = self.clock(), []
        while self._expiries and self._expiries[0][0] <= now:
            expiry, nid = heapq.heappop(self._expiries)
            rec = self.nodes.get(nid)
            if rec is not None and rec.key_expiry == expiry and nid in self.live:
                due.append(nid)
        return due

    def gc(self) -> None:
        """Forget subscribers that stayed disconnected past the grace period."""
        now = self.clock()
        for nid, sub in list(self.subs.items()):
            if sub.streams == 0 and now - sub.idle_since > self.grace_s:
                del self.subs[nid]
                self.dirty.discard(nid)

    # ----------------------------------------------------------- encoding
    def _peer_frag(self, pid: int, caps: tuple[str, ...]) -> str:
        ver = self.version[pid]
        hit = self._peer_cache.get((pid, caps))
        if hit is None or hit[0] != ver:
            routes = self.primaries.carried(pid, self.routers.get(pid, ()))
            hit = (ver, _J(nm.to_json(self.nodes[pid].peer(caps, routes))))
            self._peer_cache[(pid, caps)] = hit
        return hit[1]

    def _patch_frag(self, pid: int, fields: frozenset[str]) -> str:
        ver = self.version[pid]
        hit = self._patch_cache.get((pid, fields))
        if hit is None or hit[0] != ver:
            rec = self.nodes[pid]
            hit = (ver, _J(nm.to_json(nm.PeerChange(pid, **{f: getattr(rec, f)
                                                            for f in fields}))))
            self._patch_cache[(pid, fields)] = hit
        return hit[1]

    def _masks(self, nid: int) -> tuple[int, int]:
        hit = self._cap_masks.get(nid)
        if hit is None:
            hit = self._cap_masks[nid] = self.policy.cap_masks(self._selectors(self.nodes[nid]))
        return hit

    def _caps(self, pid: int, for_id: int) -> tuple[str, ...]:
        """What peer ``pid`` may do to node ``for_id``."""
        return self.policy.caps_for(self._masks(pid)[0] & self._masks(for_id)[1])

    def filter_for(self, nid: int) -> tuple[nm.FilterRule, ...]:
        """Packet-filter rules compiled for node ``nid`` (it is the destination)."""
        if nid not in self.live:
            return ()
        rec = self.nodes[nid]
        out = []
        own = (f"{rec.ipv4}/32", f"{rec.ipv6}/128")
        for rule, dst, ports in rt.inbound(self.policy, self._selectors(rec), own,
                                           self.routers.get(nid, ())):
            src: set[str] = set()
            for s in rule.src:
                if s == "*":
                    src |= {"100.64.0.0/10", self.ula_prefix}
                    continue
                for m in self.members.get(s, ()):
                    n = self.nodes[m]
                    src |= {f"{n.ipv4}/32", f"{n.ipv6}/128"}
            if src:
                out.append(nm.FilterRule(src=tuple(sorted(src)), dst=dst,
                                         ports=ports, proto=rule.proto, caps=rule.caps))
        return tuple(out)

    def _filter_json(self, nid: int) -> str:
        return _J([nm.to_json(r) for r in self.filter_for(nid)])

    def full_map(self, nid: int) -> bytes:
        return b"".join(self.full_map_chunks(nid))

    def full_map_chunks(self, nid: int, chunk_peers: int = 128) -> Iterator[bytes]:
        """The full map as a few bytes chunks, encoded lazily as the stream drains.

        Only a chunk per connection is in memory at a time, so 10,000 nodes
        connecting at once do not hold 10,000 full maps. Peers changed while the
        map is being written are safe: deltas carry current state, so a later
        delta re-sends whatever a chunk showed early.
        """
        rec = self.nodes[nid]
        yield (f'{{"type":"netmap","seq":{self.seq},"self":{_J(nm.to_json(rec.info()))},'
               f'"relay_map":{_J(nm.to_json(self.relay_map))},'
               f'"filter":{self._filter_json(nid)},"policy_version":{self.policy.version},'
               + (f'"lock_head":"{self.lock_head}",' if self.lock_head else "")
               + (f'"domain":"{self.domain}",' if self.domain else "")
               + '"peers":[').encode()
        ids = sorted(self.visible.get(nid, ()))
        sep = ""
        for i in range(0, len(ids), chunk_peers):
            frags = [self._peer_frag(p, self._caps(p, nid))
                     for p in ids[i:i + chunk_peers] if p in self.nodes]
            if frags:
                yield (sep + ",".join(frags)).encode()
                sep = ","
        yield b"]}\n"

    def _delta(self, sub: Subscriber) -> bytes | None:
        nid = sub.node_id
        vis = self.visible.get(nid, set())
        parts = []
        ups = sorted(p for p in sub.upserts if p in vis)
        if ups:
            parts.append('"peers_upsert":[' + ",".join(
                self._peer_frag(p, self._caps(p, nid)) for p in ups) + "]")
        gone = sorted(p for p in sub.removed if p not in vis)
        if gone:
            parts.append(f'"peers_removed":{_J(gone)}')
        changed = [self._patch_frag(p, frozenset(f)) for p, f in sub.patches.items()
                   if p in vis and p not in sub.upserts]
        if changed:
            parts.append('"peers_changed":[' + ",".join(changed) + "]")
        if sub.self_dirty:
            parts.append(f'"self":{_J(nm.to_json(self.nodes[nid].info()))}')
        if sub.filter_dirty:
            f = self._filter_json(nid)
            if f != sub.filter_sent:
                parts.append(f'"filter":{f}')
                sub.filter_sent = f
        if sub.relay_dirty:
            parts.append(f'"relay_map":{_J(nm.to_json(self.relay_map))}')
        if sub.policy_dirty:
            parts.append(f'"policy_version":{self.policy.version}')
        if sub.lock_dirty:
            parts.append(f'"lock_head":"{self.lock_head}"')
        sub.upserts.clear()
        sub.removed.clear()
        sub.patches.clear()
        sub.self_dirty = sub.filter_dirty = sub.relay_dirty = sub.policy_dirty = False
        sub.lock_dirty = False
        if not parts:
            return None
        return f'{{"type":"delta","seq":{self.seq},{",".join(parts)}}}\n'.encode()

    # ------------------------------------------------------------ streams
    def attach(self, nid: int, since: int | None,
               wake: Callable[[], None]) -> Iterable[bytes]:
        """A stream for ``nid`` opens: the bytes it must be sent first (write them in order)."""
        if nid not in self.nodes:
            raise NotFound(f"no node {nid}")
        sub = self.subs.get(nid)
        if sub is None:
            sub = self.subs[nid] = Subscriber(node_id=nid)
        sub.streams += 1
        sub.wake = wake
        sub.overflow = False
        sub.out.clear()
        sub.out_bytes = 0
        if since is not None and sub.synced and sub.floor <= since <= sub.seq:
            self.stats["resumes"] += 1
            # Nothing missed: a keepalive at once, so the node knows its stream is up now
            # rather than a keepalive period later (after a roam, say).
            return ([line for s, line in sub.ring if s > since]
                    or [nm.encode(nm.Keepalive(seq=sub.seq))])
        self.stats["full_maps"] += 1
        sub.ring.clear()
        sub.ring_bytes = 0
        sub.upserts.clear()
        sub.removed.clear()
        sub.patches.clear()
        sub.self_dirty = sub.filter_dirty = sub.relay_dirty = sub.policy_dirty = False
        sub.lock_dirty = False
        sub.floor = sub.seq = self.seq
        sub.synced = True
        sub.filter_sent = self._filter_json(nid)
        self.dirty.discard(nid)
        return self.full_map_chunks(nid)

    def detach(self, nid: int, wake: Callable[[], None]) -> None:
        sub = self.subs.get(nid)
        if sub is None:
            return
        sub.streams = max(0, sub.streams - 1)
        if sub.wake == wake:  # bound methods: equal, never identical
            sub.wake = None
            sub.out.clear()
            sub.out_bytes = 0
        if sub.streams == 0:
            sub.idle_since = self.clock()

    def flush(self) -> int:
        """Encode pending changes into each dirty subscriber's next line; lines produced."""
        n = 0
        for nid in self.dirty:
            sub = self.subs.get(nid)
            if sub is None:
                continue
            line = self._delta(sub)
            if line is None:
                continue
            n += 1
            sub.seq = self.seq
            sub.ring.append((self.seq, line))
            sub.ring_bytes += len(line)
            while sub.ring and (len(sub.ring) > self.ring_entries
                                or sub.ring_bytes > self.ring_bytes):
                s, old = sub.ring.popleft()
                sub.ring_bytes -= len(old)
                sub.floor = s
            if sub.wake is not None:
                sub.out.append(line)
                sub.out_bytes += len(line)
                if sub.out_bytes > self.out_limit:
                    sub.overflow = True
                sub.wake()
            self.stats["lines"] += 1
            self.stats["bytes"] += len(line)
        self.dirty.clear()
        return n

    def live_keys(self) -> list[str]:
        return sorted(self.nodes[i].node_key.b64() for i in self.live)

    def snapshot_stats(self) -> dict[str, Any]:
        return {**self.stats, "seq": self.seq, "nodes": len(self.nodes), "live": len(self.live),
                "subscribers": len(self.subs),
                "streams": sum(s.streams for s in self.subs.values())}
