"""Sockets inside a named network namespace, without moving the caller.

The kernel backend's helpers (the shared-port raw sockets, the relay bridge's
loopback sockets) must live in the namespace of the WireGuard interface they
serve. A socket stays in the namespace it was created in, and ``setns`` only
moves the calling thread, so a short-lived thread enters the namespace, makes
the socket and exits: the caller and every other thread stay where they are,
and no process is forked.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

__all__ = ["netns_path", "socket_in"]

CLONE_NEWNET = 0x40000000


def netns_path(netns: str) -> str:
    """``ip netns`` names live in /run/netns; an absolute path is taken as is."""
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def socket_in(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A new socket created inside ``netns`` (``None``: the caller's namespace)."""
    if netns is None:
        return socket.socket(family, type, proto)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, type, proto))
        except BaseException as e:  # handed to the caller's thread below
            failed.append(e)

    t = threading.Thread(target=enter_and_create, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return made[0]
