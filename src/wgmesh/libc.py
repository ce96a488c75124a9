"""The C library this process runs on, for the few calls Python's ``os`` and ``socket``
lack (``setns``, ``recvmmsg``, ``connect(AF_UNSPEC)``, ``prctl``, ``mallopt``).

One handle, loaded once, with ``errno`` kept per call so a failure can be reported as
the :class:`OSError` Python's own wrappers would raise."""

from __future__ import annotations

import contextlib
import ctypes
import os

__all__ = ["LIBC", "errno_error", "steady_heap"]

LIBC = ctypes.CDLL(None, use_errno=True)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def errno_error(what: str = "") -> OSError:
    """The :class:`OSError` for the ``errno`` the last failed :data:`LIBC` call left."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}" if what else os.strerror(err))


def steady_heap() -> None:
    """Have glibc keep freed heap memory instead of giving it back to the kernel after every
    big free, for a process that streams packets through big socket reads: a relay
    (256 KiB reads, runs of frames of up to 32 KiB) and a node agent receiving from one.
    With glibc's defaults freeing those buffers often shrinks the heap, so the next ones
    are fresh pages the kernel faults in and zeroes one by one (measured: 60,000-120,000
    faults a second in a busy relay process; 90,000-110,000 in a relay client receiving
    150,000-200,000 packets a second; ``benchmarks/README.md``). The price: the process
    keeps up to 8 MiB of freed memory for reuse. Process-wide, so the entry points call
    it (``wgmesh relay serve``, ``wgmesh up``), not the library. Another libc: nothing
    changes."""
    with contextlib.suppress(AttributeError):
        LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # reads of 256 KiB come from the heap
        LIBC.mallopt(_M_TRIM_THRESHOLD, 8 << 20)
