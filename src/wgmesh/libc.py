"""The C library this process runs on, for the few calls Python's ``os`` and ``socket``
lack (``setns``, ``recvmmsg``, ``connect(AF_UNSPEC)``, ``prctl``, ``mallopt``).

One handle, loaded once, with ``errno`` kept per call so a failure can be reported as
the :class:`OSError` Python's own wrappers would raise."""

from __future__ import annotations

import ctypes
import os

__all__ = ["LIBC", "errno_error"]

LIBC = ctypes.CDLL(None, use_errno=True)


def errno_error(what: str = "") -> OSError:
    """The :class:`OSError` for the ``errno`` the last failed :data:`LIBC` call left."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}" if what else os.strerror(err))
