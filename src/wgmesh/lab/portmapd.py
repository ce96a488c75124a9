"""Port-mapping NAT routers: the real miniupnpd (Debian's 2.3.1, nftables build) on a router.

Why: the node's port mapping must be proved against the gateway software most
home routers run, not against our own reading of RFC 6887 / RFC 6886 / UPnP-IGD.
:meth:`wgmesh.lab.network.Lab.add_nat` with ``portmap=`` starts one
:class:`MiniUpnpd` per router; this module holds its configuration, firewall
plumbing, reboot and inspection, and the STUN responder miniupnpd needs.

What miniupnpd needs in the lab, and why:

* Its own nft table (the packaged ``nft_init.sh`` does not fit a namespace): a
  forward filter chain and prerouting/postrouting NAT chains that jump to the
  chains miniupnpd fills (``miniupnpd``, ``prerouting_miniupnpd``, ...).
* Routers' WAN addresses are in 198.51.100.0/24, which miniupnpd calls reserved
  and refuses to map for unless ``ext_perform_stun`` finds the address public:
  a STUN server on the lab's internet must answer all four of its probes,
  CHANGE-REQUEST ones included, with the probe's own port. The product's
  responder rightly answers CHANGE-REQUEST with 420, so the lab runs
  :func:`serve_stun` (``python -m wgmesh.lab.portmapd stun IP``), which ignores it
  (as a server with a single address may).
* The router's own STUN probes must leave unNATed (``--random-fully`` would
  change their ports): a POSTROUTING RETURN for the WAN address.
* Inbound packets miniupnpd DNATs must pass the router's FORWARD DROP policy:
  an ACCEPT for conntrack state DNAT.
* miniupnpd 2.3.1's ``enable_natpmp`` serves NAT-PMP and PCP together on UDP
  5351; there is no switch for one of them. A ``pcp`` router therefore rejects
  NAT-PMP requests (first byte 0) and a ``natpmp`` router PCP ones (first byte 2)
  with an iptables u32 match, answering ICMP port unreachable as a gateway
  without that protocol does. Its announcements (miniupnpd multicasts a PCP
  ANNOUNCE when it starts) are left as miniupnpd sends them.

Outbound packets from a mapped port still leave through the router's own NAT
(a fresh port per destination behind ``symmetric``); inbound ones to the mapped
port are what the mapping is for, and replies to them follow that flow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from wgmesh import stun

if TYPE_CHECKING:
    from wgmesh.lab.network import NatRouter, Process

__all__ = ["HTTP_PORT", "PORTMAP_KINDS", "MiniUpnpd", "PortmapKind", "serve_stun"]

PortmapKind = Literal["upnp", "natpmp", "pcp"]
PORTMAP_KINDS: tuple[PortmapKind, ...] = ("upnp", "natpmp", "pcp")
HTTP_PORT = 5000  # UPnP-IGD description and control
PMP_PORT = 5351  # NAT-PMP and PCP
STUN_PORT = 3478
TABLE = "wgmupnp"
_MINIUPNPD_CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")
# u32: skip the IP header (IHL words), read the 4 bytes ending with the first payload byte
# (u32 never reads past the packet, and a NAT-PMP request is 2 bytes) and keep that byte:
# the version, 0 for NAT-PMP, 2 for PCP.
_VERSION_IS = "0>>22&0x3C@5&0xFF={}"
_REJECT_VERSION = {"pcp": 0, "natpmp": 2}
# miniupnpd matches the IPv4 protocol byte raw (offset 72 bits, 8 bits long).
_IP_PROTOCOL = {"base": "nh", "offset": 72, "len": 8}
_PROTOCOLS = {17: "udp", 6: "tcp"}


class MiniUpnpd:
    """miniupnpd serving ``kind`` on ``router``'s LAN, with its files under ``state_dir``."""

    def __init__(self, router: NatRouter, kind: PortmapKind, stun_ip: str,
                 state_dir: Path) -> None:
        if kind not in PORTMAP_KINDS:
            raise ValueError(f"unknown port mapping {kind!r}; choose {', '.join(PORTMAP_KINDS)}")
        self.router, self.kind, self.stun_ip = router, kind, stun_ip
        state_dir.mkdir(parents=True, exist_ok=True)
        self.conf = state_dir / f"{router.name}-miniupnpd.conf"
        self.lease_file = state_dir / f"{router.name}-miniupnpd.leases"
        # Even in the foreground miniupnpd writes a pid file and refuses to start while
        # another's is alive: one per router, not the system's /run/miniupnpd.pid.
        self.pid_file = state_dir / f"{router.name}-miniupnpd.pid"
        self.proc: Process | None = None
        self.reboots = 0

    @property
    def protocols(self) -> tuple[PortmapKind, ...]:
        """The protocols this router answers (exactly the one it was built with)."""
        return (self.kind,)

    @property
    def url(self) -> str:
        """The UPnP root description, for ``upnpc -u URL``."""
        return f"http://{self.router.lan_prefix}.1:{HTTP_PORT}/rootDesc.xml"

    def config(self) -> str:
        upnp = self.kind == "upnp"
        lan = f"{self.router.lan_prefix}.0/24"
        return "\n".join([
            "ext_ifname=eth0", "listening_ip=lan0",
            f"enable_upnp={'yes' if upnp else 'no'}",
            f"enable_natpmp={'no' if upnp else 'yes'}",  # NAT-PMP and PCP both
            "secure_mode=yes",  # a LAN host maps only ports to itself
            "system_uptime=no",  # epoch restarts with the daemon: a "reboot" is visible
            "ipv6_disable=yes", f"http_port={HTTP_PORT}",
            "min_lifetime=120", "max_lifetime=86400",
            f"lease_file={self.lease_file}", f"uuid={uuid.UUID(bytes=secrets.token_bytes(16))}",
            f"upnp_table_name={TABLE}", f"upnp_nat_table_name={TABLE}",
            "ext_perform_stun=yes", f"ext_stun_host={self.stun_ip}",
            f"ext_stun_port={STUN_PORT}",
            f"allow 1024-65535 {lan} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""])

    def start(self) -> None:
        """Write the config, build the nft table and firewall exceptions, start the daemon."""
        r = self.router
        self.conf.write_text(self.config())
        chains = "\n".join(f"  chain {c} {{}}" for c in _MINIUPNPD_CHAINS)
        r.run(["nft", "-f", "-"], input=f"""table inet {TABLE} {{
  chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
  chain prerouting {{ type nat hook prerouting priority -100; policy accept;
                      jump prerouting_miniupnpd; }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept;
                       jump postrouting_miniupnpd; }}
{chains}
}}
""")
        ipt = ["iptables", "-w"]
        rules = [["-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-s", r.ip, "-j",
                  "RETURN"],
                 ["-I", "FORWARD", "1", "-i", "eth0", "-o", "lan0", "-m", "conntrack",
                  "--ctstate", "DNAT", "-j", "ACCEPT"]]
        if self.kind in _REJECT_VERSION:
            rules.append(["-I", "INPUT", "1", "-i", "lan0", "-p", "udp", "--dport",
                          str(PMP_PORT), "-m", "u32", "--u32",
                          _VERSION_IS.format(_REJECT_VERSION[self.kind]), "-j", "REJECT"])
        for rule in rules:
            r.run([*ipt, *rule])
        self._spawn()

    def _spawn(self) -> None:
        self.proc = self.router.spawn(["miniupnpd", "-d", "-f", str(self.conf),
                                       "-P", str(self.pid_file)])
        ready = ("HTTP listening on port" if self.kind == "upnp"
                 else "Listening for NAT-PMP/PCP traffic")
        # STUN takes up to 3 s when a probe goes unanswered.
        self.proc.wait_for_output(ready, timeout=20, stream="stderr")

    def reboot(self) -> None:
        """What a router reboot does to port mapping: daemon restarted, every mapping,
        every conntrack entry and the lease file gone; the epoch starts again at 0."""
        if self.proc is not None:
            self.proc.stop()
        for chain in _MINIUPNPD_CHAINS:
            self.router.run(["nft", "flush", "chain", "inet", TABLE, chain])
        self.router.flush()
        self.lease_file.unlink(missing_ok=True)
        self.reboots += 1
        self._spawn()

    def mappings(self) -> list[tuple[str, int, str, int]]:
        """The redirects miniupnpd has installed: ``(protocol, external port, internal ip,
        internal port)`` with protocol ``udp``/``tcp``, read from its nft chain (what the
        router really forwards)."""
        out = self.router.run(["nft", "-j", "list", "chain", "inet", TABLE,
                               "prerouting_miniupnpd"]).stdout
        found = []
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            proto = dport = dnat = None
            for expr in rule["expr"]:
                payload = expr.get("match", {}).get("left", {}).get("payload", {})
                if payload.get("field") == "dport":
                    dport = expr["match"]["right"]
                elif payload == _IP_PROTOCOL:
                    proto = _PROTOCOLS.get(expr["match"]["right"])
                if "dnat" in expr:
                    dnat = expr["dnat"]
            if proto and dport and dnat:
                found.append((proto, int(dport), str(dnat["addr"]), int(dnat["port"])))
        return found

    def log(self) -> str:
        return self.proc.stderr if self.proc is not None else ""


class _ChangeBlindStun(asyncio.DatagramProtocol):
    """Answers every Binding request from the address it came to, whatever it asks."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            msg = stun.parse(data)
        except stun.StunError:
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            self.transport.sendto(stun.encode_binding_success(msg.txid, (addr[0], addr[1])),
                                  addr)


async def serve_stun(ip: str, port: int = STUN_PORT) -> None:
    """Serve STUN for miniupnpd's probes on ``ip:port`` until cancelled."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_ChangeBlindStun, local_addr=(ip, port))
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.lab.portmapd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stun", help="the STUN responder miniupnpd's probes need")
    s.add_argument("ip")
    a = ap.parse_args(argv)
    asyncio.run(serve_stun(a.ip))


if __name__ == "__main__":
    main(sys.argv[1:])
