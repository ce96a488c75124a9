"""``python -m wgmesh.lab.dropd``: a peer API on a plain WireGuard interface, without a Node.

For labs, benchmarks and wg-quick setups: identities come straight from the
interface's own configuration (``wg show IFACE allowed-ips``), which is exactly
what cryptokey routing enforces, so this is the same trust the Node gives
through its netmap. ``python -m wgmesh.lab.dropd file send|receive ...`` runs the
CLI commands without the node agent (peers given by tunnel address).
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

from wgmesh.drop import peerapi as drop
from wgmesh.errors import WgmeshError
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


def wg_identify(ifname: str, names: Mapping[Key, str], ttl: float = 1.0) -> drop.Identify:
    """``identify`` from a live WireGuard interface: the peer whose allowed IPs hold the address.

    The config is re-read at most every ``ttl`` seconds, so ``wg set`` changes
    apply quickly. Unnamed peers are called by their short key.
    """
    cache: list[object] = [0.0, {}]

    def identify(remote_ip: str) -> drop.PeerIdentity | None:
        if time.monotonic() - float(cache[0]) > ttl:  # type: ignore[arg-type]
            cache[:] = [time.monotonic(), _wg_allowed_ips(ifname)]
        ip = ipaddress.ip_address(remote_ip)
        best: tuple[int, Key] | None = None
        for key, cidrs in cache[1].items():  # type: ignore[attr-defined]
            for c in cidrs:
                net = ipaddress.ip_network(c, strict=False)
                if ip in net and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, key)
        if best is None:
            return None
        return drop.PeerIdentity(names.get(best[1], best[1].short()), best[1])

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
    server = drop.PeerAPIServer(
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


def _cmd_serve(a: argparse.Namespace) -> int:
    asyncio.run(_serve(a))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.lab.dropd", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a peer API on a WireGuard interface")
    s.add_argument("--interface", required=True, help="the WireGuard interface")
    s.add_argument("--state-dir", required=True, help="files land in STATE_DIR/inbox")
    s.add_argument("--address", action="append", default=[],
                   help="tunnel address to listen on (default: the interface's)")
    s.add_argument("--port", type=int, default=drop.DEFAULT_PORT)
    s.add_argument("--name", action="append", default=[], metavar="NAME=KEY",
                   help="call the peer with public key KEY by NAME")
    s.add_argument("--allow", action="append", default=[], metavar="NAME",
                   help="this peer may send files (repeatable)")
    s.add_argument("--allow-all", action="store_true", help="every peer may send files")
    s.add_argument("--quota", type=int, default=None, help="inbox quota in bytes")
    s.add_argument("--reserve", type=int, default=64 << 20, help="bytes of disk left free")
    s.add_argument("--no-fsync", action="store_true", help="skip fsync before publishing")
    s.set_defaults(func=_cmd_serve)
    drop.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except WgmeshError as e:
        print(f"wgmesh: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
