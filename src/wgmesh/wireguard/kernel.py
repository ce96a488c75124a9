"""The in-kernel WireGuard data plane, configured over netlink with pyroute2.

Once a peer is configured, Python never touches its packets: the kernel
encrypts, routes and roams on its own. This module only speaks netlink:
rtnetlink (``IPRoute``) for the link, its addresses and routes, and the
``wireguard`` generic-netlink family for keys and peers, in a given network
namespace.

Why the peer messages are built here rather than by ``WireGuard.set``:
pyroute2 sends one peer per call, so a netmap of 500 peers would cost 500
round trips. :func:`peer_messages` packs the whole :class:`PeerDiff` into as
few ``WG_CMD_SET_DEVICE`` messages as fit :data:`MAX_MESSAGE_BYTES`, sending
only the attributes that changed (an endpoint move does not reinstall a
peer's allowed IPs). It is pure, so its output is unit-tested on a host
without the module.

The kernel's device dump carries the private key, and pyroute2 logs every
decoded reply at DEBUG. So dumps are read on a plain netlink socket and parsed
by :func:`parse_dump`, which skips the key's attribute, into
:class:`DeviceInfo`, which has no field for it; pyroute2's socket (for the
SET_DEVICE requests, whose error replies echo the request) decodes with a
message class that leaves the key an undecoded blob
(:func:`redacted_socket_class`); and netlink errors are re-raised as
:class:`BackendError` carrying only ``strerror``, never the request.

pyroute2's sync sockets run their own asyncio loop per thread and cannot be
used from inside a running loop, so every netlink call of a backend runs on
one private worker thread: the backend is safe to call from any thread,
including an asyncio loop thread.

The rest of the :class:`~wgmesh.wireguard.backend.Backend` contract: nftables
enforces the packet filter (:mod:`~wgmesh.wireguard.nftables`), and
:class:`KernelPort` shares the kernel's WireGuard port with traversal
(sharedsock for STUN/disco, the loopback relay bridge for relayed peers).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from wgmesh.keys import Key
from wgmesh.wireguard.backend import (
    Addr,
    BackendError,
    InterfaceConfig,
    IPInterface,
    IPNetwork,
    PeerConfig,
    PeerDiff,
    PeerStats,
    diff_peers,
    routes_for,
)
from wgmesh.wireguard.netns import netns_path, socket_in
from wgmesh.wireguard.nftables import NftFilter

if TYPE_CHECKING:
    import asyncio

    from wgmesh.netmap import FilterRule
    from wgmesh.traversal import TraversalConfig, _Relay
    from wgmesh.wireguard.proxy import RelayBridge

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RTPROT_WGMESH",
    "DeviceInfo",
    "KernelBackend",
    "KernelPort",
    "dump_request",
    "endpoint_diffs",
    "parse_dump",
    "peer_messages",
    "redacted_socket_class",
    "route_changes",
    "routes_for",
    "set_device_message",
]

log = logging.getLogger("wgmesh.kernel")

# WireGuard generic-netlink constants (include/uapi/linux/wireguard.h).
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4

#: Upper bound for one SET_DEVICE message. pyroute2's socket buffers are 1 MiB;
#: 64 KiB holds ~500 single-address peers and keeps each kernel-side lock short.
MAX_MESSAGE_BYTES = 65536
#: Allowed IPs per peer fragment; a peer with more is continued in further fragments.
ALLOWEDIPS_PER_FRAGMENT = 256
NETLINK_ROUTE, NETLINK_GENERIC = 0, 16
#: rtnetlink protocol tag on the routes wgmesh installs, so adoption finds exactly them.
RTPROT_WGMESH = 0x77

_ZERO_KEY = bytes(32)
T = TypeVar("T")


# ---- pure: peer diff -> netlink attribute lists -----------------------------------------
def _nla_size(payload: int) -> int:
    return 4 + ((payload + 3) & ~3)


def _allowed_ip(net: IPNetwork) -> tuple[dict[str, Any], int]:
    """One WGALLOWEDIP nest and its encoded size."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    packed = net.network_address.packed
    nest = {"attrs": [["WGALLOWEDIP_A_FAMILY", family], ["WGALLOWEDIP_A_IPADDR", packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}
    return nest, _nla_size(_nla_size(2) + _nla_size(len(packed)) + _nla_size(1))


@attrs.frozen
class _Fragment:
    """One peer's attributes inside WGDEVICE_A_PEERS, with its encoded size."""

    attrs: list[list[Any]]
    size: int


def _peer_fragments(old: PeerConfig | None, new: PeerConfig | None, key: Key) -> list[_Fragment]:
    """Attributes that turn ``old`` into ``new`` (``new is None``: remove the peer)."""
    head: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", key.b64()]]
    size = _nla_size(32) + _nla_size(4)
    if new is None:
        head.append(["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME])
        return [_Fragment(head, _nla_size(size))]
    flags = 0 if old is None else WGPEER_F_UPDATE_ONLY
    if new.endpoint is not None and (old is None or old.endpoint != new.endpoint):
        host, port = new.endpoint
        head.append(["WGPEER_A_ENDPOINT", {"addr": host, "port": port}])
        size += _nla_size(16 if ":" not in host else 28)
    if old is None or old.persistent_keepalive != new.persistent_keepalive:
        head.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", new.persistent_keepalive])
        size += _nla_size(2)
    old_psk = None if old is None else old.preshared_key
    if new.preshared_key != old_psk:
        # An all-zero key is how the kernel is told "no preshared key".
        head.append(["WGPEER_A_PRESHARED_KEY",
                     base64.b64encode(new.preshared_key or _ZERO_KEY).decode()])
        size += _nla_size(32)
    ips: tuple[IPNetwork, ...] = ()
    if old is None:
        ips = new.allowed_ips
    elif old.allowed_ips != new.allowed_ips:
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
        ips = new.allowed_ips
    chunks = [ips[i:i + ALLOWEDIPS_PER_FRAGMENT]
              for i in range(0, len(ips), ALLOWEDIPS_PER_FRAGMENT)] or [()]
    frags = []
    for n, chunk in enumerate(chunks):
        fattrs: list[list[Any]] = head if n == 0 else [["WGPEER_A_PUBLIC_KEY", key.b64()]]
        fflags = flags if n == 0 else WGPEER_F_UPDATE_ONLY  # later ones append
        fsize = size if n == 0 else _nla_size(32) + _nla_size(4)
        fattrs = [*fattrs, ["WGPEER_A_FLAGS", fflags]]
        if chunk:
            encoded = [_allowed_ip(net) for net in chunk]
            fattrs.append(["WGPEER_A_ALLOWEDIPS", [e[0] for e in encoded]])
            fsize += 4 + sum(e[1] for e in encoded)
        frags.append(_Fragment(fattrs, _nla_size(fsize)))
    return frags


def peer_messages(current: Mapping[Key, PeerConfig], diff: PeerDiff,
                  limit: int = MAX_MESSAGE_BYTES) -> list[list[list[Any]]]:
    """The ``WGDEVICE_A_PEERS`` payloads (one list of peer attribute sets per message)
    that apply ``diff`` to ``current``; removals first, so a re-keyed address is free."""
    frags: list[_Fragment] = []
    for key in diff.remove:
        frags += _peer_fragments(current.get(key), None, key)
    for p in diff.add:
        frags += _peer_fragments(None, p, p.public_key)
    for p in diff.update:
        frags += _peer_fragments(current[p.public_key], p, p.public_key)
    messages: list[list[list[Any]]] = []
    batch: list[list[Any]] = []
    used = 0
    budget = limit - 32  # netlink + genl headers, the ifindex and the WGDEVICE_A_PEERS nest
    for f in frags:
        if batch and used + f.size > budget:
            messages.append(batch)
            batch, used = [], 0
        batch.append({"attrs": f.attrs})  # type: ignore[arg-type]
        used += f.size
    if batch:
        messages.append(batch)
    return messages


def endpoint_diffs(current: Mapping[Key, PeerConfig], moves: Mapping[Key, Addr],
                   readd: Collection[Key] = ()) -> list[PeerDiff]:
    """The diffs that give each peer in ``moves`` its new endpoint, for :func:`peer_messages`:
    all of them in one diff of endpoint-only updates, so a netmap's worth of relayed peers
    costs a message per ~900 peers, not one each. A peer in ``readd`` is removed, then
    added back with its endpoint (a second diff): kernel WireGuard's only way to make a
    peer handshake at once. Peers no longer configured are left out."""
    update: list[PeerConfig] = []
    gone: list[Key] = []
    back: list[PeerConfig] = []
    for key, endpoint in moves.items():
        if (cur := current.get(key)) is None:
            continue
        new = attrs.evolve(cur, endpoint=endpoint)
        if key in readd:
            gone.append(key)
            back.append(new)
        elif new != cur:
            update.append(new)
    diffs = [PeerDiff((), tuple(update), tuple(gone)), PeerDiff(tuple(back), (), ())]
    return [d for d in diffs if d]


def route_changes(refs: Counter[IPNetwork], gone: Iterable[PeerConfig],
                  came: Iterable[PeerConfig], addresses: Iterable[IPInterface]
                  ) -> set[IPNetwork]:
    """Count peers ``gone`` out of and ``came`` into ``refs`` (routed prefix -> how many
    peers need it; updated in place) and return the prefixes whose count changed, the
    only ones whose route may need adding or deleting. A prefix two peers need (a subnet
    behind two routers) keeps its route while either does. Costs O(peers changed): at
    500 peers a full recount per endpoint move was most of a first netmap's apply."""
    addresses = tuple(addresses)
    delta: Counter[IPNetwork] = Counter()
    for p in gone:
        delta.subtract(routes_for([p], addresses))
    for p in came:
        delta.update(routes_for([p], addresses))
    for net, d in delta.items():
        if (n := refs[net] + d) > 0:
            refs[net] = n
        else:
            refs.pop(net, None)
    return {net for net, d in delta.items() if d}


@functools.cache
def redacted_socket_class() -> Any:
    """pyroute2's ``WireGuard`` socket, decoding replies with the private key left as an
    undecoded blob: pyroute2 logs every decoded reply at DEBUG, so a decoded key would
    reach any log handler. Requests are encoded by their own (stock) message class."""
    from pyroute2 import WireGuard
    from pyroute2.netlink.generic import AsyncGenericNetlinkSocket
    from pyroute2.netlink.generic.wireguard import WG_GENL_NAME, AsyncWireGuard, wgmsg

    class RedactedDump(wgmsg):
        _nlmsg_base__compiled_nla = False  # pyroute2 caches the parent's table otherwise
        nla_map = tuple((name, "none") if name == "WGDEVICE_A_PRIVATE_KEY" else (name, kind)
                        for name, kind in wgmsg.nla_map)

    class AsyncRedacted(AsyncWireGuard):
        async def setup_endpoint(self) -> None:
            if getattr(self.local, "transport", None) is not None:
                return
            await AsyncGenericNetlinkSocket.setup_endpoint(self)
            await self.bind(WG_GENL_NAME, RedactedDump)

    class RedactedWireGuard(WireGuard):
        async_class = AsyncRedacted
        dump_class = RedactedDump

    return RedactedWireGuard


def set_device_message(ifindex: int, device_attrs: list[list[Any]],
                       peers: list[Any] | None = None) -> Any:
    """A ``WG_CMD_SET_DEVICE`` message (pyroute2 ``wgmsg``, not yet encoded)."""
    from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, wgmsg

    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFINDEX", ifindex])
    msg["attrs"].extend(device_attrs)
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    return msg


# ---- pure: device dump -> typed info ------------------------------------------------------
@attrs.frozen
class DeviceInfo:
    """A WireGuard device as the kernel reports it, minus the private key."""

    ifindex: int
    ifname: str
    public_key: Key | None
    listen_port: int
    fwmark: int
    peers: dict[Key, PeerStats] = attrs.field(factory=dict)


# ---- pure: the stats dump, read straight from the netlink bytes ---------------------------
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
WG_CMD_GET_DEVICE = 0
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLA = struct.Struct("=HH")
_GENL_HEADER = 4
_NLA_TYPE = 0x3FFF  # without the nested and byte-order flags
# wireguard.h attribute numbers
_DEV_IFINDEX, _DEV_IFNAME, _DEV_PUBLIC_KEY, _DEV_LISTEN_PORT, _DEV_FWMARK, _DEV_PEERS = (
    1, 2, 4, 6, 7, 8)
_PEER_PUBLIC_KEY, _PEER_ENDPOINT, _PEER_KEEPALIVE, _PEER_HANDSHAKE = 1, 4, 5, 6
_PEER_RX, _PEER_TX, _PEER_ALLOWEDIPS = 7, 8, 9
_IP_FAMILY, _IP_ADDR, _IP_CIDR = 1, 2, 3


def dump_request(family: int, ifindex: int, seq: int) -> bytes:
    """A ``WG_CMD_GET_DEVICE`` dump request for ``ifindex`` (``family``: the generic
    netlink id of ``wireguard``)."""
    body = struct.pack("=BBH", WG_CMD_GET_DEVICE, 1, 0) + _NLA.pack(8, _DEV_IFINDEX) \
        + struct.pack("=I", ifindex)
    return _NLMSG.pack(_NLMSG.size + len(body), family, NLM_F_REQUEST | NLM_F_DUMP, seq,
                       0) + body


def _nlas(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``buf[start:end]``; a
    malformed one ends the walk."""
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(buf, start)
        if length < _NLA.size or start + length > end:
            return
        yield kind & _NLA_TYPE, start + _NLA.size, start + length
        start += (length + 3) & ~3


def _messages(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(offset, length, type, sequence) of each netlink message in one ``recv``; a
    malformed header ends the walk (nothing after it can be trusted)."""
    pos = 0
    while pos + _NLMSG.size <= len(buf):
        length, kind, _flags, mseq, _pid = _NLMSG.unpack_from(buf, pos)
        if length < _NLMSG.size or pos + length > len(buf):
            return
        yield pos, length, kind, mseq
        pos += (length + 3) & ~3


def _dump_messages(replies: Iterable[bytes], seq: int) -> Iterator[tuple[bytes, int, int]]:
    """(buffer, attributes start, end) of each GET_DEVICE part answering ``seq``; stops at
    NLMSG_DONE, raises :class:`BackendError` on an NLMSG_ERROR."""
    for buf in replies:
        for pos, length, kind, mseq in _messages(buf):
            if mseq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                code = (struct.unpack_from("=i", buf, pos + _NLMSG.size)[0]
                        if length >= _NLMSG.size + 4 else -errno.EIO)
                raise BackendError(f"netlink: {os.strerror(-code)} (in the stats dump)")
            yield buf, pos + _NLMSG.size + _GENL_HEADER, pos + length


def dump_done(buf: bytes, seq: int) -> bool:
    """Whether ``buf`` (one ``recv``) ends the dump ``seq``: NLMSG_DONE, an error, or a
    malformed message (nothing more to wait for)."""
    end = 0
    for pos, length, kind, mseq in _messages(buf):
        if mseq == seq and kind in (NLMSG_DONE, NLMSG_ERROR):
            return True
        end = pos + ((length + 3) & ~3)
    return end + _NLMSG.size <= len(buf)


def _sockaddr(buf: bytes, start: int, end: int) -> tuple[str, int] | None:
    if end - start < 8:
        return None
    family, port = struct.unpack_from("=H", buf, start)[0], \
        struct.unpack_from("!H", buf, start + 2)[0]
    if family == socket.AF_INET:
        addr = socket.inet_ntop(family, buf[start + 4:start + 8])
    elif family == socket.AF_INET6 and end - start >= 24:
        addr = socket.inet_ntop(family, buf[start + 8:start + 24])
    else:
        return None
    return None if not port or addr in ("0.0.0.0", "::") else (addr, port)


def parse_dump(replies: Iterable[bytes], seq: int) -> DeviceInfo:
    """A GET_DEVICE dump (the raw bytes of each ``recv``, in order) as one
    :class:`DeviceInfo`, parsed with ``struct`` rather than pyroute2's generic decoder: a
    second-by-second read of 500 peers was most of an agent's CPU in the VM, competing
    with its loop for the GIL. The kernel splits big devices across messages, repeating
    a peer whose allowed IPs did not fit; those are merged. The private key's attribute
    is never read."""
    head: dict[int, Any] = {}
    peers: dict[bytes, dict[str, Any]] = {}
    u16, u32, u64 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q")
    for buf, start, end in _dump_messages(replies, seq):
        for kind, a, b in _nlas(buf, start, end):
            if kind in (_DEV_IFINDEX, _DEV_FWMARK):
                head.setdefault(kind, u32.unpack_from(buf, a)[0])
            elif kind == _DEV_LISTEN_PORT:
                head.setdefault(kind, u16.unpack_from(buf, a)[0])
            elif kind == _DEV_IFNAME:
                head.setdefault(kind, buf[a:b].split(b"\0", 1)[0].decode(errors="replace"))
            elif kind == _DEV_PUBLIC_KEY:
                head.setdefault(kind, bytes(buf[a:b]))
            elif kind == _DEV_PEERS:
                for _i, pa, pb in _nlas(buf, a, b):
                    _parse_peer(buf, pa, pb, peers, u16, u64)
    pub = head.get(_DEV_PUBLIC_KEY)
    stats = {}
    for raw, e in peers.items():
        key = Key.from_raw(raw)
        stats[key] = PeerStats(public_key=key, endpoint=e.get("endpoint"),
                               last_handshake=e.get("handshake"), rx_bytes=e.get("rx", 0),
                               tx_bytes=e.get("tx", 0), allowed_ips=tuple(e["ips"]),
                               persistent_keepalive=e.get("keepalive", 0))
    return DeviceInfo(ifindex=head.get(_DEV_IFINDEX, 0), ifname=head.get(_DEV_IFNAME, ""),
                      public_key=Key.from_raw(pub) if pub and pub != _ZERO_KEY else None,
                      listen_port=head.get(_DEV_LISTEN_PORT, 0),
                      fwmark=head.get(_DEV_FWMARK, 0), peers=stats)


@functools.lru_cache(maxsize=1 << 14)
def _network(packed: bytes, prefixlen: int) -> IPNetwork:
    """Cached: the same allowed IPs come back in every stats read, and building the
    ``ipaddress`` objects was most of a read."""
    return ipaddress.ip_network((ipaddress.ip_address(packed), prefixlen), strict=False)


def _parse_peer(buf: bytes, start: int, end: int, peers: dict[bytes, dict[str, Any]],
                u16: struct.Struct, u64: struct.Struct) -> None:
    attrs_ = {kind: (a, b) for kind, a, b in _nlas(buf, start, end)}
    if (k := attrs_.get(_PEER_PUBLIC_KEY)) is None or k[1] - k[0] != 32:
        return
    entry = peers.setdefault(bytes(buf[k[0]:k[1]]), {"ips": []})
    if (ips := attrs_.get(_PEER_ALLOWEDIPS)) is not None:
        for _i, ia, ib in _nlas(buf, *ips):
            ip = {kind: (a, b) for kind, a, b in _nlas(buf, ia, ib)}
            if _IP_ADDR in ip and _IP_CIDR in ip:
                a, b = ip[_IP_ADDR]
                with contextlib.suppress(ValueError):
                    entry["ips"].append(_network(bytes(buf[a:b]), buf[ip[_IP_CIDR][0]]))
    if "rx" in entry:
        return  # a continuation: only more allowed IPs
    hs = attrs_.get(_PEER_HANDSHAKE)
    secs = 0.0
    if hs is not None and hs[1] - hs[0] >= 16:
        sec, nsec = struct.unpack_from("=qq", buf, hs[0])
        secs = sec + nsec / 1e9
    ep = attrs_.get(_PEER_ENDPOINT)
    entry.update(
        endpoint=_sockaddr(buf, *ep) if ep is not None else None,
        handshake=secs or None,
        rx=u64.unpack_from(buf, attrs_[_PEER_RX][0])[0] if _PEER_RX in attrs_ else 0,
        tx=u64.unpack_from(buf, attrs_[_PEER_TX][0])[0] if _PEER_TX in attrs_ else 0,
        keepalive=u16.unpack_from(buf, attrs_[_PEER_KEEPALIVE][0])[0]
        if _PEER_KEEPALIVE in attrs_ else 0)


def _config_from_stats(s: PeerStats) -> PeerConfig:
    return PeerConfig(public_key=s.public_key, allowed_ips=s.allowed_ips, endpoint=s.endpoint,
                      persistent_keepalive=s.persistent_keepalive)


# ---- the backend --------------------------------------------------------------------------
class KernelBackend:
    """One in-kernel WireGuard interface in ``netns`` (``None``: this namespace)."""

    kind = "kernel"
    #: A fresh peer entry handshakes at once on its endpoint (what :class:`KernelPort`
    #: relies on to prove a direct path), and NAT mappings stay open.
    keepalive = 25

    def __init__(self, name: str = "wg0", *, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wgmesh-nl-{name}")
        # Stats dumps get a thread and socket of their own: a 500-peer dump takes seconds
        # under emulation, and a peer change queued behind it held the node's loop as long.
        self._reader = ThreadPoolExecutor(max_workers=1,
                                          thread_name_prefix=f"wgmesh-nlstats-{name}")
        self._open_worker = True
        self._ipr: Any = None
        self._wg: Any = None
        self._stats_sock: socket.socket | None = None
        self._stats_seq = 0
        self._ifindex = 0
        self._listen_port = 0
        self._addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
        self._peers: dict[Key, PeerConfig] = {}
        self._routes: set[IPNetwork] = set()
        self._route_refs: Counter[IPNetwork] = Counter()  # prefix -> peers that need it
        self._filter = NftFilter(name, netns=netns)
        self.messages_sent = 0  # WG_CMD_SET_DEVICE messages, for the bulk-path tests

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"<KernelBackend {self.name}{where}: {len(self._peers)} peers>"

    # -- plumbing
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._submit(fn, *args).result()

    def _submit(self, fn: Callable[..., T], *args: Any,
                worker: ThreadPoolExecutor | None = None) -> Future[T]:
        """Queue ``fn`` on the netlink worker (one at a time, in order), not waiting."""
        if not self._open_worker:
            raise BackendError(f"{self.name}: backend is down")
        return (worker or self._worker).submit(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args)
        except NetlinkError as e:
            # Only the code: the request (with key material) must not ride along.
            raise BackendError(f"{self.name}: netlink: {os.strerror(e.code)} "
                               f"(in {fn.__name__})") from None

    def _open(self) -> None:
        if self._ipr is not None:
            return
        if self.netns is not None and not os.path.exists(netns_path(self.netns)):
            raise BackendError(f"network namespace {self.netns!r} does not exist")
        from pyroute2 import IPRoute

        # pyroute2's own netns support forks a child per socket, which can hang for good
        # in a process that already runs threads (an asyncio loop, the bridge); a socket
        # made in the namespace by a short-lived thread, handed over by fd, cannot.
        rt = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        self._ipr = IPRoute(fileno=rt.detach(), groups=0)
        try:
            self._wg = self._wireguard_socket()
        except BackendError:
            self._ipr.close()
            self._ipr = None
            raise

    def _wireguard_socket(self) -> Any:
        gn = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_GENERIC)
        try:
            return redacted_socket_class()(fileno=gn.detach())
        except Exception as e:
            raise BackendError("the kernel has no 'wireguard' generic netlink family "
                               f"(module not loaded or not built): {e}") from None

    def _close(self) -> None:
        for s in (self._wg, self._ipr):
            if s is not None:
                with contextlib.suppress(Exception):
                    s.close()
        self._wg = self._ipr = None

    def _set_device(self, device_attrs: list[list[Any]], peers: list[Any] | None = None) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        msg = set_device_message(self._ifindex, device_attrs, peers)
        try:
            tuple(self._wg.nlm_request(msg, msg_type=self._wg.prid,
                                       msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        finally:
            if isinstance(msg.data, bytearray):
                msg.data[:] = bytes(len(msg.data))  # the private key may be in there
        self.messages_sent += 1

    def _read_dump(self) -> DeviceInfo:
        """A dump on the stats thread's own plain netlink socket (opened there, on first
        use), parsed by :func:`parse_dump`."""
        if self._stats_sock is None:
            sock = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_DGRAM,
                             NETLINK_GENERIC)
            sock.bind((0, 0))
            sock.settimeout(10.0)  # a kernel that never answers must not wedge the reads
            self._stats_sock = sock
        sock = self._stats_sock
        if self._wg is None:
            raise BackendError(f"{self.name}: the interface is not up")
        self._stats_seq = seq = (self._stats_seq + 1) & 0xFFFFFFFF
        try:
            sock.send(dump_request(self._wg.prid, self._ifindex, seq))
            replies = [sock.recv(1 << 16)]
            while not dump_done(replies[-1], seq):
                replies.append(sock.recv(1 << 16))
        except OSError as e:
            raise BackendError(f"{self.name}: the stats dump failed: "
                               f"{e.strerror or type(e).__name__}") from None
        return parse_dump(replies, seq)

    def _close_reader(self) -> None:
        if self._stats_sock is not None:
            self._stats_sock.close()
            self._stats_sock = None

    # -- life cycle
    def up(self, config: InterfaceConfig) -> None:
        """Create the interface, or adopt an existing WireGuard one with this name
        (its peers become the current state the next diff starts from)."""
        if config.name != self.name:
            raise BackendError(f"config is for {config.name!r}, backend drives {self.name!r}")
        self._call(self._up, config)
        log.info("%s: kernel wireguard up, port %d, %d peer(s) adopted", self.name,
                 self._listen_port, len(self._peers))

    def _up(self, config: InterfaceConfig) -> None:
        self._open()
        ipr = self._ipr
        found = ipr.link_lookup(ifname=self.name)
        if found:
            link = ipr.get_links(found[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind != "wireguard":
                raise BackendError(f"{self.name} exists and is a {kind or 'plain'} link, "
                                   "not wireguard")
            self._ifindex = found[0]
        else:
            try:
                ipr.link("add", ifname=self.name, kind="wireguard")
            except Exception as e:
                code = getattr(e, "code", None)
                why = os.strerror(code) if code else type(e).__name__
                if code in (errno.EOPNOTSUPP, errno.ENODEV):
                    why += " (no wireguard module in this kernel)"
                raise BackendError(f"cannot create wireguard link {self.name}: {why}") from None
            self._ifindex = ipr.link_lookup(ifname=self.name)[0]
        self._set_device([["WGDEVICE_A_PRIVATE_KEY", config.private_key.b64()],
                          ["WGDEVICE_A_LISTEN_PORT", config.listen_port],
                          ["WGDEVICE_A_FWMARK", config.fwmark]])
        self._sync_addresses(config.addresses)
        ipr.link("set", index=self._ifindex, mtu=config.mtu, state="up")
        dev = self.info()
        self._listen_port = dev.listen_port
        self._peers = {k: _config_from_stats(s) for k, s in dev.peers.items()}
        self._routes = self._installed_routes()
        self._route_refs = Counter()
        route_changes(self._route_refs, (), self._peers.values(), self._addresses)
        self._reconcile_routes(self._routes | set(self._route_refs))

    def set_mtu(self, mtu: int) -> None:
        self._call(lambda: self._ipr.link("set", index=self._ifindex, mtu=mtu))

    def down(self) -> None:
        """Delete the interface (its routes and addresses go with it), then its filter."""
        def _down() -> None:
            if self._ipr is not None and self._ifindex:
                with contextlib.suppress(Exception):
                    self._ipr.link("del", index=self._ifindex)
            self._close()
            self._ifindex = 0
        if self._open_worker:
            self._stop_reader()
            self._call(_down)
            self._worker.shutdown()
            self._open_worker = False
        self._peers.clear()
        self._routes.clear()
        try:
            self._filter.remove()
        except BackendError as e:  # the interface is gone: the table matches nothing now
            log.warning("%s", e)

    def close(self) -> None:
        """Let go of the netlink sockets but leave the interface (and its filter) running,
        so a restarted agent can adopt it without dropping a single tunnel packet."""
        if self._open_worker:
            self._stop_reader()
            self._call(self._close)
            self._worker.shutdown()
            self._open_worker = False

    def _stop_reader(self) -> None:
        self._submit(self._close_reader, worker=self._reader).result()
        self._reader.shutdown()

    def __enter__(self) -> KernelBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def ifindex(self) -> int:
        return self._ifindex

    @property
    def traversal(self) -> TraversalConfig:
        from wgmesh.traversal import TraversalConfig

        return TraversalConfig.kernel()

    def set_filter(self, rules: Sequence[FilterRule]) -> None:
        """Enforce ``rules`` with an nftables table on the interface (it may not exist yet:
        the table matches the name). Raises :class:`BackendError` if ``nft`` fails."""
        self._filter.install(rules)

    def open_port(self, loop: asyncio.AbstractEventLoop) -> KernelPort:
        return KernelPort(self, loop)

    @property
    def listen_port(self) -> int:
        return self._listen_port

    # -- addresses and routes
    def _sync_addresses(self, want: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
                        ) -> None:
        have = set()
        for a in self._ipr.get_addr(index=self._ifindex):
            have.add(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
        for a in set(want) - have:
            self._ipr.addr("add", index=self._ifindex, address=str(a.ip),
                           prefixlen=a.network.prefixlen)
        for a in have - set(want):
            if a.version == 6 and a.ip.is_link_local:
                continue
            self._ipr.addr("del", index=self._ifindex, address=str(a.ip),
                           prefixlen=a.network.prefixlen)
        self._addresses = tuple(want)

    def _installed_routes(self) -> set[IPNetwork]:
        found: set[IPNetwork] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self._ipr.get_routes(family=family, oif=self._ifindex):
                if r["proto"] == RTPROT_WGMESH:
                    found.add(ipaddress.ip_network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"))
        return found

    def _reconcile_routes(self, nets: Iterable[IPNetwork]) -> None:
        """Install or delete the routes of ``nets`` so they match ``_route_refs``."""
        for net in sorted(nets, key=str):
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            if self._route_refs[net] > 0 and net not in self._routes:
                self._ipr.route("replace", dst=str(net), oif=self._ifindex,
                                proto=RTPROT_WGMESH, family=family)
                self._routes.add(net)
            elif self._route_refs[net] <= 0 and net in self._routes:
                with contextlib.suppress(Exception):
                    self._ipr.route("del", dst=str(net), oif=self._ifindex,
                                    proto=RTPROT_WGMESH, family=family)
                self._routes.discard(net)

    @property
    def routes(self) -> frozenset[IPNetwork]:
        """Prefixes routed into the interface by this backend."""
        return frozenset(self._routes)

    # -- peers
    def set_peers(self, desired: Sequence[PeerConfig]) -> PeerDiff:
        diff = self._call(self._set_peers, desired)
        if diff:
            log.debug("%s: peers +%d ~%d -%d", self.name, len(diff.add), len(diff.update),
                      len(diff.remove))
        return diff

    def _set_peers(self, desired: Sequence[PeerConfig]) -> PeerDiff:
        # Diffed on the worker: the peer state is only ever read and written there.
        diff = diff_peers(self._peers, desired)
        if diff:
            self._apply(diff)
        return diff

    def _apply(self, diff: PeerDiff) -> None:
        for batch in peer_messages(self._peers, diff):
            self._set_device([], batch)
        gone = [self._peers[k] for k in diff.remove if k in self._peers]
        came = list(diff.add)
        for p in diff.update:
            if (old := self._peers[p.public_key]).allowed_ips != p.allowed_ips:
                gone.append(old)
                came.append(p)
        for key in diff.remove:
            self._peers.pop(key, None)
        for p in (*diff.add, *diff.update):
            self._peers[p.public_key] = p
        if gone or came:
            self._reconcile_routes(route_changes(self._route_refs, gone, came,
                                                 self._addresses))

    def set_endpoint(self, key: Key, endpoint: tuple[str, int]) -> None:
        if key not in self._peers:
            raise BackendError(f"no peer {key.short()} on {self.name}")
        self._call(self._move, {key: endpoint}, ())

    def _move(self, moves: Mapping[Key, Addr], readd: Collection[Key]) -> None:
        """On the worker: new endpoints for ``moves``, re-adding the peers in ``readd``."""
        for diff in endpoint_diffs(self._peers, moves, readd):
            self._apply(diff)

    def peers(self) -> dict[Key, PeerConfig]:
        """The peer state the next diff starts from."""
        return dict(self._peers)

    def info(self) -> DeviceInfo:
        """The device as the kernel sees it now (never the private key)."""
        return self._submit(self._read_dump, worker=self._reader).result()

    def stats(self) -> dict[Key, PeerStats]:
        return self.info().peers


# ---- the port traversal drives -------------------------------------------------------------
class KernelPort:
    """Kernel WireGuard: STUN/disco through sharedsock on its port, relayed peers through
    loopback endpoints of the relay bridge. Python never sees a direct-path packet.

    Endpoint moves are collected over one turn of the loop and carried out together on
    the backend's netlink worker: a first netmap of 500 peers sends every one of them
    to the relay, and done one by one on the loop (a bridge socket and a netlink
    message each) that held the loop 53 s under the kernel tier's emulation, long
    enough for the peers' traversal to give up on this node's paths."""

    def __init__(self, backend: KernelBackend, loop: asyncio.AbstractEventLoop) -> None:
        from wgmesh.wireguard.sharedsock import SharedSocket

        self.backend = backend
        self.loop = loop
        self.shared = SharedSocket.for_backend(backend)
        self.bridge: RelayBridge | None = None
        self._moves: dict[Key, Addr | None] = {}  # None: to the relay
        self._readd: set[Key] = set()

    def _bridge(self) -> RelayBridge:
        if self.bridge is None:
            raise BackendError(f"{self.backend.name}: the port is not started")
        return self.bridge

    def start(self, on_datagram: Callable[[bytes, Addr], None],
              on_wireguard_for_relay: Callable[[Key, bytes], None]) -> None:
        from wgmesh.wireguard.proxy import RelayBridge

        self.shared.add_reader(self.loop, on_datagram)
        self.bridge = RelayBridge(self.loop, on_wireguard_for_relay, self.backend.listen_port,
                                  netns=self.backend.netns)

    def send(self, data: bytes, addr: Addr) -> None:
        self.shared.send(data, addr)

    def use_relay(self, key: Key) -> None:
        self._bridge()
        self._queue(key, None)

    def use_direct(self, key: Key, addr: Addr, handshake: bool = False) -> None:
        # Not bridge.use_direct: relayed packets must keep flowing until traversal trusts
        # the direct path (RelayIngress), which the data plane enforces.
        self._queue(key, addr)
        if handshake:
            # A fresh peer entry has no session, and its persistent keepalive makes the
            # kernel handshake at once, on the new endpoint: the proof traversal waits for.
            log.debug("%s: re-adding peer %s to handshake on %s (its session and counters "
                      "start over)", self.backend.name, key.short(), addr)
            self._readd.add(key)

    def _queue(self, key: Key, addr: Addr | None) -> None:
        """The latest move per peer wins; a re-add asked for stays asked for while the
        peer stays direct."""
        if not self._moves:
            self.loop.call_soon(self._flush)
        self._moves[key] = addr
        if addr is None:
            self._readd.discard(key)

    def _flush(self) -> None:
        if not self._moves:  # the port closed meanwhile
            return
        moves, readd = self._moves, self._readd
        self._moves, self._readd = {}, set()
        try:
            done = self.backend._submit(self._move, moves, readd)
        except BackendError as e:  # the backend went down meanwhile
            log.warning("%s: %d endpoint move(s) not made: %s", self.backend.name,
                        len(moves), e)
            return
        done.add_done_callback(functools.partial(_report_moves, self.backend.name, len(moves)))

    def _move(self, moves: Mapping[Key, Addr | None], readd: Collection[Key]) -> None:
        """On the backend's worker: bridge endpoints for the relayed peers (their sockets
        made in one go), then every new endpoint in as few netlink messages as fit."""
        relayed = self._bridge().add_many([k for k, a in moves.items() if a is None])
        self.backend._move({k: relayed[k] if a is None else a for k, a in moves.items()},
                           readd)

    def use_socket(self, key: Key, send: Callable[[bytes], None]) -> None:
        raise BackendError("kernel WireGuard sends from its own port only "
                           "(its traversal profile opens no extra sockets)")

    def inject(self, key: Key, data: bytes) -> None:
        self._bridge().deliver(key, data)

    def seen_endpoint(self, endpoint: Addr | None, path: str) -> Addr | _Relay | None:
        from wgmesh.traversal import RELAY

        if endpoint is not None and endpoint[0] in ("127.0.0.1", "::1"):
            return RELAY  # a loopback endpoint is the bridge: the peer goes via the relay
        return endpoint

    def close(self) -> None:
        self._moves.clear()
        self.shared.remove_reader(self.loop)
        self.shared.close()
        if self.bridge is not None:
            self.bridge.close()


def _report_moves(name: str, count: int, done: Future[None]) -> None:
    """Log a batch of endpoint moves that failed (on the worker; nobody waits for it)."""
    if (e := done.exception()) is not None:
        log.warning("%s: %d endpoint move(s) failed: %s", name, count, e)
