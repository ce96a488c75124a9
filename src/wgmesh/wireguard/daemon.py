"""`wgmesh userspace IFNAME [--foreground]`: a standalone device, like `wireguard-go IFNAME`.

It creates the TUN interface, detaches once it is serving (unless
``--foreground``), and serves UAPI until SIGTERM/SIGINT or until the interface
is deleted (``wg-quick down`` does ``ip link del``). Heavy imports wait until the
command runs, so building the CLI stays cheap.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

__all__ = ["add_parser"]


def _daemonize() -> int | None:
    """Fork; the parent waits for the child to be serving and returns its exit code."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        status = os.read(r, 1)
        return 0 if status == b"1" else 1
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.environ["WGMESH_USERSPACE_READY_FD"] = str(w)
    return None


def _cmd(a: argparse.Namespace) -> int:
    if not a.foreground:
        rc = _daemonize()
        if rc is not None:
            return rc
    from wgmesh.wireguard.backend import BackendError
    from wgmesh.wireguard.uapi import UapiError
    from wgmesh.wireguard.userspace import UserspaceBackend

    dev = UserspaceBackend(a.ifname)
    try:
        dev.start()
    except (BackendError, UapiError, OSError) as e:
        print(f"wgmesh userspace: {e}", file=sys.stderr)
        return 1
    ready = os.environ.pop("WGMESH_USERSPACE_READY_FD", None)
    if ready is not None:
        os.write(int(ready), b"1")
        os.close(int(ready))
        os.dup2(os.open(os.devnull, os.O_RDWR), 2)
    else:
        print(f"wgmesh userspace: {a.ifname} up, UAPI on /var/run/wireguard/{a.ifname}.sock",
              flush=True)

    def stop(signum: int, frame: Any) -> None:
        dev.down()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not dev.wait(1.0):
        pass
    dev.down()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("userspace", help="run a userspace WireGuard interface (like wireguard-go)",
                       description="Create TUN interface IFNAME and serve WireGuard's UAPI on "
                                   "/var/run/wireguard/IFNAME.sock, so `wg` and `wg-quick` "
                                   "manage it.")
    p.add_argument("ifname", metavar="IFNAME")
    p.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    p.set_defaults(func=_cmd)
