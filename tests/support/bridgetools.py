"""Two relay bridges joined by a TCP PipeTransport, on an asyncio loop thread:
the relay stand-in of the kernel tests and of benchmarks/kernel_overhead.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from wgmesh.keys import Key
from wgmesh.loopthread import LoopThread
from wgmesh.wireguard.netns import socket_in
from wgmesh.wireguard.proxy import PipeTransport, RelayBridge

T = TypeVar("T")


class BridgePair:
    """Bridge A (netns ``ns_a``, kernel port ``port_a``, node key ``key_a``) and bridge B,
    linked by one TCP connection from ``ns_a`` to ``ip_b``:``tcp_port`` in ``ns_b``;
    ``batched=False``: both read the kernel's datagrams one ``recv`` each (the fallback)."""

    def __init__(self, ns_a: str, port_a: int, key_a: Key, ns_b: str, port_b: int, key_b: Key,
                 ip_b: str, tcp_port: int = 7000, *, batched: bool = True) -> None:
        self._loop_thread = LoopThread("bridge-loop")
        self.loop = self._loop_thread.loop
        listener = socket_in(ns_b, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((ip_b, tcp_port))
        listener.listen(1)
        client = socket_in(ns_a, socket.AF_INET, socket.SOCK_STREAM)
        client.connect((ip_b, tcp_port))
        server, _ = listener.accept()
        listener.close()
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)

        async def setup() -> tuple[Any, ...]:
            ra, wa = await asyncio.open_connection(sock=client)
            rb, wb = await asyncio.open_connection(sock=server)
            ta = PipeTransport(ra, wa, key_a, lambda k, p: self.a.deliver(k, p))
            tb = PipeTransport(rb, wb, key_b, lambda k, p: self.b.deliver(k, p))
            ta.start()
            tb.start()
            return ta, tb

        self.ta, self.tb = self.call(setup())
        self.a = RelayBridge(self.loop, self.ta.send, port_a, netns=ns_a, batched=batched)
        self.b = RelayBridge(self.loop, self.tb.send, port_b, netns=ns_b, batched=batched)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop_thread.call(coro, 30)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()
        return self.call(run())

    def close(self) -> None:
        def shut() -> None:
            for x in (self.a, self.b, self.ta, self.tb):
                x.close()
        self.on_loop(shut)
        self._loop_thread.stop()

    def __enter__(self) -> BridgePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
