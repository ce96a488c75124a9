"""A node's state directory: its keys (0600), identity, pinned control key, and last netmap.

The private keys are made here on first use and never leave this directory.
The cached netmap lets a restarted node configure its peers while the control
service is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from wgmesh import netmap as nm
from wgmesh.control.envelope import ControlKey
from wgmesh.errors import WgmeshError
from wgmesh.keys import PrivateKey, load_or_create_private_key

__all__ = ["LatestSaver", "StateDir"]

log = logging.getLogger("wgmesh.node.state")
T = TypeVar("T")


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    @property
    def node_key(self) -> PrivateKey:
        """The WireGuard private key (made on first use)."""
        return load_or_create_private_key(self.path / "node.key")

    @property
    def disco_key(self) -> PrivateKey:
        """The disco private key, separate from the WireGuard key by design."""
        return load_or_create_private_key(self.path / "disco.key")

    @property
    def inbox(self) -> Path:
        p = self.path / "inbox"
        p.mkdir(exist_ok=True, mode=0o700)
        return p

    def load_secret(self, name: str) -> str | None:
        """A 0600 credential file (e.g. the node token control issued), or None."""
        try:
            return (self.path / name).read_text().strip() or None
        except FileNotFoundError:
            return None

    def save_secret(self, name: str, value: str) -> None:
        _atomic_write(self.path / name, value + "\n")

    def load_identity(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "identity.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def save_identity(self, identity: dict[str, Any]) -> None:
        _atomic_write(self.path / "identity.json", json.dumps(identity, indent=1))

    def load_control_key(self, control_url: str) -> ControlKey | None:
        """The control key pinned for ``control_url`` (None: none yet, e.g. a state dir
        from before control keys, or one that belonged to another control service)."""
        try:
            d = json.loads((self.path / "control.json").read_text())
            return ControlKey.parse(d["key"]) if d.get("url") == control_url else None
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError,
                WgmeshError):
            return None

    def save_control_key(self, control_url: str, key: ControlKey) -> None:
        _atomic_write(self.path / "control.json",
                      json.dumps({"url": control_url, "key": str(key)}))

    def load_netmap(self) -> nm.Netmap | None:
        """The last netmap, or None if absent or unreadable (never half-applied)."""
        try:
            msg = nm.decode((self.path / "netmap.json").read_text())
        except (FileNotFoundError, nm.NetmapFormatError):
            return None
        return msg if isinstance(msg, nm.Netmap) else None

    def save_netmap(self, netmap: nm.Netmap) -> None:
        _atomic_write(self.path / "netmap.json", nm.encode(netmap).decode())


class LatestSaver(Generic[T]):
    """Saves the newest of a stream of values off the event loop, one save at a time.

    A node caches every netmap it gets; encoding 500 peers and the ``fsync`` ran on its
    loop for each one, a netmap change's largest cost after the peer diff. A value
    superseded while an earlier one is being written is skipped: only the newest
    matters for a restart. Call :meth:`submit` on the loop; :meth:`flush` waits for
    the newest to be on disk."""

    def __init__(self, save: Callable[[T], None], what: str = "state") -> None:
        self._save = save
        self._what = what
        self._next: T | None = None
        self._task: asyncio.Task[None] | None = None

    def submit(self, value: T) -> None:
        self._next = value
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while (value := self._next) is not None:
            self._next = None
            try:
                await asyncio.to_thread(self._save, value)
            except OSError as e:  # a full or read-only disk costs the cache, not the node
                log.warning("saving the %s failed: %s", self._what, e)

    async def flush(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)
