"""Network namespaces by ``ip netns`` name or path: enter one, or run a call inside one.

The kernel backend's helpers (the shared-port raw sockets, the relay bridge's
loopback sockets, nftables) must act in the namespace of the WireGuard
interface they serve. A socket stays in the namespace it was created in, and
``setns`` only moves the calling thread (and what it starts later), so
:func:`call_in` runs a call on a short-lived thread that enters the namespace:
the caller and every other thread stay where they are, and no process is
forked. :func:`enter` moves the calling thread for good (a node's loop thread).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from wgmesh.libc import LIBC, errno_error

__all__ = ["call_in", "enter", "netns_path", "socket_in"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_path(netns: str) -> str:
    """``ip netns`` names live in /run/netns; an absolute path is taken as is."""
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def enter(netns: str) -> None:
    """Move the calling thread into ``netns``; threads and processes it starts follow.

    Raises :class:`OSError` if the namespace does not exist or cannot be entered.
    """
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            raise errno_error(f"setns({netns})")
    finally:
        os.close(fd)


def call_in(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run inside ``netns`` (``None``: here, on this thread)."""
    if netns is None:
        return fn(*args, **kwargs)
    made: list[T] = []
    failed: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            enter(netns)
            made.append(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller's thread below
            failed.append(e)

    t = threading.Thread(target=enter_and_call, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return made[0]


def socket_in(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A new socket created inside ``netns`` (``None``: the caller's namespace)."""
    return call_in(netns, socket.socket, family, type, proto)
