"""A relay's connection caps: in total and per source, in one process or across workers.

:class:`LocalAdmission` counts in a dict (one relay process). :class:`SharedAdmission`
counts for the worker processes of one relay (``wgmesh relay serve --workers N``) in
memory they share, so the caps stay the relay's whatever worker the kernel hands a
connection to. Each worker writes only its own region: its connection count and a
table of (keyed 64-bit hash of the source, connections) with linear probing and
deletion by backward shift (no tombstones, so the table never fills up with them). A
worker admits under a POSIX record lock after summing every region; the kernel drops
that lock when its holder dies, so a worker killed mid-admission wedges nobody, and the
supervisor clears a dead worker's region before its replacement starts, so its
connections stop counting.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import mmap
import os
import secrets
from typing import Protocol

__all__ = ["Admission", "LocalAdmission", "SharedAdmission"]

TOO_MANY = "too_many_connections"
TOO_MANY_FROM_SOURCE = "too_many_from_source"


class Admission(Protocol):
    """What :class:`~wgmesh.relaynet.server.RelayServer` asks of its caps."""

    def admit(self, source: str, *, force: bool = False) -> str | None:
        """Count one more connection from ``source``; or the drop reason refusing it.
        ``force``: count it over the caps (a connection moved from another worker, which
        the caps admitted once already)."""

    def release(self, source: str) -> None:
        """An admitted connection from ``source`` is gone."""

    @property
    def connections(self) -> int:
        """Connections admitted and not yet released (the whole relay's)."""

    @property
    def sources(self) -> int:
        """Distinct sources among them."""


class LocalAdmission:
    """The caps of a relay that is one process."""

    def __init__(self, max_connections: int, max_per_source: int) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.per_source: collections.Counter[str] = collections.Counter()
        self.connections = 0

    def admit(self, source: str, *, force: bool = False) -> str | None:
        if self.connections >= self.max_connections and not force:
            return TOO_MANY
        if self.per_source[source] >= self.max_per_source and not force:
            return TOO_MANY_FROM_SOURCE
        self.per_source[source] += 1
        self.connections += 1
        return None

    def release(self, source: str) -> None:
        self.connections -= 1
        self.per_source[source] -= 1
        if not self.per_source[source]:
            del self.per_source[source]

    @property
    def sources(self) -> int:
        return len(self.per_source)


class SharedAdmission:
    """The caps of a relay's ``workers`` processes; create before forking them, then
    :meth:`become` the worker's own in each."""

    def __init__(self, workers: int, max_connections: int, max_per_source: int) -> None:
        self.workers = workers
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        # a worker holds at most max_connections sources: at most half the slots full
        self.slots = 1 << max(4, (2 * max_connections - 1).bit_length())
        self.mask = self.slots - 1
        self.stride = 2 + 2 * self.slots  # words per region: [connections, 0, (hash, n)...]
        self._fd = os.memfd_create("wgmesh-relay-admission")
        size = workers * self.stride * 8
        os.ftruncate(self._fd, size)
        self._mem = mmap.mmap(self._fd, size)
        self.words = memoryview(self._mem).cast("Q")
        self._salt = secrets.token_bytes(16)  # sources can't be chosen to collide
        self.worker = -1

    def become(self, worker: int) -> None:
        """This process is worker ``worker``: its connections go into that region."""
        self.worker = worker

    # ---- locking and hashing -------------------------------------------------------------
    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _hash(self, source: str) -> int:
        h = int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8,
                                           key=self._salt).digest(), "big")
        return h or 1  # 0 marks an empty slot

    def _find(self, region: int, h: int) -> int:
        """The word index of ``h``'s slot in ``region``, or of the empty slot ending its
        probe."""
        words, base, i = self.words, region * self.stride + 2, h & self.mask
        while True:
            at = base + 2 * i
            if words[at] in (0, h):
                return at
            i = (i + 1) & self.mask

    # ---- Admission -------------------------------------------------------------------------
    def admit(self, source: str, *, force: bool = False) -> str | None:
        h, words = self._hash(source), self.words
        self._lock()
        try:
            if not force:
                if sum(words[r * self.stride] for r in range(self.workers)) \
                        >= self.max_connections:
                    return TOO_MANY
                if sum(words[self._find(r, h) + 1] for r in range(self.workers)) \
                        >= self.max_per_source:
                    return TOO_MANY_FROM_SOURCE
            at = self._find(self.worker, h)
            words[at] = h
            words[at + 1] += 1
            words[self.worker * self.stride] += 1
            return None
        finally:
            self._unlock()

    def release(self, source: str) -> None:
        h, words = self._hash(source), self.words
        self._lock()
        try:
            at = self._find(self.worker, h)
            if words[at] != h:  # not ours (cannot happen): nothing to release
                return
            words[self.worker * self.stride] -= 1
            words[at + 1] -= 1
            if not words[at + 1]:
                self._delete(at)
        finally:
            self._unlock()

    def _delete(self, at: int) -> None:
        """Empty the slot at word ``at``, shifting later entries of its probe run back so
        every lookup still finds them (Knuth's algorithm R)."""
        words, mask = self.words, self.mask
        base = self.worker * self.stride + 2
        i = j = (at - base) // 2
        while True:
            j = (j + 1) & mask
            hj = words[base + 2 * j]
            if not hj:
                break
            k = hj & mask  # where hj wants to be; it stays if that is cyclically in (i, j]
            if (i < k <= j) if i <= j else (k > i or k <= j):
                continue
            words[base + 2 * i], words[base + 2 * i + 1] = hj, words[base + 2 * j + 1]
            i = j
        words[base + 2 * i] = words[base + 2 * i + 1] = 0

    def clear(self, worker: int) -> None:
        """Forget ``worker``'s connections (it died with them)."""
        self._lock()
        try:
            base = worker * self.stride
            self.words[base:base + self.stride] = memoryview(bytes(self.stride * 8)).cast("Q")
        finally:
            self._unlock()

    @property
    def connections(self) -> int:
        return sum(self.words[r * self.stride] for r in range(self.workers))

    @property
    def sources(self) -> int:
        hashes: set[int] = set()
        for r in range(self.workers):
            base = r * self.stride + 2
            hashes.update(self.words[base:base + 2 * self.slots:2])
        hashes.discard(0)
        return len(hashes)
