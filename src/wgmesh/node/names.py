"""Mesh names on the node: the DNS responder on the tunnel address, and the system hooks.

:class:`MeshNames` runs :class:`~wgmesh.node.dns.DnsResponder` on this node's tunnel
IPv4 address, port 53, in the node's namespace (:mod:`wgmesh.node.dns` says why that
address), answering ``NAME.DOMAIN`` from every netmap (``update``) and forwarding the
rest to the resolvers the host had before.

It then tells the system, in this order of preference:

* systemd-resolved, where it runs (its varlink socket answers and ``resolvectl`` is
  installed): split DNS, only ``~DOMAIN`` goes to the responder on this interface;
  ``resolvectl revert`` undoes it (and resolved forgets it with the interface); if
  resolved refuses, the next choice applies;
* else, opt-in, ``resolv_conf``: the file is rewritten to ask the responder first
  (with the domain searched); its original content is kept in the journal;
* and, opt-in, ``hosts_file``: a managed block of ``ADDRESS NAME.DOMAIN NAME`` lines,
  rewritten on every netmap.

The file paths are parameters because in a lab namespace ``/etc`` is the host's. Every
change goes through a :class:`~wgmesh.node.routes.Journal` (``host-dns.json``), so
``down``, or the next start after a crash, restores the files exactly.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from wgmesh import netmap as nm
from wgmesh.errors import WgmeshError
from wgmesh.node.routes import Journal

if TYPE_CHECKING:
    from wgmesh.node.dns import DnsResponder

log = logging.getLogger("wgmesh.node.names")

__all__ = ["DEFAULT_DOMAIN", "MeshNames", "resolved_running"]

#: The mesh domain when control sets none (``.internal`` is reserved for private use).
DEFAULT_DOMAIN = "wgmesh.internal"
_BEGIN, _END = "# BEGIN wgmesh mesh names", "# END wgmesh mesh names"
_BLOCK_RE = re.compile(rf"^{re.escape(_BEGIN)}\n.*?^{re.escape(_END)}\n?", re.M | re.S)
_RESOLVED_SOCKET = "/run/systemd/resolve/io.systemd.Resolve"


def resolved_running(socket_path: str = _RESOLVED_SOCKET) -> bool:
    """Is systemd-resolved running here (and ``resolvectl`` there to configure it)? Its
    varlink socket must accept a connection: resolved leaves the file behind when it
    stops, so a host where it ran once would otherwise count as hooked in."""
    if shutil.which("resolvectl") is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(socket_path)
        except OSError:
            return False
    return True


def nameservers(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` entries of resolv.conf text."""
    return [(parts[1], 53) for line in text.splitlines()
            if len(parts := line.split()) >= 2 and parts[0] == "nameserver"]


def hosts_block(netmap: nm.Netmap, domain: str) -> str:
    """The managed block for a hosts file: this node and every peer."""
    lines = [_BEGIN]
    nodes: list[nm.NodeInfo | nm.Peer] = [netmap.self_node,
                                          *sorted(netmap.peers.values(), key=lambda p: p.name)]
    for n in nodes:
        for ip in (n.ipv4, n.ipv6):
            lines.append(f"{ip} {n.name}.{domain} {n.name}")
    return "\n".join([*lines, _END]) + "\n"


class MeshNames:
    """The responder and the system hooks of one node (see the module docstring)."""

    def __init__(self, state_dir: Path, ifname: str, *, port: int = 53,
                 resolv_conf: str | os.PathLike[str] | None = None,
                 hosts_file: str | os.PathLike[str] | None = None,
                 system_resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf") -> None:
        self.ifname, self.port = ifname, port
        self.resolv_conf = Path(resolv_conf) if resolv_conf else None
        self.hosts_file = Path(hosts_file) if hosts_file else None
        self.system_resolv_conf = Path(system_resolv_conf)
        self.journal = Journal(state_dir / "host-dns.json")
        self.responder: DnsResponder | None = None
        self.domain = DEFAULT_DOMAIN
        self.hook = "none"  #: resolved | resolv.conf | none (reported in status)

    def resolve(self, netmap: nm.Netmap | None, name: str) -> list[str]:
        """Addresses of ``name`` (``peer`` or ``peer.DOMAIN``) from ``netmap``, asking no
        resolver."""
        from wgmesh.node.dns import NameTable

        if netmap is None:
            return []
        return NameTable.from_netmap(netmap, netmap.domain or DEFAULT_DOMAIN).resolve(name)

    async def start(self, netmap: nm.Netmap) -> None:
        """Restore what a crashed run left, then serve and hook into the system. A port
        that cannot be bound (no root) costs the responder, not the node."""
        from wgmesh.node.dns import DnsResponder

        self.journal.undo()
        self.hook = "none"
        self.domain = netmap.domain or DEFAULT_DOMAIN
        me = netmap.self_node
        conf = self.resolv_conf or self.system_resolv_conf
        upstreams = nameservers(conf.read_text()) if conf.exists() else []
        responder = DnsResponder(netmap, self.domain, me.ipv4, port=self.port,
                                 upstreams=upstreams)
        try:
            await responder.start()
        except OSError as e:
            log.warning("mesh DNS not served on %s:%d: %s", me.ipv4, self.port, e)
            return
        self.responder = responder
        if resolved_running() and self._hook_resolved(me.ipv4):
            self.hook = "resolved"
        elif self.resolv_conf is not None:
            old = self.resolv_conf.read_text() if self.resolv_conf.exists() else ""
            search = [w for line in old.splitlines() if line.startswith("search")
                      for w in line.split()[1:]]
            keep = [line for line in old.splitlines()
                    if line.split()[:1] not in (["nameserver"], ["search"], ["domain"])]
            self.journal.replace_file(self.resolv_conf, "\n".join([
                f"# wgmesh: mesh names first; the original is restored on down "
                f"({self.journal.path})", f"nameserver {me.ipv4}",
                f"search {' '.join([self.domain, *search])}", *keep]) + "\n")
            self.hook = "resolv.conf"
        self._write_hosts(netmap)

    def _hook_resolved(self, address: str) -> bool:
        """Split DNS through resolved. Refused (no D-Bus, no permission, resolved gone
        since we looked), it costs the hook, not the node: what was set is reverted."""
        revert = ["resolvectl", "revert", self.ifname]
        try:
            self.journal.command(["resolvectl", "dns", self.ifname, address], revert)
            self.journal.command(["resolvectl", "domain", self.ifname, f"~{self.domain}"],
                                 revert)
        except WgmeshError as e:
            log.warning("mesh names not hooked into systemd-resolved: %s", e)
            self.journal.undo()
            return False
        return True

    def update(self, netmap: nm.Netmap) -> None:
        """A new netmap: answer from it, and rewrite the hosts block if names changed."""
        if self.responder is not None:
            self.responder.update(netmap)
            self._write_hosts(netmap)

    def _write_hosts(self, netmap: nm.Netmap) -> None:
        if self.hosts_file is None:
            return
        old = self.hosts_file.read_text() if self.hosts_file.exists() else ""
        new = _BLOCK_RE.sub("", old)
        new = (new if not new or new.endswith("\n") else new + "\n") + hosts_block(
            netmap, self.domain)
        if new != old:
            self.journal.replace_file(self.hosts_file, new)

    def status(self) -> dict[str, str] | None:
        """The domain served and the system hook, for ``status``; None when not serving."""
        return None if self.responder is None else {"domain": self.domain, "hook": self.hook}

    async def stop(self) -> None:
        if self.responder is not None:
            await self.responder.close()
        self.responder = None
        self.hook = "none"
        self.journal.undo()
