"""A real file-drop peer API on loopback, and a hand-made PUT, for the drop tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

from wgmesh.drop import peerapi as drop
from wgmesh.keys import PrivateKey

BOB = drop.PeerIdentity("bob", PrivateKey.generate().public)


class LoopServer:
    """A real PeerAPIServer on 127.0.0.1 in a background loop (as the Node runs it)."""

    def __init__(self, inbox: Path, addresses: tuple[str, ...] = ("127.0.0.1",),
                 **kw: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        kw.setdefault("identify", lambda ip: BOB)
        kw.setdefault("authorize", lambda who: True)
        kw.setdefault("port", 0)
        self.server = drop.PeerAPIServer(inbox, list(addresses), **kw)  # type: ignore[arg-type]
        try:
            self.call(self.server.start())
        except BaseException:
            self.close()
            raise

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def raw_put(port: int, q: dict[str, object], body: bytes, *, host: str = "127.0.0.1",
            netns: str | None = None, midway: Callable[[], None] | None = None,
            ) -> tuple[int, dict[str, object]]:
    """A hand-made PUT (any name, any framing); ``midway`` runs after half the body."""
    from urllib.parse import urlencode

    c = drop._Connection(host, port, 30, netns)
    try:
        c.putrequest("PUT", f"/v1/files?{urlencode(q)}")
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        half = len(body) // 2
        c.send(body[:half])
        if midway is not None:
            midway()
        with contextlib.suppress(OSError):  # refused mid-stream: the answer is still there
            c.send(body[half:])
        return drop._response(c)
    finally:
        c.close()
