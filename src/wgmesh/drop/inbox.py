"""The receiving end of a file drop on disk: ``state_dir/inbox``.

Files arrive into a resume area (``inbox/.partial``), named by a hash of who
sent what, and appear in the inbox only by an atomic hard link once their
digest checks out, so a name in the inbox is always a complete file; a clash
gets a ``name (1).ext`` suffix instead of overwriting, because ``link(2)``
never replaces. Publishing checks the name again (:func:`~wgmesh.drop.protocol.check_name`),
whoever calls, so nothing but one portable path component ever lands here.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from wgmesh.drop.protocol import check_name
from wgmesh.errors import WgmeshError

__all__ = ["Inbox", "InboxFile", "suffixed"]

PARTIAL_DIR = ".partial"


def suffixed(name: str, n: int) -> str:
    """``report.tar.gz`` -> ``report (n).tar.gz``: the suffix goes before every extension."""
    if n == 0:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem} ({n}){dot}{ext}"


@attrs.frozen
class InboxFile:
    """A complete file waiting in the inbox."""

    name: str
    size: int
    mtime: float
    path: Path


class Inbox:
    """``state_dir/inbox``: completed files at the top, resumable partials in ``.partial``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.partial_dir = self.dir / PARTIAL_DIR

    def create(self) -> None:
        self.partial_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ---- the resume area -------------------------------------------------------------
    def partial_path(self, sender: str, name: str, size: int, sha256: str) -> Path:
        """Where this exact offer (sender, name, size, digest) accumulates.

        Keyed by all four, so a changed file or another sender never resumes
        onto the wrong bytes; the name starts with the sender's tag, so what one
        sender holds here can be counted (:meth:`sender_usage`).
        """
        key = hashlib.sha256(f"{sender}\0{name}\0{size}\0{sha256}".encode()).hexdigest()[:32]
        return self.partial_dir / f"{_sender_tag(sender)}-{key}.part"

    def usage(self, exclude: Path | None = None) -> int:
        """Bytes held: completed files plus partials (except ``exclude``)."""
        return _bytes_in(self.dir, exclude) + _bytes_in(self.partial_dir, exclude)

    def sender_usage(self, sender: str, exclude: Path | None = None) -> int:
        """Bytes of partials from ``sender`` (except ``exclude``)."""
        return _bytes_in(self.partial_dir, exclude, prefix=_sender_tag(sender) + "-")

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def prune_partials(self, max_age: float, now: float | None = None,
                       keep: Iterable[Path] = ()) -> int:
        """Delete partials untouched for ``max_age`` seconds, except ``keep`` (being
        written); returns how many."""
        now = time.time() if now is None else now
        busy = {str(k) for k in keep}
        n = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.partial_dir) as it:
            for e in it:
                if (e.is_file(follow_symlinks=False) and e.path not in busy
                        and now - e.stat(follow_symlinks=False).st_mtime > max_age):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        n += 1
        return n

    def commit(self, partial: Path, name: str) -> Path:
        """Publish a verified partial as ``name`` (or ``name (n)``) and drop the partial."""
        final = link_no_replace(partial, self.dir, check_name(name))
        os.unlink(partial)
        _fsync_dir(self.dir)
        return final

    # ---- for the person receiving ----------------------------------------------------
    def list(self) -> list[InboxFile]:
        """Complete files, oldest first. Partials and hidden names never show."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dir) as it:
            for e in it:
                if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.append(InboxFile(e.name, st.st_size, st.st_mtime, Path(e.path)))
        return sorted(out, key=lambda f: (f.mtime, f.name))

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> builtins.list[InboxFile]:
        """Block until the inbox holds a file (or ``timeout`` passes); returns :meth:`list`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (files := self.list()):
            if deadline is not None and time.monotonic() >= deadline:
                return []
            time.sleep(poll)
        return files

    def move_to(self, dest: str | os.PathLike[str],
                files: Iterable[InboxFile] | None = None) -> builtins.list[Path]:
        """Move files (default: all) into ``dest``, never overwriting; returns the new paths.

        Same file system: a hard link, then the inbox name goes. Across file
        systems: a copy under a hidden temporary name first, so ``dest`` never
        shows a half-copied file either. Nothing already in ``dest`` is followed
        or replaced: links never replace, and the temporary file is made afresh
        (``O_EXCL``) under a random name, so a symlink planted there is no way out.
        """
        dest = Path(dest)
        moved = []
        for f in self.list() if files is None else files:
            try:
                target = link_no_replace(f.path, dest, f.name)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                tmp = _copy_exclusive(f.path, dest)
                try:
                    target = link_no_replace(tmp, dest, f.name)
                finally:
                    tmp.unlink()
            f.path.unlink()
            moved.append(target)
        return moved


def _sender_tag(sender: str) -> str:
    return hashlib.sha256(sender.encode()).hexdigest()[:16]


def _bytes_in(d: Path, exclude: Path | None, prefix: str = "") -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(d) as it:
        for e in it:
            if (e.name.startswith(prefix) and e.is_file(follow_symlinks=False)
                    and Path(e.path) != exclude):
                total += e.stat(follow_symlinks=False).st_size
    return total


def _copy_exclusive(src: Path, directory: Path) -> Path:
    """Copy ``src`` to a new hidden file in ``directory`` (created, never opened)."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".wgmesh-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def link_no_replace(src: Path, directory: Path, name: str) -> Path:
    """Hard-link ``src`` into ``directory`` as ``name``, suffixing on a clash."""
    for n in range(10_000):
        target = directory / suffixed(name, n)
        try:
            os.link(src, target, follow_symlinks=False)
            return target
        except FileExistsError:
            continue
    raise WgmeshError(f"{directory}: too many files named like {name!r}")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
