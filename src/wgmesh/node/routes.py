"""Subnet routes and exit nodes on the node: what it routes, and what it changes on the host.

* :func:`peer_allowed_ips`: a peer's WireGuard allowed IPs: its own addresses, plus its
  subnet routes when this node accepts routes, plus ``/0`` when it is our exit node.
  The backend then installs the routes (kernel: pyroute2; userspace: the TUN), so the
  node needs no backend branch.
* :class:`Journal`: every change to the host's configuration (sysctls, nftables tables,
  policy-routing rules and routes, resolver files) is written to a journal in the state
  dir (``host-router.json``, ``host-exit.json``, ``host-dns.json``) *before* it is made,
  and undone in reverse order by ``down``, or by the next start (or ``wgmesh down
  --state-dir``) after ``kill -9``. So the host ends up exactly as it was.
* :func:`enable_router`: a node advertising routes forwards (``ip_forward``) and, by
  default, masquerades what it forwards from the tunnel (``--snat-subnet-routes``), so
  the hosts behind it need no route back to the mesh. It also clamps the MSS of TCP
  SYNs it forwards into the tunnel to the interface MTU (which follows the narrowest
  measured path, :mod:`wgmesh.pmtu`): hosts behind it know nothing of the tunnel and
  would otherwise send segments that only fit after fragmentation, or an ICMP that a
  firewall may eat.
* :func:`route_via_exit`: wg-quick's recipe for a default route through the tunnel.
  Table ``EXIT_TABLE`` holds the default routes via the interface; rules send everything
  not carrying ``FWMARK`` there, after ``suppress_prefixlength 0`` lets the main table's
  more specific routes (the LAN) win. WireGuard's own socket carries ``FWMARK`` (so its
  packets, direct or disco or STUN, stay on the underlay), and control and relay
  addresses get ``lookup main`` rules (their TCP connections stay on the underlay too).
  Without LAN access, the connected private prefixes are sent into the tunnel as well.

Everything runs in the calling thread's network namespace (the node's loop thread).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wgmesh import netmap as nm
from wgmesh.control.routes import EXIT_ROUTES, is_exit
from wgmesh.errors import WgmeshError

log = logging.getLogger("wgmesh.node.routes")

__all__ = ["EXIT_TABLE", "FWMARK", "JOURNALS", "Journal", "Routing", "enable_router",
           "peer_allowed_ips", "route_via_exit", "undo_host_changes"]

#: The firewall mark on WireGuard's own packets, and the table of the exit node's routes.
FWMARK = 0x5767
EXIT_TABLE = 52007
_PRIO = 5200  # rules at 5200..5230, before the main table's 32766


def peer_allowed_ips(peer: nm.Peer, *, accept_routes: bool, exit_node: int | None
                     ) -> tuple[str, ...]:
    """What WireGuard should accept from and route to ``peer`` (see the module docstring)."""
    own = peer.allowed_ips or (f"{peer.ipv4}/32", f"{peer.ipv6}/128")
    extra = tuple(r for r in peer.routes
                  if (peer.id == exit_node if is_exit(r) else accept_routes))
    return (*own, *extra)


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        cp = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                            timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WgmeshError(f"{argv[0]}: {e}") from None
    if cp.returncode != 0:
        raise WgmeshError(f"{' '.join(argv)}: {cp.stderr.strip() or cp.returncode}")
    return cp.stdout


class Journal:
    """Host changes, recorded before they are made and undone in reverse order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []

    def _record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)

    def sysctl(self, key: str, value: str) -> None:
        prev = _run(["sysctl", "-n", key]).strip()
        if prev == value:
            return
        self._record({"sysctl": key, "value": prev})
        _run(["sysctl", "-qw", f"{key}={value}"])

    def nft_table(self, family: str, name: str, script: str) -> None:
        self._record({"nft": f"{family} {name}"})
        _run(["nft", "-f", "-"], f"table {family} {name}\ndelete table {family} {name}\n"
             + script)

    def ip(self, *args: str) -> None:
        """``ip ARGS add ...``, undone by the same command with ``del``."""
        self.command(["ip", *args], ["ip", *["del" if a == "add" else a for a in args]])

    def command(self, argv: Sequence[str], undo: Sequence[str]) -> None:
        """Run ``argv``; undo runs ``undo``."""
        self._record({"run": list(undo)})
        _run(argv)

    def replace_file(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` in place (it may be a symlink or a bind mount); undo
        puts back the content it had before the first such write."""
        if not any(e.get("file") == str(path) for e in self.entries):
            self._record({"file": str(path),
                          "content": path.read_text() if path.exists() else None})
        path.write_text(text)

    def undo(self) -> None:
        """Undo every recorded change (also one a crashed run recorded), newest first."""
        entries = self.entries
        if not entries and self.path.exists():
            with contextlib.suppress(OSError, ValueError):
                entries = json.loads(self.path.read_text())
        for e in reversed(entries):
            try:
                if "sysctl" in e:
                    _run(["sysctl", "-qw", f"{e['sysctl']}={e['value']}"])
                elif "nft" in e:
                    family, name = e["nft"].split()
                    _run(["nft", "-f", "-"], f"table {family} {name}\n"
                                             f"delete table {family} {name}\n")
                elif "run" in e:
                    _run(e["run"])
                elif "file" in e:
                    if e["content"] is None:
                        Path(e["file"]).unlink(missing_ok=True)
                    else:
                        Path(e["file"]).write_text(e["content"])
            except (WgmeshError, OSError) as err:  # already gone (the interface took it along)
                log.debug("undo %s: %s", e, err)
        self.entries = []
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _families(routes: Iterable[str]) -> tuple[list[str], list[str]]:
    nets = [ipaddress.ip_network(r, strict=False) for r in routes]
    return ([str(n) for n in nets if n.version == 4], [str(n) for n in nets if n.version == 6])


def enable_router(journal: Journal, ifname: str, routes: Sequence[str],
                  tunnel_nets: Sequence[str], snat: bool) -> None:
    """Forward from the tunnel to ``routes``; masquerade it unless ``snat`` is off."""
    v4, v6 = _families(routes)
    t4, t6 = _families(tunnel_nets)
    if v4:
        journal.sysctl("net.ipv4.ip_forward", "1")
    if v6:
        journal.sysctl("net.ipv6.conf.all.forwarding", "1")
    mss = f"wgmesh_mss_{ifname.replace('-', '_')}"
    journal.nft_table("inet", mss, "\n".join([
        f"table inet {mss} {{", "  chain forward {",
        "    type filter hook forward priority mangle; policy accept;",
        f'    oifname "{ifname}" tcp flags syn tcp option maxseg size set rt mtu',
        "  }", "}"]) + "\n")
    if not snat:
        return
    table = f"wgmesh_nat_{ifname.replace('-', '_')}"
    lines = [f"table inet {table} {{", "  chain postrouting {",
             "    type nat hook postrouting priority srcnat; policy accept;"]
    for fam, src, dst in (("ip", t4, v4), ("ip6", t6, v6)):
        if src and dst:
            lines.append(f'    {fam} saddr {{ {", ".join(src)} }} '
                         f'{fam} daddr {{ {", ".join(dst)} }} oifname != "{ifname}" masquerade')
    journal.nft_table("inet", table, "\n".join([*lines, "  }", "}"]) + "\n")


def route_via_exit(journal: Journal, ifname: str, underlay: Iterable[str],
                   lan: Iterable[str] = ()) -> None:
    """Send everything but WireGuard's own packets and the ``underlay`` addresses (control,
    relays) through ``ifname``; ``lan`` prefixes too (no LAN access)."""
    for fam in ("-4", "-6"):
        journal.ip(fam, "route", "add", "default", "dev", ifname, "table", str(EXIT_TABLE))
        for addr in sorted(a for a in underlay if (":" in a) == (fam == "-6")):
            journal.ip(fam, "rule", "add", "to", addr, "lookup", "main",
                       "priority", str(_PRIO))
        for net in sorted(n for n in lan if (":" in n) == (fam == "-6")):
            journal.ip(fam, "rule", "add", "not", "fwmark", str(FWMARK), "to", net,
                       "lookup", str(EXIT_TABLE), "priority", str(_PRIO + 10))
        journal.ip(fam, "rule", "add", "lookup", "main", "suppress_prefixlength", "0",
                   "priority", str(_PRIO + 20))
        journal.ip(fam, "rule", "add", "not", "fwmark", str(FWMARK), "lookup",
                   str(EXIT_TABLE), "priority", str(_PRIO + 30))


def _underlay(control_url: str, relay_map: nm.RelayMap) -> set[str]:
    """Control's and the relays' addresses: their connections must stay off the exit node."""
    hosts = {urlsplit(control_url).hostname or ""}
    for region in relay_map.regions:
        for n in region.nodes:
            hosts |= {urlsplit(n.url).hostname or "", n.stun_host}
    out: set[str] = set()
    for h in hosts - {""}:
        try:
            out.add(str(ipaddress.ip_address(h)))
        except ValueError:
            with contextlib.suppress(OSError):
                out |= {str(ai[4][0]) for ai in socket.getaddrinfo(h, None)}
    return out


def _lan_prefixes(ifname: str) -> set[str]:
    """Private prefixes connected to this host's other interfaces."""
    out = set()
    for fam in ("-4", "-6"):
        for r in json.loads(_run(["ip", "-j", fam, "route", "show", "scope", "link"]) or "[]"):
            dst = r.get("dst", "")
            if r.get("dev") != ifname and "/" in dst and \
                    ipaddress.ip_network(dst, strict=False).is_private:
                out.add(dst)
    return out


#: The node's journals, in the order they are undone.
JOURNALS = ("host-exit.json", "host-dns.json", "host-router.json")


def undo_host_changes(state_dir: str | os.PathLike[str]) -> None:
    """Restore what an agent that is not running (killed) changed on the host."""
    for name in JOURNALS:
        Journal(Path(state_dir) / name).undo()


class Routing:
    """The node's routes: what it advertises, what it accepts, and its exit node.

    ``host-router.json`` and ``host-exit.json`` in the state dir are the journals of its
    router and exit-node changes; :meth:`start` first undoes what a killed run left.
    """

    def __init__(self, state_dir: Path, ifname: str, *, advertise_routes: Sequence[str] = (),
                 accept_routes: bool = False, snat: bool = True,
                 advertise_exit_node: bool = False, exit_node: str | None = None,
                 allow_lan_access: bool = False) -> None:
        self.ifname = ifname
        self.advertised = sorted({str(ipaddress.ip_network(r, strict=False))
                                  for r in advertise_routes}
                                 | (set(EXIT_ROUTES) if advertise_exit_node else set()))
        self.accept_routes, self.snat = accept_routes, snat
        self.exit_node, self.allow_lan_access = exit_node, allow_lan_access
        self.exit_id: int | None = None  #: the peer our default route goes through now
        self._exit = Journal(state_dir / "host-exit.json")
        self._router = Journal(state_dir / "host-router.json")

    def start(self, me: nm.NodeInfo) -> None:
        """Undo a crashed run's changes, then forward (and masquerade) as a router."""
        self.stop()
        if self.advertised:
            enable_router(self._router, self.ifname, self.advertised,
                          (f"{me.ipv4}/10", f"{me.ipv6}/48"), self.snat)

    def stop(self) -> None:
        self._exit.undo()
        self.exit_id = None
        self._router.undo()

    def exit_peer(self, netmap: nm.Netmap) -> int | None:
        """The id of the chosen exit node, if it is in the netmap and offers ``/0``."""
        if self.exit_node is None:
            return None
        for p in netmap.peers.values():
            if self.exit_node in (p.name, p.ipv4, p.ipv6) and any(map(is_exit, p.routes)):
                return p.id
        log.warning("exit node %r is not in the netmap or offers no exit", self.exit_node)
        return None

    def allowed_ips(self, peer: nm.Peer, exit_id: int | None) -> tuple[str, ...]:
        return peer_allowed_ips(peer, accept_routes=self.accept_routes, exit_node=exit_id)

    def sync_exit(self, exit_id: int | None, control_url: str, relay_map: nm.RelayMap) -> None:
        """Route the default through ``exit_id`` (its peer config carries ``/0`` by now), or
        take that routing out; the host's routes and rules return exactly to before."""
        if exit_id == self.exit_id:
            return
        self._exit.undo()
        self.exit_id = None
        if exit_id is not None:
            lan = () if self.allow_lan_access else _lan_prefixes(self.ifname)
            route_via_exit(self._exit, self.ifname, _underlay(control_url, relay_map), lan)
            self.exit_id = exit_id
