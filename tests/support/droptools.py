"""A real file-drop peer API on loopback, and a hand-made PUT, for the drop tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from wgmesh.drop.protocol import PeerIdentity
from wgmesh.drop.sender import Connection, read_response
from wgmesh.drop.server import PeerAPIServer
from wgmesh.keys import PrivateKey
from wgmesh.loopthread import LoopThread

BOB = PeerIdentity("bob", PrivateKey.generate().public)


class LoopServer:
    """A real PeerAPIServer on 127.0.0.1 in a background loop (as the Node runs it)."""

    def __init__(self, inbox: Path, addresses: tuple[str, ...] = ("127.0.0.1",),
                 **kw: object) -> None:
        self.thread = LoopThread("peer-api-test")
        kw.setdefault("identify", lambda ip: BOB)
        kw.setdefault("authorize", lambda who: True)
        kw.setdefault("port", 0)
        cls: type[PeerAPIServer] = kw.pop("server_class", PeerAPIServer)  # type: ignore[assignment]
        self.server = cls(inbox, list(addresses), **kw)  # type: ignore[arg-type]
        try:
            self.thread.call(self.server.start(), 30)
        except BaseException:
            self.thread.stop()
            raise

    def close(self) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if self.thread.loop.is_closed():
            return
        self.thread.call(self.server.close(), 30)
        self.thread.stop()


def raw_put(port: int, q: dict[str, object], body: bytes, *, host: str = "127.0.0.1",
            netns: str | None = None, midway: Callable[[], None] | None = None,
            ) -> tuple[int, dict[str, object]]:
    """A hand-made PUT (any name, any framing); ``midway`` runs after half the body."""
    c = Connection(host, port, 30, netns)
    try:
        c.putrequest("PUT", f"/v1/files?{urlencode(q)}")
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        half = len(body) // 2
        with contextlib.suppress(OSError):  # refused mid-stream: the answer is still there
            c.send(body[:half])
            if midway is not None:
                midway()
            c.send(body[half:])
        return read_response(c)
    finally:
        c.close()
