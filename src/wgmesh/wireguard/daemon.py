"""A standalone userspace WireGuard interface, like ``wireguard-go IFNAME``.

:func:`serve` creates the TUN interface, detaches once it is serving (unless
``foreground``), and serves UAPI until SIGTERM/SIGINT or until the interface is
deleted (``wg-quick down`` does ``ip link del``). ``wgmesh userspace`` is its
command (:mod:`wgmesh.cli.userspace`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["serve"]


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


def serve(ifname: str, *, foreground: bool = False,
          on_serving: Callable[[], None] | None = None) -> int:
    """Serve ``ifname`` until stopped; returns the exit code.

    Without ``foreground`` the calling process returns once the detached one is serving
    (0) or has failed (1). ``on_serving()`` runs once serving in the foreground. Raises
    :class:`~wgmesh.wireguard.backend.BackendError` or :class:`OSError`
    when the device cannot start (in a detached child, its stderr is still the caller's).
    """
    if not foreground:
        rc = _daemonize()
        if rc is not None:
            return rc
    from wgmesh.wireguard.userspace import UserspaceBackend

    dev = UserspaceBackend(ifname, uapi=True)  # UAPI is what this daemon is for
    dev.start()
    ready = os.environ.pop("WGMESH_USERSPACE_READY_FD", None)
    if ready is not None:
        os.write(int(ready), b"1")
        os.close(int(ready))
        os.dup2(os.open(os.devnull, os.O_RDWR), 2)
    elif on_serving is not None:
        on_serving()

    def stop(signum: int, frame: Any) -> None:
        dev.down()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not dev.wait(1.0):
        pass
    dev.down()
    return 0
