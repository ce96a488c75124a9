"""NAT traversal: one path state machine per peer, and the node's candidate list (sans-I/O).

Every input is an event with the current (monotonic) time; every output is an
action for a driver to carry out. Nothing here sleeps, reads a clock or opens a
socket, so the tests run whole hole-punching scenarios on a fake clock.

A peer's life (Tailscale's shape, with its timings):

* It starts **relayed**: WireGuard goes through the relay, so the first packet
  needs no traversal at all.
* A **probe round** pings every candidate of the peer every ``probe_interval``
  for ``round_duration`` and sends our candidates in a call-me-maybe via the
  relay; the peer answers by pinging ours, so both NATs open at the same time.
  A ping from an address we did not know is answered and pinged back (that is
  how a path through a NAT is found even when its mapping was never published).
* The first pong **commits** a direct path (``SetEndpoint``). Among working
  paths the lowest latency wins, LAN and IPv6 scaled down so they are preferred
  (RTTs under ``rtt_floor`` count as equal: below that a sample is noise), and a
  path is only replaced by one ``hysteresis`` better, so it does not flap.
* While the peer is active, **heartbeat** pings keep the path (and the NAT
  mapping) alive every ``heartbeat_interval``. A heartbeat unanswered for
  ``suspect_after`` makes the path suspect: a round probes every candidate and
  one that answers replaces it without the hysteresis (a rebooted NAT shows up
  there). When pongs stop for ``trust_timeout`` the peer goes back to the relay,
  asks for fresh candidates (``RefreshCandidates``: re-STUN) and starts a new
  round at once.
* Every ``reprobe_interval`` a new round looks for a better path, **forever**,
  relayed or not.

Kernel WireGuard (``confirm_handshake=True``): disco can pass where WireGuard
cannot, so a committed path is only *trusted* once the peer stats show a
WireGuard handshake newer than the commit, with the endpoint still on the
path (``SetEndpoint.handshake`` asks the driver to force one, e.g. by
re-adding the peer with a keepalive), or (``confirm_by_rx``) received bytes
growing between two samples that both show the endpoint on the path: WireGuard
moves the endpoint to the source of every authenticated packet, so the last one
came from the path. Without one within ``handshake_timeout``
the path is marked bad until the next round and the peer returns to the relay;
the evidence is a stats reading *taken* after that deadline (``sampled``) that
still shows none, so a node too busy to read its stats in time (a 500-peer dump
takes seconds under emulation) does not count its own slowness against the path.
Without any such reading (a stuck stats feed) it gives up ``stats_grace`` later.
That is for leaving the relay: a move between two direct paths is trusted at once
and forces no handshake (a forced one ends the session the peer has).
WireGuard roams to the source of the latest authenticated packet, so while
the other side still sends via the relay our kernel endpoint flips back to the
loopback bridge. Two rules stop that flip-flop: once a path is trusted,
``RelayIngress(enabled=False)`` tells the driver to stop injecting that peer's
relayed packets (our direct packets make the peer's WireGuard roam to us); and
a stats endpoint that flipped back to the relay while direct is re-asserted.
A stats endpoint that moved to a *direct* address while relayed is pinged at
once: the peer went direct first, follow it.

Hard NAT on one side (``port_search``): the easy side asks (call-me-maybe with
:data:`~wgmesh.disco.FLAG_PORT_SEARCH`) as soon as the peer's call-me-maybe says it
is hard (:data:`~wgmesh.disco.FLAG_HARD_NAT`), not after a failed round; a userspace hard side opens
``search_ports`` extra sockets (``OpenPorts``) and pings us from each, and we
send up to ``search_probes`` pings to random ports of its public address, rate
limited, within ``search_duration``: the birthday paradox gives ~98% for
256 x 1024. The easy side only asks once it knows its own public IPv4 (the
hard side aims its mappings there), and a hard side whose ports are open aims
them at every public address of the peer it learns later, so the order in
which the two sides come up does not matter. A miss is declared
``ping_timeout`` after the last probe and the search is retried after
``search_retry`` seconds, doubling up to ``reprobe_interval``: each try is an
independent draw, so two tries miss ~0.03% of the time. A single-port hard
side (kernel) gets a linear scan upwards from its published port instead.
Both sides hard: no search, stay relayed.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import attrs

from wgmesh import disco, pmtu
from wgmesh.disco import FLAG_HARD_NAT, FLAG_MANY_PORTS, FLAG_PORT_SEARCH, FLAG_REPLY, Addr
from wgmesh.keys import Key, PrivateKey
from wgmesh.netmap import Endpoint

__all__ = [
    "RELAY",
    "Action",
    "Candidates",
    "ClosePorts",
    "ObservedAddr",
    "OpenPorts",
    "PathChanged",
    "PathInfo",
    "PathState",
    "PeerPath",
    "PinFailed",
    "RefreshCandidates",
    "RelayIngress",
    "SendDisco",
    "SendViaRelay",
    "SetEndpoint",
    "Traversal",
    "TraversalConfig",
    "TriedCandidate",
    "is_lan",
]


class _Relay(enum.Enum):
    RELAY = "relay"

    def __repr__(self) -> str:
        return "RELAY"


#: The endpoint value meaning "through the relay" (kernel: the loopback bridge).
RELAY = _Relay.RELAY

_LAN_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "fc00::/7", "fe80::/10"))


def is_lan(ip: str) -> bool:
    """Private or link-local (``is_private`` would also say yes to documentation ranges)."""
    addr = ipaddress.ip_address(ip)
    return any(addr in n for n in _LAN_NETS if n.version == addr.version)


def _public_v4(ip: str) -> bool:
    """An IPv4 address a peer elsewhere can aim at (the port search works on these)."""
    return ":" not in ip and not is_lan(ip)


def norm(addr: tuple[str, int]) -> Addr:
    """One spelling per address: IPv4-mapped IPv6 becomes IPv4, no scope, compressed."""
    ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(addr[1]))


# ---------------------------------------------------------------- configuration


@attrs.frozen
class TraversalConfig:
    """Timings (seconds) and switches. :meth:`kernel` and :meth:`userspace` are the presets."""

    probe_interval: float = 0.5
    round_duration: float = 5.0
    heartbeat_interval: float = 3.0
    trust_timeout: float = 6.5
    ping_timeout: float = 3.5
    reprobe_interval: float = 60.0
    #: The best path's ping unanswered this long makes it suspect: probe every candidate
    #: at once and take one that answers without the hysteresis. A NAT mapping that
    #: vanished (router reboot) shows here seconds before the path counts as dead.
    suspect_after: float = 1.0
    cmm_min_interval: float = 2.0
    hysteresis: float = 0.2
    #: RTTs below this count as this: a single ping's RTT under a few ms is scheduling
    #: noise, so between fast paths the structural preferences below decide (a loaded
    #: host once picked a router's hairpin over the LAN on one noisy sample).
    rtt_floor: float = 0.010
    lan_factor: float = 0.5
    v6_factor: float = 0.9
    extra_socket_factor: float = 1.2
    #: A path the peer never advertised (learnt from its pings, e.g. through a router's
    #: hairpin) only wins when clearly faster than an advertised one.
    learned_factor: float = 1.5
    #: ``None``: always active. Otherwise heartbeats stop this long after the last traffic.
    active_timeout: float | None = 45.0
    confirm_handshake: bool = False
    #: Also trust a pending path once WireGuard received packets while its endpoint
    #: stayed on it across two stats samples (for drivers that cannot force a handshake).
    confirm_by_rx: bool = True
    handshake_timeout: float = 5.0
    #: How long past ``handshake_timeout`` a pending path waits for a stats reading taken
    #: after it before giving up without one (a stats feed that stopped).
    stats_grace: float = 30.0
    stop_relay_ingress: bool = True
    port_search: bool = True
    many_ports: bool = True
    search_ports: int = 256
    search_probes: int = 1024
    search_duration: float = 20.0
    search_delay: float = 0.5
    search_rate: float = 200.0  # probes per second (~20 kB/s, at most search_probes)
    #: After a miss the next try waits this long, doubling per miss up to reprobe_interval.
    search_retry: float = 2.0
    max_candidates: int = 128
    #: Path MTU rounds (:mod:`wgmesh.pmtu`): how often each path is measured again, and
    #: how long a round waits for its pongs. A new direct path is measured at once.
    mtu_interval: float = 300.0
    mtu_timeout: float = 2.0

    @classmethod
    def kernel(cls, **kw: object) -> TraversalConfig:
        """One WireGuard port, trust on handshake: no extra sockets, linear port scan."""
        return cls(confirm_handshake=True, many_ports=False, **kw)  # type: ignore[arg-type]

    @classmethod
    def userspace(cls, **kw: object) -> TraversalConfig:
        return cls(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- actions


@attrs.frozen
class SendDisco:
    """Send ``data`` to ``addr`` from socket ``sock`` (0: the WireGuard port)."""

    addr: Addr
    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    sock: int = 0


@attrs.frozen
class SendViaRelay:
    """Send ``data`` (sealed disco) to node ``key`` through the relay."""

    key: Key
    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class SetEndpoint:
    """Point the peer's WireGuard at ``endpoint`` (or :data:`RELAY`), sending from ``sock``.

    ``handshake``: make WireGuard handshake afresh on it now (kernel trust needs one).
    """

    key: Key
    endpoint: Addr | _Relay
    sock: int = 0
    handshake: bool = False


@attrs.frozen
class RelayIngress:
    """Deliver (or, once direct is trusted, drop) WireGuard packets from ``key`` via the relay."""

    key: Key
    enabled: bool


@attrs.frozen
class OpenPorts:
    """Open extra UDP sockets with these ids; disco received on them comes back with the id."""

    key: Key
    socks: tuple[int, ...]


@attrs.frozen
class ClosePorts:
    key: Key
    socks: tuple[int, ...]


@attrs.frozen
class PathChanged:
    """An event for logs, status and the grid: the peer now goes ``path``."""

    key: Key
    path: Literal["direct", "relay"]
    endpoint: Addr | None
    reason: str
    rtt: float | None = None
    sock: int = 0


@attrs.frozen
class ObservedAddr:
    """A peer saw us at ``addr`` from socket ``sock`` (a pong doubles as a STUN reply)."""

    addr: Addr
    sock: int = 0


@attrs.frozen
class RefreshCandidates:
    """A path died: our published endpoints may be stale. Re-STUN and publish."""

    reason: str


@attrs.frozen
class PinFailed:
    """The user pinned the peer to ``mode`` and a probing round could not give it."""

    key: Key
    mode: str
    reason: str


Action = (SendDisco | SendViaRelay | SetEndpoint | RelayIngress | OpenPorts | ClosePorts
          | PathChanged | ObservedAddr | RefreshCandidates | PinFailed)


# Message-level outputs of PeerPath; Traversal seals them into SendDisco / SendViaRelay.
@attrs.frozen
class DiscoOut:
    addr: Addr
    sock: int
    msg: disco.Message


@attrs.frozen
class RelayOut:
    msg: disco.Message


_Out = Action | DiscoOut | RelayOut


# ---------------------------------------------------------------- local state


@attrs.define
class LocalInfo:
    """What every PeerPath needs to know about this node."""

    node_key: Key
    candidates: tuple[Addr, ...] = ()
    hard_nat: bool = False
    #: False when netcheck got no UDP answer at all (then only the relay works).
    udp: bool = True
    #: The interface MTU the user set: path MTU probes go no higher.
    mtu: int = 1420
    #: Prefixes our own routing sends into the tunnel (peers' addresses, accepted subnet
    #: routes): a candidate inside one would carry WireGuard inside WireGuard (a router's
    #: LAN address, once we route its LAN through it), so none is ever made.
    tunneled: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    _next_sock: int = 1

    def in_tunnel(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in n for n in self.tunneled if n.version == addr.version)

    def alloc_socks(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self._next_sock, self._next_sock + n))
        self._next_sock += n
        return ids


class Candidates:
    """This node's own endpoints: what it publishes to control and sends in call-me-maybe.

    LAN addresses on the WireGuard port, a gateway port mapping (ahead of STUN: it
    works even behind a hard NAT), STUN-reflexive IPv4/IPv6, and behind a hard NAT a
    guess: the public IP with the local port (NATs that preserve ports when they
    can). Each setter returns the new list when it changed, else ``None``, so the
    node agent publishes only changes.
    """

    def __init__(self, local_port: int) -> None:
        self.local_port = local_port
        self._lan: tuple[str, ...] = ()
        self._mapped: tuple[Addr, ...] = ()
        self._reflexive: tuple[Addr, ...] = ()
        self._hard = False
        self._current = self._build()

    def _build(self) -> tuple[Endpoint, ...]:
        out: dict[Addr, Endpoint] = {}
        for ip in self._lan:
            a = norm((ip, self.local_port))
            out.setdefault(a, Endpoint(a[0], a[1], "local"))
        for m in self._mapped:
            out.setdefault(m, Endpoint(m[0], m[1], "portmap"))
        for r in self._reflexive:
            a = norm(r)
            out.setdefault(a, Endpoint(a[0], a[1], "stun"))
        if self._hard:
            for r in self._reflexive:
                a = norm((r[0], self.local_port))
                out.setdefault(a, Endpoint(a[0], a[1], "guess"))
        return tuple(out.values())

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._current

    @property
    def addrs(self) -> tuple[Addr, ...]:
        return tuple((e.ip, e.port) for e in self._current)

    def update(self, *, lan: Iterable[str] | None = None,
               reflexive: Iterable[Addr] | None = None, hard_nat: bool | None = None,
               local_port: int | None = None, mapped: Iterable[Addr] | None = None
               ) -> tuple[Endpoint, ...] | None:
        """Replace any of the inputs; the new endpoint list if that changed it."""
        if lan is not None:  # link-local needs a scope a peer cannot know: never published
            self._lan = tuple(dict.fromkeys(a.compressed for a in map(ipaddress.ip_address, lan)
                                            if not a.is_link_local and not a.is_loopback))
        if reflexive is not None:
            self._reflexive = tuple(dict.fromkeys(norm(r) for r in reflexive))
        if mapped is not None:
            self._mapped = tuple(dict.fromkeys(norm(m) for m in mapped))
        if hard_nat is not None:
            self._hard = hard_nat
        if local_port is not None:
            self.local_port = local_port
        new = self._build()
        if new == self._current:
            return None
        self._current = new
        return new


# ---------------------------------------------------------------- per-peer machine


class PathState(enum.Enum):
    RELAY = "relay"
    PENDING = "pending"  # committed, waiting for a WireGuard handshake (kernel)
    DIRECT = "direct"


@attrs.define
class _Cand:
    addr: Addr
    sock: int
    sources: set[str]
    rtts: list[float] = attrs.field(factory=list)
    last_pong: float | None = None
    last_ping: float | None = None
    unanswered_since: float | None = None
    bad_until: float = float("-inf")
    last_pingback: float = float("-inf")

    @property
    def rtt(self) -> float | None:
        return statistics.median(self.rtts) if self.rtts else None

    def fresh(self, now: float, cfg: TraversalConfig) -> bool:
        return self.last_pong is not None and now - self.last_pong <= cfg.trust_timeout

    def suspect_at(self, cfg: TraversalConfig) -> float | None:
        """When a ping left unanswered makes this path suspect (None: none outstanding)."""
        return None if self.unanswered_since is None \
            else self.unanswered_since + cfg.suspect_after

    def dead_at(self, cfg: TraversalConfig) -> float | None:
        """When unanswered pings make this path dead (None: no ping outstanding)."""
        if self.unanswered_since is None:
            return None
        t = self.unanswered_since + cfg.ping_timeout
        if self.last_pong is not None:
            t = max(t, self.last_pong + cfg.trust_timeout)
        return t


@attrs.frozen
class TriedCandidate:
    """One address probed for a peer: where it came from and what happened.

    ``sources``: netmap, cmm (the peer's call-me-maybe), peer (it pinged us
    from there), wg (WireGuard roamed there), search (a port-search hit);
    ``result``: answered, no answer, or not tried yet.
    """

    addr: Addr
    sock: int
    sources: tuple[str, ...]
    rtt: float | None
    result: str


@attrs.frozen
class PathInfo:
    """A peer's path, for ``status`` and the grid, with why it is what it is.

    ``reason``: one of the ``REASON_*`` texts; ``pinned``: the user's pin
    (``direct`` or ``relay``), if any.
    """

    state: PathState
    endpoint: Addr | None
    sock: int
    rtt: float | None
    since: float
    reason: str = ""
    tried: tuple[TriedCandidate, ...] = ()
    pinned: str | None = None
    #: Measured path MTUs (tunnel bytes; None: not known) of the direct path and the relay.
    mtu_direct: int | None = None
    mtu_relay: int | None = None

    @property
    def mtu(self) -> int | None:
        """The MTU of the path in use now."""
        return self.mtu_direct if self.state is PathState.DIRECT else self.mtu_relay


REASON_DIRECT = "direct"
REASON_PINNED = "pinned by the user"
REASON_HANDSHAKE = "waiting for a WireGuard handshake"
REASON_UDP_BLOCKED = "local UDP blocked"
REASON_PROBING = "still probing"
REASON_HARD_BOTH = "endpoint-dependent NAT on both sides"
REASON_NO_CANDIDATES = "the peer published no candidates"
REASON_NO_FAMILY = "no common address family"
REASON_NO_ANSWER = "no answer from the peer's candidates"
#: Not the path machine's: the node adds it when control says the peer is offline.
REASON_OFFLINE = "peer offline"


@attrs.define
class _Search:
    """The easy side's probe plan against a hard NAT."""

    ports: Iterator[Addr]
    start_at: float
    end_at: float
    sent: int = 0
    next_at: float = 0.0


_TICK = 0.05
_PORTS = range(1024, 65536)
_PENDING_TTL = 10.0

CandKey = tuple[int, Addr]


class PeerPath:
    """The path state machine for one peer. Use through :class:`Traversal`, or alone in tests.

    ``new_txid()`` gives each ping a fresh unguessable id (:meth:`wgmesh.disco.Disco.new_txid`).
    """

    def __init__(self, key: Key, local: LocalInfo, cfg: TraversalConfig, now: float, *,
                 new_txid: Callable[[], bytes], rng: random.Random | None = None) -> None:
        self.key = key
        self.new_txid = new_txid
        self.local = local
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.state = PathState.RELAY
        self.best: CandKey | None = None
        self.since = now
        self.counters: Counter[str] = Counter()
        self.peer_flags = 0
        self._cands: dict[CandKey, _Cand] = {}
        self._pending: dict[bytes, tuple[CandKey, float, bool]] = {}
        self._round_start = float("-inf")
        self._round_until: float | None = None
        self._next_probe = float("inf")
        self._next_round = now
        self._last_cmm = float("-inf")
        self._last_cmm_round = float("-inf")
        self._last_cmm_reply = float("-inf")
        self._last_active = now
        self._last_io: tuple[int, int] | None = None
        self._last_hs: float | None = None
        self._hs_baseline: float | None = None
        self._pending_deadline: float | None = None
        self._sampled = float("-inf")  # when the latest stats reading was taken
        self._hs_elsewhere = False
        self._rx_baseline: int | None = None
        self._last_reassert = float("-inf")
        self._ingress = True
        self._search: _Search | None = None
        self._search_misses = 0
        self._search_not_before = float("-inf")
        self._suspect_probed: float | None = None
        self._open_socks: tuple[int, ...] = ()
        self._aimed: set[Addr] = set()
        self._close_socks_at: float | None = None
        self._rounds_done = 0
        #: The user's pin: "direct", "relay" or None.
        self.pinned: str | None = None
        self.mtu_direct = pmtu.PathMtu(interval=cfg.mtu_interval, timeout=cfg.mtu_timeout)
        # The relay is a TCP stream: a probe is carried or refused whole, never lost alone.
        self.mtu_relay = pmtu.PathMtu(interval=cfg.mtu_interval, timeout=cfg.mtu_timeout,
                                      copies=1)
        self.mtu_relay.next_round = now + cfg.round_duration  # after the first round
        self._mtu_path: CandKey | None = None  # the direct path mtu_direct measures

    # ---- queries ------------------------------------------------------------------
    def info(self) -> PathInfo:
        c = self._cands.get(self.best) if self.best else None
        tried = tuple(TriedCandidate(
            k.addr, k.sock, tuple(sorted(k.sources)), k.rtt,
            "answered" if k.last_pong is not None else
            "no answer" if k.last_ping is not None else "not tried")
            for k in self._cands.values())
        return PathInfo(self.state, c.addr if c else None, c.sock if c else 0,
                        c.rtt if c else None, self.since, self.reason(), tried, self.pinned,
                        self.mtu_direct.mtu if self._mtu_path == self.best else None,
                        self.mtu_relay.mtu)

    def reason(self) -> str:
        """Why the path is what it is, from what this side knows (see ``REASON_*``)."""
        if self.state is PathState.DIRECT:
            return f"{REASON_DIRECT} ({REASON_PINNED})" if self.pinned == "direct" \
                else REASON_DIRECT
        if self.pinned == "relay":
            return REASON_PINNED
        if self.state is PathState.PENDING:
            return REASON_HANDSHAKE
        if not self.local.udp:
            return REASON_UDP_BLOCKED
        if self._rounds_done == 0:
            return REASON_PROBING
        if self.local.hard_nat and self.peer_flags & FLAG_HARD_NAT:
            return REASON_HARD_BOTH
        theirs = [c.addr for c in self._cands.values() if c.sources & {"netmap", "cmm"}]
        if not theirs:
            return REASON_NO_CANDIDATES
        if self.local.candidates and not ({":" in a[0] for a in theirs}
                                          & {":" in a[0] for a in self.local.candidates}):
            return REASON_NO_FAMILY
        return REASON_NO_ANSWER

    def candidates(self) -> list[tuple[int, Addr, float | None]]:
        return [(c.sock, c.addr, c.rtt) for c in self._cands.values()]

    def _active(self, now: float) -> bool:
        t = self.cfg.active_timeout
        return t is None or now - self._last_active <= t

    def _heartbeat_due(self, best: _Cand) -> float:
        last = best.last_ping if best.last_ping is not None else self.since
        return last + self.cfg.heartbeat_interval

    def _score(self, c: _Cand) -> float:
        s = max(c.rtt, self.cfg.rtt_floor) if c.rtt is not None else float("inf")
        if is_lan(c.addr[0]):
            s *= self.cfg.lan_factor
        if ":" in c.addr[0]:
            s *= self.cfg.v6_factor
        if c.sock:
            s *= self.cfg.extra_socket_factor
        if not c.sources & {"netmap", "cmm"}:
            s *= self.cfg.learned_factor
        return s

    def next_wakeup(self) -> float:
        """The earliest time :meth:`tick` has something to do."""
        t = [self._next_round]
        if self._round_until is not None:
            t += [self._round_until, self._next_probe]
        if self._search is not None:
            t.append(max(self._search.next_at, self._search.start_at))
        if self._close_socks_at is not None:
            t.append(self._close_socks_at)
        if (expiry := self._pending_expiry()) is not None:
            t.append(expiry)
        t.append(self.mtu_relay.next_wakeup())
        if self.state is PathState.DIRECT:
            t.append(self.mtu_direct.next_wakeup() if self._mtu_path == self.best else 0.0)
        best = self._cands.get(self.best) if self.best else None
        if best is not None:
            dead = best.dead_at(self.cfg)
            if dead is not None:
                t.append(dead)
            if (sus := self._suspect_at(best)) is not None:
                t.append(sus)
            due = self._heartbeat_due(best)
            if self._active(due):
                t.append(due)
        return min(t)

    # ---- candidates ---------------------------------------------------------------
    def _cand(self, addr: Addr, sock: int, source: str) -> _Cand | None:
        k = (sock, addr)
        c = self._cands.get(k)
        if c is None:
            if self.local.in_tunnel(addr[0]):
                self.counters["drop_tunneled_candidate"] += 1
                return None
            if len(self._cands) >= self.cfg.max_candidates:
                self.counters["drop_too_many_candidates"] += 1
                return None
            c = self._cands[k] = _Cand(addr, sock, {source})
        else:
            c.sources.add(source)
        return c

    def _replace_source(self, source: str, addrs: Iterable[Addr]) -> bool:
        """Set the sock-0 candidates from ``source``; True if any is new."""
        want = {norm(a) for a in addrs}
        for k, c in list(self._cands.items()):
            if source in c.sources and c.addr not in want:
                c.sources.discard(source)
                if not c.sources and k != self.best:
                    del self._cands[k]
        new = False
        for a in want:
            new |= (0, a) not in self._cands
            self._cand(a, 0, source)
        return new

    def set_endpoints(self, addrs: Iterable[Addr], now: float) -> list[_Out]:
        """The peer's endpoints from the netmap; new ones start a round.

        A path in use that the peer no longer advertises is one it moved away from (a
        roam, a new NAT mapping): choose again now, so a path it does advertise that
        answers wins (the old one counts as learned), rather than when the old path's
        pongs stop."""
        advertised = self._advertised(self.best)
        out: list[_Out] = []
        if self._replace_source("netmap", addrs):
            out = self._aim_search_ports(now) + self._start_round(now, "netmap")
        if advertised and not self._advertised(self.best):
            self.counters["best_withdrawn"] += 1
            out += self._select(now)
        return out

    def _advertised(self, key: tuple[int, Addr] | None) -> bool:
        c = self._cands.get(key) if key else None
        return c is not None and bool(c.sources & {"netmap", "cmm"})

    # ---- pings --------------------------------------------------------------------
    def _ping(self, c: _Cand, now: float) -> DiscoOut:
        txid = self.new_txid()
        self._pending[txid] = ((c.sock, c.addr), now, False)
        c.last_ping = now
        if c.unanswered_since is None:
            c.unanswered_since = now
        return DiscoOut(c.addr, c.sock, disco.Ping(txid, self.local.node_key))

    def _cmm(self, now: float, flags: int = 0) -> RelayOut:
        self._last_cmm = now
        if self.local.hard_nat:
            flags |= FLAG_HARD_NAT
        if self.cfg.many_ports:
            flags |= FLAG_MANY_PORTS
        eps = tuple(self.local.candidates[:disco.MAX_ENDPOINTS])
        return RelayOut(disco.CallMeMaybe(eps, flags))

    def _start_round(self, now: float, why: str, *, cmm: bool = True) -> list[_Out]:
        self.counters[f"round_{why}"] += 1
        self._round_start = now
        self._round_until = now + self.cfg.round_duration
        self._next_round = now + self.cfg.reprobe_interval
        out: list[_Out] = []
        if cmm and now - self._last_cmm >= self.cfg.cmm_min_interval \
                and self.pinned != "relay":
            out.append(self._cmm(now))
        return out + self._probe(now)

    def _probe(self, now: float) -> list[_Out]:
        self._next_probe = now + self.cfg.probe_interval
        if self.pinned == "relay":
            return []
        return [self._ping(c, now) for c in self._cands.values()
                if c.bad_until <= now and not (c.last_pong is not None
                                               and c.last_pong >= self._round_start)]

    def kick(self, now: float, why: str = "kick") -> list[_Out]:
        """Start a round now: our candidates or the network changed. Against a hard peer
        the port search starts too: our public address may have just become known."""
        self._last_cmm = float("-inf")
        return self._start_round(now, why) + self._maybe_search(now)

    def pin(self, mode: str | None, now: float) -> list[_Out]:
        """Hold the path on ``relay``, or insist on ``direct`` (a round that ends on the
        relay then reports :class:`PinFailed`); ``None`` lets traversal choose again.

        A relay pin also stops probing and answering the peer's pings, so the peer
        loses its direct path within its trust timeout and follows onto the relay.
        """
        if mode not in ("direct", "relay", None):
            raise ValueError(f"pin mode {mode!r}: direct, relay or None")
        self.pinned = mode
        if mode == "relay":
            return self._to_relay(now, "pinned") if self.state is not PathState.RELAY else []
        if self.state is PathState.DIRECT:
            return []
        return self.kick(now, "unpin" if mode is None else "pin")

    def on_traffic(self, now: float) -> None:
        self._last_active = now

    # ---- path MTU -----------------------------------------------------------------
    def _mtu_probes(self, now: float) -> list[_Out]:
        """A round of padded pings on each path that is due: the relay always, the direct
        path while it is the one in use (a new endpoint is a new path, measured at once)."""
        out: list[_Out] = []
        self.mtu_relay.tick(now)
        if self.mtu_relay.due(now):
            out += [RelayOut(disco.Ping(txid, self.local.node_key, pad))
                    for txid, pad in self.mtu_relay.start(now, self.local.mtu, self.new_txid)]
        c = self._cands.get(self.best) if self.best else None
        if self.state is not PathState.DIRECT or c is None:
            return out
        if self._mtu_path != self.best:
            self._mtu_path = self.best
            self.mtu_direct.reset()
        self.mtu_direct.tick(now)
        if self.mtu_direct.due(now):
            out += [DiscoOut(c.addr, c.sock, disco.Ping(txid, self.local.node_key, pad))
                    for txid, pad in self.mtu_direct.start(now, self.local.mtu, self.new_txid)]
        return out

    def on_relay_pong(self, pong: disco.Pong) -> None:
        if not self.mtu_relay.on_pong(pong.txid, pong.size):
            self.counters["drop_stray_relay_pong"] += 1

    # ---- disco input --------------------------------------------------------------
    def on_ping(self, src: Addr, sock: int, txid: bytes, now: float, size: int = 0
                ) -> list[_Out]:
        """``size``: a padded ping's datagram length, which the pong confirms."""
        if self.pinned == "relay":
            # No pong: the peer must not find a direct path either, or it would stop
            # taking our packets from the relay (relay ingress off on a direct path).
            self.counters["ping_ignored_pinned"] += 1
            return []
        src = norm(src)
        out: list[_Out] = [DiscoOut(src, sock, disco.Pong(txid, src, size))]
        c = self._cand(src, sock, "peer")
        # Their ping means their NAT is open to us now, so our earlier ping was likely
        # dropped: ping back at once (throttled, in case they ping in a burst).
        if c is not None and not c.fresh(now, self.cfg) and (
                now - c.last_pingback >= self.cfg.probe_interval / 2):
            c.last_pingback = now
            out.append(self._ping(c, now))
        return out

    def on_pong(self, src: Addr, sock: int, pong: disco.Pong, now: float) -> list[_Out]:
        src = norm(src)
        if self.mtu_direct.on_pong(pong.txid, pong.size):
            return []
        p = self._pending.get(pong.txid)
        if p is None:
            self.counters["drop_stray_pong"] += 1
            return []
        key, sent_at, search = p
        if key != (sock, src):
            self.counters["drop_pong_wrong_source"] += 1
            return []
        del self._pending[pong.txid]
        c = self._cand(src, sock, "search" if search else "peer")
        if c is None:
            return []
        c.rtts = [*c.rtts[-2:], now - sent_at]
        c.last_pong = now
        c.unanswered_since = None
        out: list[_Out] = [ObservedAddr(norm(pong.src), sock)]
        if search and self._search is not None:
            self.counters["search_hit"] += 1
            self._search = None
            self._search_misses = 0
        return out + self._select(now)

    def on_call_me_maybe(self, cmm: disco.CallMeMaybe, now: float) -> list[_Out]:
        self.peer_flags = cmm.flags
        self._replace_source("cmm", cmm.endpoints)
        # A hard peer: no round can reach it, so start the port search now, not after one.
        out: list[_Out] = self._maybe_search(now)
        out += self._open_search_ports(now) if cmm.flags & FLAG_PORT_SEARCH \
            else self._aim_search_ports(now)
        if not cmm.flags & FLAG_REPLY and now - self._last_cmm_reply >= self.cfg.cmm_min_interval:
            # Our last call-me-maybe may have been lost (e.g. sent before the peer
            # reached the relay): answer, marked so the answer is never answered.
            self._last_cmm_reply = now
            out.append(self._cmm(now, FLAG_REPLY))
        if now - self._last_cmm_round < self.cfg.cmm_min_interval:
            self.counters["cmm_rate_limited"] += 1
            return out
        self._last_cmm_round = now
        return out + self._start_round(now, "cmm", cmm=False)

    # ---- choosing -----------------------------------------------------------------
    def _select(self, now: float) -> list[_Out]:
        if self.pinned == "relay":
            return []
        # A suspect path is not a choice even while its last pong is fresh: otherwise, with
        # RTTs under the floor (a LAN, the lab), it ties with the path that answers now
        # and, listed first, keeps winning until it counts as dead.
        fresh = [c for c in self._cands.values()
                 if c.fresh(now, self.cfg) and c.bad_until <= now
                 and not ((sus := c.suspect_at(self.cfg)) is not None and now >= sus)]
        if not fresh:
            return []
        cand = min(fresh, key=self._score)
        cur = self._cands.get(self.best) if self.best else None
        if cur is cand:
            return []
        if cur is not None:
            dead = cur.dead_at(self.cfg)
            suspect = cur.suspect_at(self.cfg)
            if (dead is None or now < dead) and (suspect is None or now < suspect) and \
                    self._score(cand) >= self._score(cur) * (1 - self.cfg.hysteresis):
                return []
        return self._commit(cand, now, "better" if cur else "pong")

    def _commit(self, c: _Cand, now: float, reason: str) -> list[_Out]:
        # Kernel WireGuard forces a handshake by re-adding the peer, which ends its session
        # (and resets its counters). A move from one trusted direct path to another keeps
        # the session it has: WireGuard already works between the two, and if the new path
        # does not carry it, the peer's next packet on the old one roams WireGuard back.
        fresh_trust = self.cfg.confirm_handshake and self.state is not PathState.DIRECT
        self.best = (c.sock, c.addr)
        self.counters["commit"] += 1
        out: list[_Out] = [SetEndpoint(self.key, c.addr, c.sock, fresh_trust)]
        if fresh_trust:
            self.state = PathState.PENDING
            self._pending_deadline = now + self.cfg.handshake_timeout
            self._hs_baseline = self._last_hs
            self._hs_elsewhere = False
            self._rx_baseline = None
            return out
        return out + self._confirm(now, reason)

    def _confirm(self, now: float, reason: str) -> list[_Out]:
        self.state = PathState.DIRECT
        self._pending_deadline = None
        self.since = now
        c = self._cands[self.best]  # type: ignore[index]
        out: list[_Out] = []
        if self.cfg.stop_relay_ingress and self._ingress:
            self._ingress = False
            out.append(RelayIngress(self.key, False))
        out.append(PathChanged(self.key, "direct", c.addr, reason, c.rtt, c.sock))
        return out

    def _to_relay(self, now: float, reason: str) -> list[_Out]:
        was = self.state
        self.state = PathState.RELAY
        self.best = None
        self._pending_deadline = None
        self.since = now
        out: list[_Out] = [SetEndpoint(self.key, RELAY)]
        if not self._ingress:
            self._ingress = True
            out.append(RelayIngress(self.key, True))
        if was is PathState.DIRECT:
            out.append(PathChanged(self.key, "relay", None, reason))
        self.counters[f"to_relay_{reason}"] += 1
        return out

    # ---- WireGuard stats ----------------------------------------------------------
    def on_wg_stats(self, now: float, endpoint: Addr | _Relay | None,
                    last_handshake: float | None, rx_bytes: int = 0,
                    tx_bytes: int = 0, sampled: float | None = None) -> list[_Out]:
        """Peer stats from the data plane; feed them about once a second.

        ``endpoint`` as the data plane reports it, with the relay bridge given as
        :data:`RELAY`. ``last_handshake`` in any clock, compared only with itself.
        ``sampled``: when the reading was taken, if before ``now`` (a slow read).
        """
        self._sampled = now if sampled is None else sampled
        io = (rx_bytes, tx_bytes)
        if self._last_io is not None and io != self._last_io:
            self._last_active = now
        self._last_io = io
        ep = endpoint if endpoint is None or endpoint is RELAY else norm(endpoint)
        out: list[_Out] = []
        best = self._cands.get(self.best) if self.best else None
        if best is not None:
            fresh_hs = last_handshake is not None and (
                self._hs_baseline is None or last_handshake > self._hs_baseline)
            if ep != best.addr:
                self._rx_baseline = None  # packets from elsewhere: start over
            if self.state is PathState.PENDING and ep == best.addr:
                if fresh_hs:
                    out += self._confirm(now, "handshake")
                elif self._rx_baseline is None or not self.cfg.confirm_by_rx:
                    self._rx_baseline = rx_bytes
                elif rx_bytes > self._rx_baseline:
                    # Authenticated packets arrived and WireGuard still points at the
                    # path: the last of them came from it (any other source would have
                    # moved the endpoint). As good as a handshake, without forcing one.
                    out += self._confirm(now, "wireguard-rx")
            elif ep is RELAY and now - self._last_reassert >= 1.0:
                self._hs_elsewhere |= self.state is PathState.PENDING and fresh_hs
                # WireGuard roamed back to the bridge (the peer still sends via the relay).
                self._last_reassert = now
                self.counters["reassert_direct"] += 1
                out.append(SetEndpoint(self.key, best.addr, best.sock))
        if ep is not None and ep is not RELAY and (best is None or ep != best.addr) \
                and self.pinned != "relay":
            c = self._cand(ep, 0, "wg")
            if c is not None and not c.fresh(now, self.cfg) and (
                    c.last_ping is None or now - c.last_ping >= self.cfg.probe_interval):
                self.counters["follow_wg_roam"] += 1
                out.append(self._ping(c, now))
        self._last_hs = last_handshake
        return out

    # ---- port search --------------------------------------------------------------
    def _peer_public_v4(self) -> list[Addr]:
        return [c.addr for c in self._cands.values()
                if c.sock == 0 and c.sources & {"netmap", "cmm"} and _public_v4(c.addr[0])]

    def _maybe_search(self, now: float) -> list[_Out]:
        if not (self.cfg.port_search and self.state is PathState.RELAY
                and self._search is None and not self.local.hard_nat
                and self.peer_flags & FLAG_HARD_NAT and now >= self._search_not_before):
            return []
        targets = self._peer_public_v4()
        if not targets or not any(_public_v4(ip) for ip, _ in self.local.candidates):
            return []  # the hard side could not aim its mappings at us yet
        self.counters["search_started"] += 1
        ip, base = targets[0]
        n = self.cfg.search_probes
        if self.peer_flags & FLAG_MANY_PORTS:
            ports: Iterable[int] = self.rng.sample(_PORTS, n)
        else:
            span = len(_PORTS)
            ports = (_PORTS[(base - _PORTS.start + i) % span] for i in range(1, n + 1))
        start = now + self.cfg.search_delay
        self._search = _Search(((ip, p) for p in ports), start, now + self.cfg.search_duration,
                               next_at=start)
        return [self._cmm(now, FLAG_PORT_SEARCH)]

    def _search_step(self, now: float) -> list[_Out]:
        s = self._search
        if s is None or now < s.next_at:
            return []
        if self.state is not PathState.RELAY:  # found a path some other way
            self._search = None
            return []
        if now >= s.end_at or s.sent >= self.cfg.search_probes:
            self._search = None
            self.counters["search_miss"] += 1
            retry = min(self.cfg.reprobe_interval,
                        self.cfg.search_retry * 2 ** self._search_misses)
            self._search_misses += 1
            self._search_not_before = now + retry
            self._next_round = min(self._next_round, now + retry)
            return []
        budget = min(self.cfg.search_probes, int((now - s.start_at) * self.cfg.search_rate) + 1)
        out: list[_Out] = []
        for addr in s.ports:
            out.append(self._search_ping(addr, 0, now))
            s.sent += 1
            if s.sent >= budget:
                break
        self.counters["search_probes"] += len(out)
        s.next_at = now + _TICK if s.sent < self.cfg.search_probes \
            else min(s.end_at, now + self.cfg.ping_timeout)  # the last pongs' grace
        return out

    def _open_search_ports(self, now: float) -> list[_Out]:
        """Hard side: open many mappings towards the easy side, one per extra socket."""
        if not (self.cfg.port_search and self.cfg.many_ports and self.local.hard_nat):
            return []
        out: list[_Out] = []
        if not self._open_socks:
            self._open_socks = self.local.alloc_socks(self.cfg.search_ports)
            out.append(OpenPorts(self.key, self._open_socks))
        self._close_socks_at = now + self.cfg.search_duration + self.cfg.round_duration
        self._aimed = set()
        self.counters["search_ports_opened"] += 1
        return out + self._aim_search_ports(now)

    def _aim_search_ports(self, now: float) -> list[_Out]:
        """Hard side: ping from every open search socket to each public address of the
        peer not yet aimed at (it may publish its address after asking us to open)."""
        if not self._open_socks or self._close_socks_at is None:
            return []
        targets = [a for a in self._peer_public_v4() if a not in self._aimed]
        self._aimed.update(targets)
        return [self._search_ping(addr, sock, now) for sock in self._open_socks
                for addr in targets]

    def _search_ping(self, addr: Addr, sock: int, now: float) -> DiscoOut:
        """A probe that becomes a candidate only if it is answered (no state per miss)."""
        txid = self.new_txid()
        self._pending[txid] = ((sock, addr), now, True)
        return DiscoOut(addr, sock, disco.Ping(txid, self.local.node_key))

    def _close_ports(self, keep: int | None) -> list[_Out]:
        close = tuple(s for s in self._open_socks if s != keep)
        self._open_socks = (keep,) if keep in self._open_socks else ()
        self._close_socks_at = None
        for k in [k for k in self._cands if k[0] in close]:
            del self._cands[k]
        return [ClosePorts(self.key, close)] if close else []

    # ---- timers -------------------------------------------------------------------
    def tick(self, now: float) -> list[_Out]:
        out: list[_Out] = []
        for txid, (_k, sent, _s) in list(self._pending.items()):
            if now - sent > _PENDING_TTL:
                del self._pending[txid]
        if now >= self._next_round:
            out += self._start_round(now, "reprobe")
        if self._round_until is not None:
            if now >= self._round_until:
                self._round_until = None
                self._rounds_done += 1
                out += self._maybe_search(now)
                if self.pinned == "direct" and self.state is PathState.RELAY:
                    out.append(PinFailed(self.key, "direct", self.reason()))
            elif now >= self._next_probe:
                out += self._probe(now)
        out += self._search_step(now)
        if self._close_socks_at is not None and now >= self._close_socks_at:
            out += self._close_ports(self.best[0] if self.best and self.best[0] else None)
        best = self._cands.get(self.best) if self.best else None
        if best is not None:
            dead = best.dead_at(self.cfg)
            if dead is not None and now >= dead:
                return out + self._path_lost(best, now)
            sus = self._suspect_at(best)
            if sus is not None and now >= sus:
                self._suspect_probed = best.unanswered_since
                self.counters["suspect"] += 1
                out += self._start_round(now, "suspect")
            if (expiry := self._pending_expiry()) is not None and now >= expiry:
                if self._hs_elsewhere:  # WireGuard works; the peer just had not switched
                    self.counters["handshake_via_relay"] += 1
                    return out + self._to_relay(now, "peer-on-relay") + self._select(now)
                best.bad_until = self._next_round
                self.counters["no_handshake"] += 1
                return out + self._to_relay(now, "no-handshake") + self._select(now)
            if self._active(now) and now >= self._heartbeat_due(best):
                out.append(self._ping(best, now))
        return out + self._mtu_probes(now)

    def _pending_expiry(self) -> float | None:
        """When a pending path without a handshake goes back to the relay: at the deadline
        once a stats reading taken since shows none, else a grace period later."""
        if (d := self._pending_deadline) is None:
            return None
        return d if self._sampled >= d else d + self.cfg.stats_grace

    def _suspect_at(self, best: _Cand) -> float | None:
        """When the best path's unanswered ping makes it suspect (None: not pending, or
        this unanswered spell was already probed)."""
        if best.unanswered_since == self._suspect_probed or self.pinned == "relay":
            return None
        return best.suspect_at(self.cfg)

    def _path_lost(self, best: _Cand, now: float) -> list[_Out]:
        best.rtts.clear()
        best.last_pong = best.unanswered_since = None
        out = self._to_relay(now, "pongs-stopped")
        alt = self._select(now)
        if alt:
            return out + alt
        return [*out, RefreshCandidates(f"path to {self.key.short()} lost"),
                *self.kick(now, "lost")]

    def drop_tunneled(self) -> None:
        """Forget candidates that our routing now sends into the tunnel (not the path in
        use: that one answered over the underlay, so it is not inside)."""
        for k in [k for k in self._cands if k != self.best and self.local.in_tunnel(k[1][0])]:
            del self._cands[k]

    def close(self) -> list[_Out]:
        """The peer is gone: release its extra sockets."""
        return self._close_ports(None)


# ---------------------------------------------------------------- the node's traversal


class Traversal:
    """All peers of one node: routes disco in, seals disco out, aggregates timers.

    Driver contract (:class:`wgmesh.node.dataplane.DataPlane` is the production driver):

    * feed every datagram that :func:`~wgmesh.disco.is_disco` accepts to
      :meth:`on_udp` (with the id of the socket it came in on, 0 for the
      WireGuard port), and disco from the relay to :meth:`on_relay`;
    * feed peer stats (about 1/s) to :meth:`on_wg_stats`;
    * call :meth:`tick` at :meth:`next_wakeup`;
    * carry out every returned action, in order.

    ``wall`` (the wall clock) and ``random_bytes`` go to :class:`~wgmesh.disco.Disco`.
    """

    def __init__(self, disco_private: PrivateKey, node_key: Key,
                 cfg: TraversalConfig | None = None, *,
                 wall: Callable[[], float], random_bytes: Callable[[int], bytes],
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg or TraversalConfig()
        self.disco = disco.Disco(disco_private, wall=wall, random_bytes=random_bytes)
        self.local = LocalInfo(node_key)
        self.peers: dict[Key, PeerPath] = {}
        self._disco_keys: dict[Key, Key] = {}  # node key -> disco key
        self._by_disco: dict[Key, Key] = {}    # disco key -> node key
        self._observed: set[tuple[Addr, int]] = set()
        self._rng = rng or random.Random()
        self.counters: Counter[str] = Counter()

    @property
    def disco_public(self) -> Key:
        return self.disco.public

    # ---- peers & local ------------------------------------------------------------
    def upsert_peer(self, node_key: Key, disco_key: Key, endpoints: Iterable[Addr],
                    now: float) -> list[Action]:
        """Add a peer (relayed, probing at once) or update its disco key and endpoints."""
        old = self._disco_keys.get(node_key)
        if old is not None and old != disco_key:
            self._by_disco.pop(old, None)
        self._disco_keys[node_key] = disco_key
        self._by_disco[disco_key] = node_key
        peer = self.peers.get(node_key)
        out: list[_Out] = []
        if peer is None:
            peer = self.peers[node_key] = PeerPath(node_key, self.local, self.cfg, now,
                                                   new_txid=self.disco.new_txid, rng=self._rng)
            out.append(SetEndpoint(node_key, RELAY))
        out += peer.set_endpoints(endpoints, now)
        return self._wire(peer, out)

    def remove_peer(self, node_key: Key) -> list[Action]:
        peer = self.peers.pop(node_key, None)
        disco_key = self._disco_keys.pop(node_key, None)
        if disco_key is not None:
            self._by_disco.pop(disco_key, None)
        return self._wire(peer, peer.close()) if peer else []

    def set_local(self, candidates: Iterable[Addr | Endpoint], now: float, *,
                  hard_nat: bool | None = None, udp: bool | None = None) -> list[Action]:
        """Our own endpoints (and NAT hardness) changed: tell every peer in a new round.

        ``udp``: whether netcheck got any UDP answer (only explains paths).
        """
        if udp is not None:
            self.local.udp = udp
        cands = tuple(norm((c.ip, c.port) if isinstance(c, Endpoint) else c)
                      for c in candidates)
        changed = cands != self.local.candidates or (
            hard_nat is not None and hard_nat != self.local.hard_nat)
        self.local.candidates = cands
        if hard_nat is not None:
            self.local.hard_nat = hard_nat
        if not changed:
            return []
        return [a for p in self.peers.values() for a in self._wire(p, p.kick(now, "local"))]

    def set_tunneled(self, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                     ) -> None:
        """The prefixes our routing sends into the tunnel (see :attr:`LocalInfo.tunneled`)."""
        self.local.tunneled = tuple(n for n in nets if n.prefixlen)
        for p in self.peers.values():
            p.drop_tunneled()

    def network_changed(self, now: float) -> list[Action]:
        """Interfaces or routes changed: re-STUN and re-probe everyone."""
        out: list[Action] = [RefreshCandidates("network changed")]
        for p in self.peers.values():
            out += self._wire(p, p.kick(now, "network"))
        return out

    # ---- input --------------------------------------------------------------------
    def _known(self, data: bytes) -> bool:
        sender = disco.sender_of(data)
        if sender is not None and sender not in self._by_disco:
            self.counters["drop_unknown_sender"] += 1
            return False
        return True

    def on_udp(self, data: bytes, src: tuple[str, int], now: float, sock: int = 0
               ) -> list[Action]:
        if not self._known(data):
            return []
        opened = self.disco.open(data)
        if opened is None:
            return []
        sender, msg = opened
        node = self._by_disco[sender]  # _known() checked the key the box was opened with
        peer = self.peers[node]
        if isinstance(msg, disco.Ping):
            if msg.node_key != node:
                self.counters["drop_node_key_mismatch"] += 1
                return []
            return self._wire(peer, peer.on_ping(src, sock, msg.txid, now,
                                                 len(data) if msg.padding else 0))
        if isinstance(msg, disco.Pong):
            return self._wire(peer, peer.on_pong(src, sock, msg, now))
        return self._wire(peer, peer.on_call_me_maybe(msg, now))

    def on_relay(self, src_node: Key, data: bytes, now: float) -> list[Action]:
        """Disco that came through the relay from ``src_node`` (the relay vouches for it)."""
        if not self._known(data):
            return []
        opened = self.disco.open(data)
        if opened is None:
            return []
        sender, msg = opened
        if self._by_disco.get(sender) != src_node or src_node not in self.peers:
            self.counters["drop_relay_sender_mismatch"] += 1
            return []
        peer = self.peers[src_node]
        if isinstance(msg, disco.Ping) and msg.padding and msg.node_key == src_node:
            # A relay path MTU probe: the answer goes back the same way.
            return self._wire(peer, [RelayOut(disco.Pong(msg.txid, disco.NO_ADDR, len(data)))])
        if isinstance(msg, disco.Pong):
            peer.on_relay_pong(msg)
            return []
        if not isinstance(msg, disco.CallMeMaybe):
            self.counters["drop_relay_not_cmm"] += 1
            return []
        return self._wire(peer, peer.on_call_me_maybe(msg, now))

    def on_wg_stats(self, node_key: Key, now: float, endpoint: Addr | _Relay | None,
                    last_handshake: float | None, rx_bytes: int = 0, tx_bytes: int = 0,
                    sampled: float | None = None) -> list[Action]:
        peer = self.peers.get(node_key)
        if peer is None:
            return []
        return self._wire(peer, peer.on_wg_stats(now, endpoint, last_handshake,
                                                 rx_bytes, tx_bytes, sampled))

    def on_traffic(self, node_key: Key, now: float) -> None:
        if (peer := self.peers.get(node_key)) is not None:
            peer.on_traffic(now)

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for p in list(self.peers.values()):
            if p.next_wakeup() <= now:
                out += self._wire(p, p.tick(now))
        return out

    def next_wakeup(self) -> float | None:
        return min((p.next_wakeup() for p in self.peers.values()), default=None)

    def path(self, node_key: Key) -> PathInfo | None:
        p = self.peers.get(node_key)
        return p.info() if p else None

    def pin(self, node_key: Key, mode: str | None, now: float) -> list[Action]:
        """Pin a peer's path (see :meth:`PeerPath.pin`); nothing if it is not a peer."""
        p = self.peers.get(node_key)
        return self._wire(p, p.pin(mode, now)) if p else []

    # ---- output -------------------------------------------------------------------
    def _wire(self, peer: PeerPath, outs: Iterable[_Out]) -> list[Action]:
        disco_key = self._disco_keys.get(peer.key)
        res: list[Action] = []
        for o in outs:
            if isinstance(o, DiscoOut):
                if disco_key is not None:
                    res.append(SendDisco(o.addr, self.disco.seal(disco_key, o.msg), o.sock))
            elif isinstance(o, RelayOut):
                if disco_key is not None:
                    res.append(SendViaRelay(peer.key, self.disco.seal(disco_key, o.msg)))
            elif isinstance(o, ObservedAddr):
                if (o.addr, o.sock) not in self._observed:
                    if len(self._observed) > 1024:
                        self._observed.clear()
                    self._observed.add((o.addr, o.sock))
                    res.append(o)
            else:
                res.append(o)
        return res
