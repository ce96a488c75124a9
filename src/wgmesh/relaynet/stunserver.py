"""A STUN Binding responder on one UDP socket: the relay's, and the tests' stand-in server.

All protocol work is :func:`wgmesh.stun.binding_response`; this only moves datagrams
and counts what happened, into counters the owner may share (the relay's
``/metrics`` shows them).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any, cast

from wgmesh import stun

__all__ = ["StunResponder"]


class StunResponder(asyncio.DatagramProtocol):
    """Answers every Binding request with the source address it came from.

    Counts ``stun_requests`` and ``stun_replies`` in :attr:`counters`, and
    ``stun_invalid`` (no reply sent) and ``stun_send_error`` in :attr:`drops`.
    """

    def __init__(self, *, software: str | None = None,
                 counters: collections.Counter[str] | None = None,
                 drops: collections.Counter[str] | None = None) -> None:
        self.software = software
        self.counters = collections.Counter[str]() if counters is None else counters
        self.drops = collections.Counter[str]() if drops is None else drops
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def listen(cls, host: str = "0.0.0.0", port: int = stun.DEFAULT_PORT, *,
                     sock: socket.socket | None = None, **kw: Any) -> StunResponder:
        """Serve on ``host:port`` (0: any free port), or on a bound ``sock`` (e.g. one made
        in another network namespace); ``kw`` as for the constructor."""
        loop = asyncio.get_running_loop()
        addr = None if sock is not None else (host, port)
        _, proto = await loop.create_datagram_endpoint(lambda: cls(**kw), local_addr=addr,
                                                       sock=sock)
        return proto

    @property
    def port(self) -> int:
        """The UDP port served (0 once closed)."""
        if self.transport is None:
            return 0
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport is not a DatagramTransport subclass: cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.counters["stun_requests"] += 1
        reply = stun.binding_response(data, (addr[0], addr[1]), software=self.software)
        if reply is None:
            self.drops["stun_invalid"] += 1
            return
        self.counters["stun_replies"] += 1
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        self.drops["stun_send_error"] += 1
