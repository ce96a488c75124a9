"""Node: join a mesh. Control client + WireGuard backend + relay + traversal, in one object.

:class:`AsyncNode` is the asyncio API; :class:`Node` is the same API, synchronous
and thread-safe, running an AsyncNode on a private loop thread so it works in
scripts and inside Jupyter (where a loop already runs on the main thread)::

    node = wgmesh.Node("https://control:8420", authkey="wgk_...", state_dir="/var/lib/wgmesh")
    node.up()
    print(node.status())
    node.ping("laptop")
    node.down()

Start-up follows the design: keys (0600, made here) -> register (public keys
only) -> backend -> home relay -> STUN from the WireGuard port -> publish
endpoints -> netmap. Each peer starts on the relay path, so it is reachable
within a second, and traversal upgrades it to direct when the NATs allow.
With a cached netmap the node comes up even while control is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from wgmesh import netmap as nm
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.loopthread import LoopThread
from wgmesh.node.events import Event, EventBus
from wgmesh.node.lifecycle import KeyExpiryWatch, self_state
from wgmesh.node.meshlock import NodeLock
from wgmesh.node.names import MeshNames
from wgmesh.node.routes import FWMARK, Routing
from wgmesh.node.state import LatestSaver, StateDir
from wgmesh.node.status import (
    PeerStatus,
    PingResult,
    Status,
    path_mtu_json,
    path_reason,
    tried_json,
)
from wgmesh.wireguard.backend import DEFAULT_MTU
from wgmesh.wireguard.netns import enter as enter_netns

if TYPE_CHECKING:
    from wgmesh.control.client import ControlClient
    from wgmesh.control.envelope import ControlKey
    from wgmesh.drop.inbox import Inbox
    from wgmesh.drop.sender import SendResult
    from wgmesh.drop.server import PeerAPIServer
    from wgmesh.node.dataplane import DataPlane, PeerPathStatus
    from wgmesh.node.netcheck import NetcheckReport
    from wgmesh.node.portmapper import PortMapper
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.traversal import Candidates
    from wgmesh.wireguard.backend import Backend

log = logging.getLogger("wgmesh.node.api")

__all__ = ["AsyncNode", "Node"]

DEFAULT_IFNAME = "wgmesh0"
#: Own endpoints are measured again this often, and on demand.
ENDPOINT_REFRESH_S = 30.0
#: How often the host's addresses are compared with the last seen (a cheap ioctl): a roam
#: is noticed within this, not at the next refresh.
ADDRESS_POLL_S = 1.0


_TUNNEL_NETS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fc00::/7"))


def _lan_candidate(ip: str) -> bool:
    """An interface address worth offering peers: not loopback, link-local or a tunnel's."""
    a = ipaddress.ip_address(ip)
    return not (a.is_loopback or a.is_link_local or any(a in n for n in _TUNNEL_NETS))


class AsyncNode:
    """One mesh node (asyncio). Use :class:`Node` from synchronous code."""

    def __init__(self, control_url: str, *, authkey: str | None = None,
                 state_dir: str | os.PathLike[str] = "/var/lib/wgmesh",
                 backend: str = "auto", hostname: str | None = None,
                 ifname: str = DEFAULT_IFNAME, listen_port: int = 0,
                 events: EventBus | None = None, control_key: str | None = None,
                 control_ca: str | None = None, advertise_routes: Sequence[str] = (),
                 accept_routes: bool = False, snat_subnet_routes: bool = True,
                 advertise_exit_node: bool = False, exit_node: str | None = None,
                 exit_node_allow_lan_access: bool = False, mtu: int = DEFAULT_MTU,
                 dns: bool = True, dns_resolv_conf: str | os.PathLike[str] | None = None,
                 dns_hosts_file: str | os.PathLike[str] | None = None) -> None:
        from wgmesh.control.client import check_control_url

        check_control_url(control_url)
        self.control_url = control_url
        self.authkey, self._control_key = _control_trust(authkey, control_key)
        self.control_ca = control_ca
        #: The last thing from control that failed verification (None: nothing yet).
        self.control_rejected: str | None = None
        self.state = StateDir(state_dir)
        self._netmap_saver = LatestSaver(self.state.save_netmap, "netmap cache")
        self.backend_kind = backend
        self.hostname = hostname or socket.gethostname()
        self.ifname = ifname
        self.listen_port = listen_port
        self.mtu = mtu
        #: Subnet routes and exit node (wgmesh.node.routes).
        self.routing = Routing(self.state.path, ifname, advertise_routes=advertise_routes,
                               accept_routes=accept_routes, snat=snat_subnet_routes,
                               advertise_exit_node=advertise_exit_node, exit_node=exit_node,
                               allow_lan_access=exit_node_allow_lan_access)
        #: Mesh DNS: responder on the tunnel address and system hooks (wgmesh.node.names).
        self.names = MeshNames(self.state.path, ifname, resolv_conf=dns_resolv_conf,
                               hosts_file=dns_hosts_file)
        self.dns_enabled = dns
        self.events = events or EventBus()
        self.netmap: nm.Netmap | None = None
        self.identity: nm.NodeInfo | None = None
        self.backend: Backend | None = None
        self.backend_reason = ""
        self.relay: RelayClient | None = None
        self.dataplane: DataPlane | None = None
        self.peer_api: PeerAPIServer | None = None
        self._filter_applied: tuple[nm.FilterRule, ...] | None = None
        self.candidates: Candidates | None = None
        self.portmapper: PortMapper | None = None
        self.hard_nat = False
        self.last_netcheck: NetcheckReport | None = None
        self.control_online = False
        self._control: ControlClient | None = None
        self._refresh = asyncio.Event()
        self._endpoints_out: list[nm.Endpoint] = []  # the latest, for the publisher
        self._endpoints_due = asyncio.Event()
        self._stop = threading.Event()
        self._follow_thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._up = False
        self._peer_keys: dict[int, Key] = {}
        self.expiry_watch = KeyExpiryWatch(self._emit)
        self.lock = NodeLock(self.state)  #: mesh lock: which peers may go into WireGuard
        self._lock_task: asyncio.Task[None] | None = None

    # ---- life cycle ----------------------------------------------------------------
    async def __aenter__(self) -> AsyncNode:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def up(self) -> Status:
        """Register, configure WireGuard, connect the relay, start traversal.

        Returns the status once the interface is up; peers come up behind it (on the
        relay first). Raises :class:`~wgmesh.errors.WgmeshError` if control cannot be
        reached and there is no cached netmap, or the data plane cannot start."""
        if self._up:
            return await self.status()
        from wgmesh.control.client import ControlClient
        from wgmesh.control.envelope import ControlTrustError
        from wgmesh.wireguard.select import open_backend

        # Choose the data plane first: "no root" or "no TUN" should not cost a registration.
        self.backend, self.backend_reason = open_backend(self.backend_kind, self.ifname)
        node_key, disco_key = self.state.node_key, self.state.disco_key
        token = self.state.load_secret("node.token")
        pinned = self._control_key or self.state.load_control_key(self.control_url)
        self._control = ControlClient(self.control_url, node_token=token, node_key=node_key,
                                      control_key=pinned, ca=self.control_ca)
        try:
            await self._register(node_key, disco_key, token)
            self.control_online = True
            self._pin_control_key(pinned, had_token=token is not None)
        except ControlTrustError:
            raise  # a control service that cannot prove its key is not one to fall back from
        except WgmeshError as e:
            cached = self.state.load_netmap()
            if cached is None or token is None:
                raise
            log.warning("control unreachable (%s); starting from the cached netmap", e)
            self.netmap = cached
        assert self.netmap is not None or self.identity is not None
        try:
            await self._start_dataplane()
        except BaseException:
            await self.down()
            raise
        self._up = True
        if self.netmap is not None:
            self._apply_netmap(self.netmap, live=self.control_online)
        self._follow_thread = threading.Thread(target=self._follow, name="wgmesh-netmap",
                                               args=(asyncio.get_running_loop(),), daemon=True)
        self._follow_thread.start()
        return await self.status()

    async def _register(self, node_key: PrivateKey, disco_key: PrivateKey,
                        token: str | None) -> None:
        from wgmesh.control.errors import ControlAPIError

        try:
            await self._register_once(node_key, disco_key, token)
        except ControlAPIError as e:
            # Our token no longer works (node deleted or expired): with an auth key, join
            # again under the same node key; without one, say so.
            if e.status not in (401, 403) or token is None or not self.authkey:
                raise
            log.warning("control rejected the stored token (%s); registering again", e)
            await self._register_once(node_key, disco_key, None)

    async def _register_once(self, node_key: PrivateKey, disco_key: PrivateKey,
                             token: str | None) -> None:
        control = self._control
        assert control is not None
        ident = self.state.load_identity()
        if token is None or ident is None or ident.get("control_url") != self.control_url:
            if not self.authkey:
                raise WgmeshError("this node is not registered yet: pass an auth key")
            await self._register_with(control, self.authkey)
        else:
            self.identity = nm.NodeInfo.from_json(ident["node"])
        # The first netmap message is the full map: take it before going on.
        first = await asyncio.to_thread(self._first_netmap)
        self.netmap = first
        self.identity = first.self_node
        self.state.save_netmap(first)

    async def _register_with(self, control: ControlClient, authkey: str) -> nm.NodeInfo:
        """Register this node's keys under ``authkey``; keep the new token and identity."""
        reg = await asyncio.to_thread(control.register, self.state.node_key,
                                      self.state.disco_key.public, self.hostname, authkey)
        self.state.save_secret("node.token", reg.node_token)
        self.identity = reg.node
        self.state.save_identity({"control_url": self.control_url,
                                  "node": nm.to_json(reg.node)})
        return reg.node

    async def reauthenticate(self, authkey: str | None = None) -> nm.NodeInfo:
        """Renew this node's key lifetime (on ``key_expiring``, or once expired): register
        again, same keys, with ``authkey`` (default: the one it came up with). The netmap
        stream carries on; its next reconnect uses the new token."""
        key = authkey or self.authkey
        if self._control is None or not key:
            raise WgmeshError("re-authenticating needs a node that is up and an auth key")
        return await self._register_with(self._control, key)

    def _first_netmap(self) -> nm.Netmap:
        assert self._control is not None
        stream = self._control.stream()
        try:
            for msg in stream:
                if isinstance(msg, nm.Netmap):
                    return msg
        finally:
            stream.close()  # the follower opens its own stream, resuming from this seq
        raise WgmeshError("control closed the netmap stream before sending a map")

    async def _start_dataplane(self) -> None:
        from wgmesh.node.dataplane import DataPlane
        from wgmesh.relaynet.client import RelayClient
        from wgmesh.traversal import Candidates, Traversal
        from wgmesh.wireguard.backend import InterfaceConfig

        backend = self.backend
        assert self.netmap is not None and backend is not None
        me = self.netmap.self_node
        log.info("backend %s: %s", backend.kind, self.backend_reason)
        # The filter goes in before the interface and its first peer, so no packet from a
        # peer is ever let in unfiltered; if it cannot be enforced, the node does not start.
        self._apply_filter(self.netmap)
        await asyncio.to_thread(backend.up, InterfaceConfig(
            self.ifname, self.state.node_key, self.listen_port,
            (f"{me.ipv4}/10", f"{me.ipv6}/48"), mtu=self.mtu, fwmark=FWMARK))
        self.routing.start(me)  # on this thread: it runs in the node's namespace
        if self.dns_enabled:
            await self.names.start(self.netmap)
        loop = asyncio.get_running_loop()
        port = backend.open_port(loop)
        # Ping the relay every 2 s and give up on it after 6 s of silence: a NAT that
        # forgot the TCP mapping must not leave the relay path dead for a minute.
        self.relay = relay = RelayClient(self.state.node_key, self.netmap.relay_map,
                                         on_home_change=self._on_home_change, keepalive=2.0,
                                         idle_timeout=6.0)
        trav = Traversal(self.state.disco_key, self.state.node_key.public, backend.traversal,
                         wall=time.time, random_bytes=os.urandom)
        self.dataplane = DataPlane(backend, port, relay, trav,
                                   on_path_changed=self._on_path_changed,
                                   on_candidates_stale=self._on_candidates_stale,
                                   on_observed=self._on_observed,
                                   on_pin_failed=self._on_pin_failed, mtu=self.mtu)
        self.dataplane.start()
        self.candidates = Candidates(backend.listen_port)
        self._start_portmapper(backend.listen_port)
        try:
            await relay.start(wait=5.0)
        except WgmeshError as e:
            log.warning("no relay reachable yet (%s); retrying in the background", e)
        self._tasks.append(loop.create_task(self._endpoint_loop()))
        self._tasks.append(loop.create_task(self._endpoint_publisher()))
        self._tasks.append(loop.create_task(self._publish(routes=self.routing.advertised)))
        await self._start_peer_api()

    async def _start_peer_api(self) -> None:
        """The file-drop receiver, bound to the tunnel addresses and the WireGuard device."""
        from wgmesh.drop.protocol import netmap_authorize, netmap_identify
        from wgmesh.drop.server import PeerAPIServer

        assert self.netmap is not None
        me = self.netmap.self_node
        self.peer_api = PeerAPIServer(
            self.state.inbox, [me.ipv4, me.ipv6], interface=self.ifname,
            identify=netmap_identify(lambda: self.netmap),
            authorize=netmap_authorize(lambda: self.netmap))
        await self.peer_api.start()

    async def down(self) -> None:
        """Remove the interface (and its filter) and close streams; ``state_dir`` keeps the
        keys and the cached netmap, so the next :meth:`up` is the same node."""
        self._stop.set()
        self.expiry_watch.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._netmap_saver.flush()
        if self.peer_api is not None:
            await self.peer_api.close()
        if self.dataplane is not None:
            await self.dataplane.close()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.close()
        if self.portmapper is not None:
            await self.portmapper.close()  # deletes the mapping on the router
        await self.names.stop()
        self.routing.stop()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.down)
        if self._control is not None:
            self._control.close()
        self._up = False

    # ---- control plane -------------------------------------------------------------
    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        from wgmesh.control.errors import ControlAPIError

        assert self.netmap is not None and self._control is not None
        client = self._control
        client.last_seq = self.netmap.seq

        def post(fn: Callable[..., object], *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the node went down
                loop.call_soon_threadsafe(fn, *args)

        try:
            for netmap in client.follow(
                    self._stop, on_rejected=lambda e: post(self._on_control_rejected, str(e)),
                    on_link=lambda up: post(self._on_control_link, up)):
                post(self._apply_netmap, netmap)
        except ControlAPIError as e:
            log.error("control rejected this node: %s", e)
            post(self._emit, "state", {"control": "rejected", "error": str(e)})

    def _pin_control_key(self, pinned: ControlKey | None, had_token: bool) -> None:
        """Remember the control key the first verified answer came under, and say so."""
        assert self._control is not None
        key = self._control.control_key
        if key is None or key == self.state.load_control_key(self.control_url):
            return
        if pinned is None:
            why = ("this node registered before control keys existed; now pinning"
                   if had_token else "pinned (trust on first use; pass --control-key to pin "
                                     "it in advance)")
            log.warning("control key %s: %s", key, why)
            self._emit("state", {"control": "pinned", "control_key": str(key)})
        self.state.save_control_key(self.control_url, key)

    def _on_control_link(self, up: bool) -> None:
        """The netmap stream came up or went down: status, metrics and events say so."""
        if up != self.control_online:
            self.control_online = up
            self._emit("state", {"control": "online" if up else "offline"})

    def _on_control_rejected(self, error: str) -> None:
        """A map or delta failed verification: it was refused, the last good map stays."""
        log.error("refused a netmap message from control: %s", error)
        self.control_rejected = error
        self._emit("control_rejected", {"error": error})

    def _apply_netmap(self, netmap: nm.Netmap, live: bool = True) -> None:
        """Fold a new netmap into the backend and traversal: only the peers that changed.

        The ``netmap`` event says how many peers the backend added, updated and removed and
        how long the whole apply took, so a diff that touched everything shows."""
        from wgmesh.wireguard.backend import PeerConfig

        backend, dataplane = self.backend, self.dataplane
        if backend is None or dataplane is None:
            return
        t0 = time.perf_counter()
        old = self.netmap if self.netmap is not None and self._peer_keys else None
        self.netmap = netmap
        self.expiry_watch.update(netmap.self_node.key_expiry)
        self.control_online = self.control_online or live
        self._netmap_saver.submit(netmap)
        now = time.time()
        if self.lock.needs_sync(netmap.lock_head):
            self._sync_lock(netmap.lock_head)
        visible = {pid: p for pid, p in netmap.peers.items()
                   if not (0 < p.key_expiry <= now) and self.lock.allows(p.node_key)}
        try:
            # The rules first: a new peer never gets in ahead of the filter that covers it.
            self._apply_filter(netmap)
        except WgmeshError as e:
            # Fail closed: the old rules stay, so only peers already configured under them
            # stay (or go); new ones wait for a filter that works.
            log.error("installing the packet filter failed; no new peers until it works: %s",
                      e)
            visible = {pid: p for pid, p in visible.items()
                       if self._peer_keys.get(pid) == p.node_key}
        exit_id = self.routing.exit_peer(netmap)
        exit_id = exit_id if exit_id in visible else None
        desired = [PeerConfig(p.node_key, self.routing.allowed_ips(p, exit_id), None,
                              backend.keepalive)
                   for p in visible.values()]
        dataplane.set_tunneled([n for d in desired for n in d.allowed_ips])
        try:  # no endpoints: every peer keeps the one the data plane gave it
            diff = backend.set_peers(desired)
        except WgmeshError as e:
            log.error("configuring peers failed: %s", e)
            return
        try:
            self.routing.sync_exit(exit_id, self.control_url, netmap.relay_map)
        except WgmeshError as e:
            log.error("routing through the exit node failed: %s", e)
        with contextlib.suppress(OSError):  # a hosts file we cannot write: names still serve
            self.names.update(netmap)
        for pid in set(self._peer_keys) - set(visible):
            key = self._peer_keys.pop(pid)
            dataplane.remove_peer(key)
            self._emit("peer_removed", {"key": key.b64()})
        for pid, p in visible.items():
            prev = self._peer_keys.get(pid)
            if prev is not None and prev != p.node_key:  # key rotation: a new WireGuard peer
                dataplane.remove_peer(prev)
            is_new = prev != p.node_key
            self._peer_keys[pid] = p.node_key
            old_peer = old.peers.get(pid) if old else None
            if is_new or old_peer is None or old_peer.endpoints != p.endpoints \
                    or old_peer.home_relay != p.home_relay or old_peer.disco_key != p.disco_key:
                dataplane.upsert_peer(p.node_key, p.disco_key,
                                      [(e.ip, e.port) for e in p.endpoints], p.home_relay)
            if is_new:
                self._emit("peer_added", {"name": p.name, "key": p.node_key.b64(),
                                          "ipv4": p.ipv4})
        self._emit("netmap", {"seq": netmap.seq, "peers": len(visible),
                              "added": len(diff.add), "updated": len(diff.update),
                              "removed": len(diff.remove),
                              "apply_s": round(time.perf_counter() - t0, 6)})

    def _sync_lock(self, advertised: str) -> None:
        """Control advertises a new lock head: fetch and verify it off the loop, then
        re-apply the netmap under the new state. One fetch at a time."""
        if self._lock_task is None or self._lock_task.done():
            self._lock_task = asyncio.get_running_loop().create_task(
                self._lock_sync(advertised))
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(self._lock_task)

    async def _lock_sync(self, advertised: str) -> None:
        from wgmesh.lock import LockError

        assert self._control is not None
        before = self.lock.head
        try:
            await asyncio.to_thread(self.lock.sync, advertised, self._control.lock_chain)
        except LockError as e:
            log.error("mesh lock: refused control's lock chain (head %s), keeping head %s: %s",
                      advertised[:16], self.lock.head[:16], e)
            self._emit("lock_rejected", {"error": str(e), "seq": e.seq,
                                         "advertised": advertised, "head": self.lock.head})
        except WgmeshError as e:
            log.warning("mesh lock: fetching updates failed (%s); retrying on the next map", e)
            return
        if self.lock.head != before:
            self._emit("lock_updated", {"head": self.lock.head})
        self._lock_task = None  # a head advertised meanwhile is fetched by the re-apply
        if self.netmap is not None:
            self._apply_netmap(self.netmap)

    def _apply_filter(self, netmap: nm.Netmap) -> None:
        """Have the backend enforce the netmap's inbound rules, when they changed.
        Raises :class:`~wgmesh.wireguard.backend.BackendError` if it cannot (fail closed)."""
        assert self.backend is not None
        rules = (*netmap.filter, *self._drop_rules(netmap))
        if rules == self._filter_applied:
            return
        self.backend.set_filter(rules)
        self._filter_applied = rules

    @staticmethod
    def _drop_rules(netmap: nm.Netmap) -> tuple[nm.FilterRule, ...]:
        """The file-send capability opens the peer API's port to the peers holding it, even
        where the port rules would not."""
        from wgmesh.drop.protocol import DEFAULT_PORT

        senders = [a for p in netmap.peers.values() if nm.CAP_FILE_SEND in p.caps
                   for a in (f"{p.ipv4}/32", f"{p.ipv6}/128")]
        if not senders:
            return ()
        me = netmap.self_node
        return (nm.FilterRule(src=tuple(senders), dst=(f"{me.ipv4}/32", f"{me.ipv6}/128"),
                              ports=((DEFAULT_PORT, DEFAULT_PORT),), proto="tcp"),)

    # ---- endpoints -----------------------------------------------------------------
    async def _endpoint_loop(self) -> None:
        """STUN from the WireGuard port, publish what changed; again every 30 s, on demand,
        and as soon as this host's addresses change (a roam: the NAT mapping is new)."""
        from wgmesh.node.netcheck import local_addresses

        loop = asyncio.get_running_loop()
        addrs = local_addresses(include_loopback=True)
        while True:
            self._refresh.clear()  # before, not after: a request made meanwhile is kept
            try:
                await self._refresh_endpoints()
            except Exception:
                log.exception("endpoint refresh failed")
            due = loop.time() + ENDPOINT_REFRESH_S
            while not self._refresh.is_set() and loop.time() < due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refresh.wait(),
                                           min(ADDRESS_POLL_S, due - loop.time()))
                if (now := local_addresses(include_loopback=True)) != addrs:
                    log.info("this host's addresses changed (%s): probing again",
                             ", ".join(sorted(set(now) - set(addrs))) or "some went away")
                    addrs = now
                    self._network_changed(set(now))

    def _network_changed(self, addrs: set[str]) -> None:
        """A roam: re-STUN, re-probe every peer, and leave the connections that went out
        from an address this host no longer has (their answers cannot come back) rather
        than wait for their timeouts."""
        if self.dataplane is not None:
            self.dataplane.network_changed()
        if self.relay is not None:
            self.relay.addresses_changed(addrs)
        if self._control is not None:
            self._control.addresses_changed(addrs)

    async def netcheck(self) -> NetcheckReport:
        """UDP, reflexive addresses, hard NAT, relay latencies, hairpin: measured from the
        WireGuard port itself, against the netmap's relays."""
        from wgmesh.node.netcheck import servers_from_relay_map

        if self.dataplane is None or self.netmap is None:
            raise WgmeshError("the node is not up")
        report = await self.dataplane.netcheck(servers_from_relay_map(self.netmap.relay_map))
        if self.portmapper is None:
            return report
        return attrs.evolve(report, portmap=self.portmapper.report())

    async def _refresh_endpoints(self) -> None:
        report = await self.netcheck()
        assert self.candidates is not None and self.dataplane is not None \
            and self.backend is not None
        self.last_netcheck = report
        self.hard_nat = report.hard_nat
        reflexive = [a for a in (report.ipv4, report.ipv6) if a]
        lan = [a for a in report.local_addresses if _lan_candidate(a)]
        changed = self.candidates.update(lan=lan, reflexive=reflexive,
                                         hard_nat=report.hard_nat,
                                         local_port=self.backend.listen_port)
        self.dataplane.set_local(list(self.candidates.addrs), report.hard_nat, udp=report.udp)
        if changed is not None:
            self._publish_endpoints(list(changed))

    def _publish_endpoints(self, endpoints: list[nm.Endpoint]) -> None:
        """Hand the latest endpoints to :meth:`_endpoint_publisher`: a publish held up by
        a dead connection must not hold the endpoint loop, which notices the next roam."""
        self._endpoints_out = endpoints
        self._endpoints_due.set()

    async def _endpoint_publisher(self) -> None:
        """Publish the latest endpoints, one publish at a time so an older list never
        lands after a newer one; a failed one is tried again (1 s, doubling up to 30 s)
        with whatever is latest by then, so control never keeps a stale list."""
        delay = 1.0
        while True:
            await self._endpoints_due.wait()
            self._endpoints_due.clear()
            if await self._publish(endpoints=self._endpoints_out):
                delay = 1.0
                continue
            self._endpoints_due.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _publish(self, **kw: Any) -> bool:
        assert self._control is not None
        try:
            await asyncio.to_thread(self._control.update, **kw)
        except WgmeshError as e:
            log.warning("publishing to control failed: %s", e)
            return False
        return True

    def _start_portmapper(self, port: int) -> None:
        """Ask the gateway for a mapping of the WireGuard port itself (the kernel's port on
        the kernel backend); the state file lets the next start delete a mapping that a
        ``kill -9`` left behind."""
        from wgmesh.node.portmapper import PortMapper

        self.portmapper = PortMapper(port, state_file=self.state.path / "portmap.json",
                                     on_change=self._on_mapped)
        self.portmapper.start()

    def _on_mapped(self, endpoint: tuple[str, int] | None) -> None:
        """A mapping came, moved or went: a candidate like a STUN one, published at once."""
        if self.candidates is None or self.dataplane is None or self._stop.is_set():
            return  # going down: the mapping is being deleted, nothing to tell
        changed = self.candidates.update(mapped=[endpoint] if endpoint else [])
        self.dataplane.set_local(list(self.candidates.addrs), self.hard_nat)
        if changed is not None:
            self._publish_endpoints(list(changed))

    def _via_portmap(self, peer: nm.Peer, endpoint: tuple[str, int] | None) -> bool:
        """A direct path that a port mapping opened: it goes to a mapping the peer published,
        or we hold one and the path is one the peer never published (its pings came in,
        through our mapping), or our NAT is hard (nothing else could let them in)."""
        if endpoint is None:
            return False
        published = {(e.ip, e.port): e.kind for e in peer.endpoints}
        if published.get(endpoint) == "portmap":
            return True
        held = self.portmapper is not None and self.portmapper.endpoint is not None
        return held and (self.hard_nat or endpoint not in published)

    def _on_candidates_stale(self, reason: str) -> None:
        self._refresh.set()

    def _on_observed(self, addr: tuple[str, int]) -> None:
        self._on_candidates_stale("observed")

    def _on_home_change(self, region: int) -> None:
        asyncio.get_running_loop().create_task(self._publish(home_relay=region))

    def _on_path_changed(self, key: Key, st: PeerPathStatus) -> None:
        peer = self._peer_by_key(key)
        self._emit("peer_path_changed", {
            "peer": peer.name if peer else key.short(), "key": key.b64(), "path": st.path,
            "endpoint": f"{st.endpoint[0]}:{st.endpoint[1]}" if st.endpoint else None,
            "rtt_ms": None if st.rtt is None else round(st.rtt * 1000, 2), "reason": st.reason})

    def _on_pin_failed(self, key: Key, mode: str, reason: str) -> None:
        peer = self._peer_by_key(key)
        self._emit("pin_failed", {"peer": peer.name if peer else key.short(),
                                  "key": key.b64(), "pin": mode, "reason": reason})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.events.emit(Event(name, data, time.time()))

    # ---- queries -------------------------------------------------------------------
    def _peer_by_key(self, key: Key) -> nm.Peer | None:
        if self.netmap is None:
            return None
        return self.netmap.peer_by_key(key)

    def resolve(self, ref: str) -> nm.Peer:
        """A peer by name, tunnel address or node key."""
        if self.netmap is None:
            raise WgmeshError("no netmap yet")
        for p in self.netmap.peers.values():
            if ref in (p.name, p.ipv4, p.ipv6, p.node_key.b64()) \
                    or p.name.split(".")[0] == ref:
                return p
        raise WgmeshError(f"no peer {ref!r} in this node's netmap")

    async def status(self) -> Status:
        """This node and each peer: path (direct or relay), endpoint, latency, handshake,
        traffic, as the data plane sees them now."""
        me = self.netmap.self_node if self.netmap else self.identity
        stats = await asyncio.to_thread(self.backend.stats) if self.backend else {}
        peers = []
        if self.netmap is not None:
            for p in sorted(self.netmap.peers.values(), key=lambda p: p.name):
                st = stats.get(p.node_key)
                path = self.dataplane.paths.get(p.node_key) if self.dataplane else None
                info = self.dataplane.trav.path(p.node_key) if self.dataplane else None
                pin = self.dataplane.pins.get(p.node_key) if self.dataplane else None
                relay_region = (pin if isinstance(pin, int) else p.home_relay
                                or (self.relay.home_region if self.relay else None))
                peers.append(PeerStatus(
                    name=p.name, ipv4=p.ipv4, ipv6=p.ipv6, key=p.node_key.b64(),
                    online=p.online,
                    path=path.path if path else "relay",
                    endpoint=(f"{path.endpoint[0]}:{path.endpoint[1]}"
                              if path and path.endpoint and path.path == "direct" else None),
                    relay_region=relay_region,
                    rtt_ms=None if not path or path.rtt is None else round(path.rtt * 1e3, 2),
                    last_handshake=st.last_handshake if st else None,
                    rx_bytes=st.rx_bytes if st else 0, tx_bytes=st.tx_bytes if st else 0,
                    lock=self.lock.label(p.node_key),
                    via_portmap=bool(path and path.path == "direct"
                                     and self._via_portmap(p, path.endpoint)),
                    reason=path_reason(info, p.online), candidates=tried_json(info),
                    pinned=pin, path_mtu=path_mtu_json(info)))
        state, state_reason = self_state(me, time.time())
        return Status(
            name=me.name if me else self.hostname, ipv4=me.ipv4 if me else None,
            ipv6=me.ipv6 if me else None,
            public_key=self.state.node_key.public.b64(),
            backend=self.backend.kind if self.backend else None,
            backend_reason=self.backend_reason,
            listen_port=self.backend.listen_port if self.backend else None,
            home_relay=self.relay.home_region if self.relay else None,
            endpoints=[str(e) for e in self.candidates.endpoints] if self.candidates else [],
            control_online=self.control_online, peers=peers, lock=self.lock.summary(),
            control_rejected=self.control_rejected, state=state, state_reason=state_reason,
            mtu=self.mtu if self.backend else None, routes=self._routes_status(),
            interface_mtu=self.dataplane.interface_mtu if self.dataplane else None,
            dns=self.names.status())

    def resolve_name(self, name: str) -> list[str]:
        """The tunnel addresses of mesh name ``name`` (``peer`` or ``peer.DOMAIN``), from
        the netmap, without the system resolver; [] if there is no such node."""
        return self.names.resolve(self.netmap, name)

    def set_exit_node(self, name: str | None) -> None:
        """Send this node's internet traffic through peer ``name`` (an exit node), or back
        to the underlay with ``None``; control, relays and peer endpoints stay direct."""
        self.routing.exit_node = name
        if self.netmap is not None:
            self._apply_netmap(self.netmap, live=False)

    def _routes_status(self) -> dict[str, Any]:
        r = self.routing
        exit_peer = self.netmap.peers.get(r.exit_id) if self.netmap and r.exit_id else None
        return {"advertised": r.advertised, "accept_routes": r.accept_routes,
                "exit_node": r.exit_node, "exit_active": exit_peer.name if exit_peer else None}

    async def pin(self, peer: str, mode: str | int) -> None:
        """Pin ``peer``'s path to ``"direct"``, ``"relay"`` or a relay region id (for
        experiments); a ``direct`` pin that cannot be had emits ``pin_failed``."""
        if self.dataplane is None:
            raise WgmeshError("the node is not up")
        if mode not in ("direct", "relay") and not (isinstance(mode, int)
                                                    and not isinstance(mode, bool)):
            raise WgmeshError(f"pin {mode!r}: direct, relay or a relay region id")
        self.dataplane.pin(self.resolve(peer).node_key, mode)

    async def unpin(self, peer: str) -> None:
        """Let traversal choose ``peer``'s path again."""
        if self.dataplane is None:
            raise WgmeshError("the node is not up")
        self.dataplane.pin(self.resolve(peer).node_key, None)

    async def ping(self, peer: str, *, count: int = 1, timeout: float = 5.0) -> PingResult:
        """An ICMP echo through the tunnel to ``peer``; reports the path it took."""
        from wgmesh.node.icmp import echo

        p = self.resolve(peer)
        rtt = await asyncio.to_thread(echo, p.ipv4, timeout=timeout, count=count)
        path = self.dataplane.paths.get(p.node_key) if self.dataplane else None
        return PingResult(peer=p.name, ip=p.ipv4, rtt_ms=None if rtt is None else rtt * 1e3,
                          path=path.path if path else "relay",
                          endpoint=(f"{path.endpoint[0]}:{path.endpoint[1]}"
                                    if path and path.endpoint and path.path == "direct"
                                    else None),
                          relay_region=p.home_relay or (self.relay.home_region
                                                        if self.relay else None))

    async def send_file(self, peer: str, path: str | os.PathLike[str],
                        progress: Callable[[int, int], None] | None = None) -> SendResult:
        """Send a file to ``peer``'s inbox through the tunnel (resumable, digest-checked)."""
        from wgmesh.drop.sender import send_file

        p = self.resolve(peer)
        return await asyncio.to_thread(send_file, p.ipv4, path, progress=progress)

    def state_inbox(self) -> Inbox:
        """The inbox that dropped files land in (once the node is up)."""
        if self.peer_api is None:
            raise WgmeshError("the node is not up")
        return self.peer_api.inbox

    def on(self, name: str, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event ``name`` (``"*"``: all); returns a
        function that unsubscribes. Events: ``peer_added``, ``peer_removed``,
        ``peer_path_changed``, ``netmap``, ``state``, ``lock_updated``, ``lock_rejected``,
        ``key_expiring``, ``pin_failed``."""
        return self.events.on(name, callback)


class Node:
    """The synchronous, thread-safe face of :class:`AsyncNode` (scripts, Jupyter).

    ``netns``: run the whole node (interface, sockets, control and relay
    connections) inside that network namespace, e.g. a lab host's ``host.ns``.
    """

    def __init__(self, control_url: str, *, authkey: str | None = None,
                 state_dir: str | os.PathLike[str] = "/var/lib/wgmesh", backend: str = "auto",
                 netns: str | None = None, hostname: str | None = None,
                 ifname: str = DEFAULT_IFNAME, listen_port: int = 0,
                 control_key: str | None = None, control_ca: str | None = None,
                 advertise_routes: Sequence[str] = (), accept_routes: bool = False,
                 snat_subnet_routes: bool = True, advertise_exit_node: bool = False,
                 exit_node: str | None = None, exit_node_allow_lan_access: bool = False,
                 mtu: int = DEFAULT_MTU, dns: bool = True,
                 dns_resolv_conf: str | os.PathLike[str] | None = None,
                 dns_hosts_file: str | os.PathLike[str] | None = None) -> None:
        from wgmesh.control.client import check_control_url

        # A refused URL or control key fails here, before there is a loop thread to leak.
        check_control_url(control_url)
        _control_trust(authkey, control_key)
        self._loop = LoopThread(f"wgmesh-node-{hostname or ''}")
        self.events = EventBus()
        if netns is not None:
            try:
                self._loop.call(_in_loop(enter_netns, netns))
            except OSError as e:
                self._loop.stop()
                raise WgmeshError(f"cannot enter network namespace {netns}: "
                                  f"{e.strerror}") from None
        self._node = AsyncNode(control_url, authkey=authkey, state_dir=state_dir,
                               backend=backend, hostname=hostname, ifname=ifname,
                               listen_port=listen_port, events=self.events,
                               control_key=control_key, control_ca=control_ca,
                               advertise_routes=advertise_routes, accept_routes=accept_routes,
                               snat_subnet_routes=snat_subnet_routes,
                               advertise_exit_node=advertise_exit_node, exit_node=exit_node,
                               exit_node_allow_lan_access=exit_node_allow_lan_access, mtu=mtu,
                               dns=dns, dns_resolv_conf=dns_resolv_conf,
                               dns_hosts_file=dns_hosts_file)
        self.netns = netns
        self.state_dir = Path(state_dir)

    @property
    def aio(self) -> AsyncNode:
        """The :class:`AsyncNode` underneath (its coroutines run on this node's loop)."""
        return self._node

    def up(self, timeout: float = 60) -> Status:
        """Join the mesh (see :meth:`AsyncNode.up`); waits at most ``timeout`` seconds."""
        return self._loop.call(self._node.up(), timeout)

    def down(self, timeout: float = 30) -> None:
        """Leave: remove the interface and stop the loop thread (the state dir stays)."""
        try:
            self._loop.call(self._node.down(), timeout)
        finally:
            self._loop.stop()

    def status(self) -> Status:
        """This node and its peers: paths, latency, handshakes, traffic."""
        return self._loop.call(self._node.status(), 30)

    def resolve(self, name: str) -> list[str]:
        """Tunnel addresses of mesh name ``name`` (``peer`` or ``peer.DOMAIN``) from the
        netmap; no system resolver involved (scripts, notebooks)."""
        return self._node.resolve_name(name)

    def set_exit_node(self, name: str | None) -> None:
        """Route this node's internet traffic through exit node ``name`` (None: stop)."""
        self._loop.call(_in_loop(self._node.set_exit_node, name), 30)

    def ping(self, peer: str, *, count: int = 1, timeout: float = 5.0) -> PingResult:
        """An ICMP echo through the tunnel to ``peer`` (name, tunnel address or key), with
        the path it took; ``rtt_ms`` is None when no reply came in ``timeout``."""
        return self._loop.call(self._node.ping(peer, count=count, timeout=timeout),
                               timeout * count + 5)

    def netcheck(self) -> NetcheckReport:
        """UDP, reflexive addresses, hard NAT, relay latency, hairpin, from the WG port."""
        return self._loop.call(self._node.netcheck(), 30)

    def pin(self, peer: str, mode: str | int) -> None:
        """Pin ``peer``'s path: ``"direct"``, ``"relay"`` or a relay region id."""
        self._loop.call(self._node.pin(peer, mode), 30)

    def unpin(self, peer: str) -> None:
        """Let traversal choose ``peer``'s path again."""
        self._loop.call(self._node.unpin(peer), 30)

    def reauthenticate(self, authkey: str | None = None) -> nm.NodeInfo:
        """Renew the node's key lifetime with an auth key (see
        :meth:`AsyncNode.reauthenticate`)."""
        return self._loop.call(self._node.reauthenticate(authkey), 60)

    def send_file(self, peer: str, path: str | os.PathLike[str],
                  progress: Callable[[int, int], None] | None = None) -> SendResult:
        """Send ``path`` to ``peer`` through the tunnel; ``progress(done, total)`` as it goes."""
        return self._loop.call(self._node.send_file(peer, path, progress), None)

    @property
    def netmap(self) -> nm.Netmap | None:
        """The current netmap (None before the first one)."""
        return self._node.netmap

    def on(self, name: str, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event ``name``, on the node's loop thread
        (see :meth:`AsyncNode.on`); returns a function that unsubscribes."""
        return self.events.on(name, callback)

    def plot(self) -> Any:
        """This node and its peers, edges coloured by path with their latency."""
        from wgmesh.display import plot_topology

        st = self.status()
        roles = {st.name: "node", **{p.name: "node" for p in st.peers}}
        return plot_topology([], roles, [(st.name, p.name, p.path, p.rtt_ms) for p in st.peers],
                             title=f"{st.name} ({st.backend})")

    def wait_for(self, predicate: Callable[[Status], bool], timeout: float = 30,
                 interval: float = 0.2) -> Status:
        """Poll :meth:`status` until ``predicate`` holds (e.g. a peer went direct)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s: {st!r}")
            time.sleep(interval)

    def __enter__(self) -> Node:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"<Node {self._node.hostname} {'up' if self._node._up else 'down'}>"


def _control_trust(authkey: str | None, control_key: str | None
                   ) -> tuple[str | None, ControlKey | None]:
    """The auth key to send and the control key to pin: ``control_key``, else the one the
    auth key string carries (``wgk_...#ctrlkey:...``), else None (trust on first use)."""
    from wgmesh.control.envelope import ControlKey, split_authkey

    embedded = None
    if authkey is not None:
        authkey, embedded = split_authkey(authkey)
    pinned = ControlKey.parse(control_key) if control_key else None
    if pinned is not None and embedded is not None and pinned != embedded:
        raise WgmeshError(f"--control-key {pinned} contradicts the control key in the auth "
                          f"key ({embedded})")
    return authkey, pinned or embedded


async def _in_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on the loop's own thread (``LoopThread.call`` takes a coroutine)."""
    return fn(*args)
