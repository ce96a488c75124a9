"""The region mesh: a relay's outbound links to the other relays of its region.

Each relay dials every other one as a client proving the region's mesh key
(see :mod:`wgmesh.relay`; never sending it), and accepts the link only once
the peer has proved the mesh key too, and the relay key pinned for it by
``#KEY`` in its URL, if any. It learns from PEER_PRESENT/PEER_GONE which
nodes sit there, and sends FORWARD frames for them over that link. The receiving relay
delivers to its own clients only, so a packet crosses at most one mesh hop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key
from wgmesh.relaynet.connection import ConnectionKeeper, OnPeer, RelayConnectError, RelayConnection

__all__ = ["MeshLink", "RegionMesh", "load_mesh_key"]

log = logging.getLogger("wgmesh.relay")

#: Opens an authenticated mesh connection to a URL, reporting presence to ``on_peer``.
Dial = Callable[[str, OnPeer], Awaitable[RelayConnection]]
#: ``(raw node key, present, since)``: a node appeared on, or left, another relay of the
#: region (``since``: when it came, as a worker of the same relay tells it; else 0).
OnRemote = Callable[[bytes, bool, int], None]


def load_mesh_key(path: str | Path) -> bytes:
    """A region's mesh key: at least 32 bytes of hex in a file (``openssl rand -hex 32``)."""
    text = Path(path).read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError as e:
        raise WgmeshError(f"{path}: mesh key must be hex") from e
    if len(raw) < 32:
        raise WgmeshError(f"{path}: mesh key must be at least 32 bytes")
    return raw


class MeshLink(ConnectionKeeper):
    """Our outbound connection to one mesh peer, redialled with backoff: presence in,
    FORWARD out."""

    def __init__(self, mesh: RegionMesh, url: str) -> None:
        self.mesh = mesh
        self.url = url
        self.conn: RelayConnection | None = None
        self.keys: set[bytes] = set()
        self.last_error = ""
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        mesh = self.mesh
        backoff = 0.1
        while True:
            try:
                conn = await mesh.dial(self.url, self._on_peer)
            except RelayConnectError as e:
                if str(e) != self.last_error:  # once per new reason, not once per retry
                    log.warning("mesh peer %s: %s", self.url, e)
                self.last_error = str(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if mesh.own_key is not None and conn.server_key == mesh.own_key:
                conn.close()
                log.info("mesh peer %s is this relay; not meshing with myself", self.url)
                return
            backoff = 0.1
            self.last_error = ""
            self.conn = conn
            mesh.counters[mesh.up_counter] += 1
            await conn.wait_closed()
            self.conn = None
            for k in list(self.keys):
                self._forget(k)

    def _on_peer(self, key: Key, present: bool, reason: int) -> None:
        if present:
            self.keys.add(key.raw)
            self.mesh.remote[key.raw] = self
            self.mesh.on_remote(key.raw, True, reason)
        else:
            self._forget(key.raw)

    def _forget(self, raw: bytes) -> None:
        self.keys.discard(raw)
        if self.mesh.remote.get(raw) is self:
            del self.mesh.remote[raw]
            self.mesh.on_remote(raw, False, 0)


class RegionMesh:
    """The links to the other relays of the region and which node is reachable over which.

    ``dial`` opens a mesh connection (the server's key, mesh key and limits);
    ``own_key`` spots a peer URL that is this relay itself (``None`` for the links
    between the workers of one relay, which share its key); ``on_remote`` hears
    remote nodes come and go; ``counters`` receives ``up_counter`` once per link that came up.
    """

    def __init__(self, dial: Dial, own_key: Key | None, on_remote: OnRemote,
                 counters: collections.Counter[str], up_counter: str = "mesh_links_up") -> None:
        self.dial = dial
        self.up_counter = up_counter
        self.own_key = own_key
        self.on_remote = on_remote
        self.counters = counters
        self.links: list[MeshLink] = []
        self.remote: dict[bytes, MeshLink] = {}

    def add(self, url: str) -> None:
        """Dial one more relay of the region (each relay dials every other one)."""
        self.links.append(MeshLink(self, url))

    def route(self, dst: bytes) -> RelayConnection | None:
        """The live link to the relay where ``dst`` is connected, if any."""
        link = self.remote.get(dst)
        return None if link is None else link.conn

    @property
    def links_up(self) -> int:
        return sum(1 for link in self.links if link.conn is not None)

    async def close(self) -> None:
        for link in self.links:
            await link.close()
