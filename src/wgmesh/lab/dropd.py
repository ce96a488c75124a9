"""``python -m wgmesh.lab.dropd serve``: a peer API on a plain WireGuard interface, no Node.

For labs, benchmarks and wg-quick setups: identities come straight from the
interface's own configuration (``wg show IFACE allowed-ips``), which is exactly
what cryptokey routing enforces, so this is the same trust the Node gives
through its netmap. Files are sent to it with ``python -m wgmesh.cli.file send``
(the ``wgmesh file`` commands without the node agent).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from wgmesh.drop.protocol import DEFAULT_PORT, Identify, PeerIdentity
from wgmesh.drop.server import PeerAPIServer
from wgmesh.keys import Key

__all__ = ["interface_addresses", "main", "wg_identify"]


def _wg_allowed_ips(ifname: str) -> dict[Key, list[str]]:
    out = subprocess.run(["wg", "show", ifname, "allowed-ips"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    peers = {}
    for line in out.splitlines():
        key, _, ips = line.partition("\t")
        peers[Key(key)] = [ip for ip in ips.split() if ip != "(none)"]
    return peers


def wg_identify(ifname: str, names: Mapping[Key, str], ttl: float = 1.0) -> Identify:
    """``identify`` from a live WireGuard interface: the peer whose allowed IPs hold the address.

    The config is re-read at most every ``ttl`` seconds, so ``wg set`` changes
    apply quickly. Unnamed peers are called by their short key.
    """
    read_at = -ttl
    allowed: dict[Key, list[str]] = {}

    def identify(remote_ip: str) -> PeerIdentity | None:
        nonlocal read_at, allowed
        if time.monotonic() - read_at > ttl:
            read_at, allowed = time.monotonic(), _wg_allowed_ips(ifname)
        ip = ipaddress.ip_address(remote_ip)
        best: tuple[int, Key] | None = None
        for key, cidrs in allowed.items():
            for c in cidrs:
                net = ipaddress.ip_network(c, strict=False)
                if ip in net and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, key)
        if best is None:
            return None
        return PeerIdentity(names.get(best[1], best[1].short()), best[1])

    return identify


def interface_addresses(ifname: str) -> list[str]:
    """The global addresses on ``ifname`` (the tunnel addresses to listen on)."""
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", ifname], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])
            if a.get("scope") == "global"]


async def _serve(a: argparse.Namespace) -> None:
    names = {Key(k): n for n, k in (s.split("=", 1) for s in a.name)}
    allowed = set(a.allow)
    server = PeerAPIServer(
        f"{a.state_dir}/inbox", a.address or interface_addresses(a.interface),
        identify=wg_identify(a.interface, names),
        authorize=lambda who: a.allow_all or who.name in allowed,
        port=a.port, interface=a.interface, quota=a.quota, reserve=a.reserve,
        fsync=not a.no_fsync)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"peer API listening on {', '.join(server.addresses)} port {server.port}",
              flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.lab.dropd", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a peer API on a WireGuard interface")
    s.add_argument("--interface", required=True, help="the WireGuard interface")
    s.add_argument("--state-dir", required=True, help="files land in STATE_DIR/inbox")
    s.add_argument("--address", action="append", default=[],
                   help="tunnel address to listen on (default: the interface's)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--name", action="append", default=[], metavar="NAME=KEY",
                   help="call the peer with public key KEY by NAME")
    s.add_argument("--allow", action="append", default=[], metavar="NAME",
                   help="this peer may send files (repeatable)")
    s.add_argument("--allow-all", action="store_true", help="every peer may send files")
    s.add_argument("--quota", type=int, default=None, help="inbox quota in bytes")
    s.add_argument("--reserve", type=int, default=64 << 20, help="bytes of disk left free")
    s.add_argument("--no-fsync", action="store_true", help="skip fsync before publishing")
    asyncio.run(_serve(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

