"""Helpers shared by the kernel-backend tests (tests/test_kernel_*.py)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from wgmesh import stun
from wgmesh.wireguard.netns import socket_in

T = TypeVar("T")


class StunResponder:
    """A STUN Binding server on UDP ``port`` (IPv4 and IPv6) inside ``netns``, on a thread;
    ``seen`` records every request's source address as the server observed it."""

    def __init__(self, netns: str, port: int = stun.DEFAULT_PORT) -> None:
        self.seen: list[tuple[str, int]] = []
        self._socks = []
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket_in(netns, family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            self._socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="stun-responder")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.2)
            for s in ready:
                data, addr = s.recvfrom(2048)
                src = (addr[0], addr[1])
                reply = stun.binding_response(data, src)
                if reply is not None:
                    self.seen.append(src)
                    s.sendto(reply, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> StunResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stun_query(send: Callable[[bytes], None], recv: Callable[[float], tuple[bytes, object] | None],
               timeout: float = 10.0) -> tuple[str, int]:
    """One Binding transaction over ``send``/``recv``; the reflexive address."""
    txid = stun.new_txid()
    deadline = time.monotonic() + timeout
    send(stun.encode_binding_request(txid))
    while time.monotonic() < deadline:
        got = recv(max(0.0, deadline - time.monotonic()))
        if got is None:
            break
        with contextlib.suppress(stun.StunError):
            return stun.parse_binding_response(got[0], txid)
    raise AssertionError("no STUN reply")
