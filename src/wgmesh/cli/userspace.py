"""``wgmesh userspace IFNAME [--foreground]``: a standalone userspace WireGuard interface
that ``wg`` and ``wg-quick`` manage (:mod:`wgmesh.wireguard.daemon`). Heavy imports wait
until the command runs, so building the CLI stays cheap."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser"]


def _cmd(a: argparse.Namespace) -> int:
    from wgmesh.wireguard.backend import BackendError
    from wgmesh.wireguard.daemon import serve
    from wgmesh.wireguard.uapi import UapiError

    def announce() -> None:
        print(f"wgmesh userspace: {a.ifname} up, UAPI on /var/run/wireguard/{a.ifname}.sock",
              flush=True)

    try:
        return serve(a.ifname, foreground=a.foreground, on_serving=announce)
    except (BackendError, UapiError, OSError) as e:
        print(f"wgmesh userspace: {e}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``wgmesh userspace``."""
    p = sub.add_parser("userspace", help="run a userspace WireGuard interface (like wireguard-go)",
                       description="Create TUN interface IFNAME and serve WireGuard's UAPI on "
                                   "/var/run/wireguard/IFNAME.sock, so `wg` and `wg-quick` "
                                   "manage it.")
    p.add_argument("ifname", metavar="IFNAME")
    p.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    p.set_defaults(func=_cmd)
