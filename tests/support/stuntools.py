"""STUN for tests: blocking Binding queries, and the relay's own responder in a namespace.

The product's STUN client is sans-I/O (:class:`wgmesh.stun.BindingTransaction`)
and its drivers are asyncio; tests often hold a plain socket or a
:class:`~wgmesh.wireguard.sharedsock.SharedSocket`, so :func:`exchange` drives a
transaction over any blocking ``send``/``recv`` pair.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator

from wgmesh import stun
from wgmesh.loopthread import LoopThread
from wgmesh.relaynet.stunserver import StunResponder
from wgmesh.wireguard.netns import socket_in

Send = Callable[[bytes], None]
#: ``recv(timeout)``: one datagram as ``(data, source)``, or ``None`` after ``timeout`` s.
Recv = Callable[[float], tuple[bytes, object] | None]


def exchange(send: Send, recv: Recv, *, rto: float = 0.1, max_sends: int = 5,
             last_wait_factor: float = 16.0) -> tuple[stun.Address, float]:
    """One Binding transaction with RFC 8489 retransmissions: ``(reflexive address, rtt)``.

    Datagrams that are not the reply are discarded. Raises :class:`~wgmesh.stun.StunError`
    when no reply comes.
    """
    tx = stun.BindingTransaction(time.monotonic(), secrets.token_bytes(stun.TXID_LEN), rto=rto,
                                 max_sends=max_sends, last_wait_factor=last_wait_factor)
    send(tx.request)
    while not tx.done:
        now = time.monotonic()
        deadline = tx.next_deadline or now  # only None once done
        if now >= deadline:
            again = tx.on_timeout(now)
            if again is not None:
                send(again)
            continue
        got = recv(deadline - now)
        if got is not None:
            tx.receive(got[0], time.monotonic())
    if tx.result is None:
        raise stun.StunError("no STUN reply")
    return tx.result, tx.rtt or 0.0


def query(server: stun.Address, *, sock: socket.socket | None = None, rto: float = 0.1,
          max_sends: int = 5) -> tuple[stun.Address, float]:
    """:func:`exchange` with ``server`` over a UDP socket: ``sock`` (e.g. a port whose
    mapping you want; left open) or a fresh one."""
    own = sock is None
    if sock is None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    old_timeout = sock.gettimeout()

    def recv(timeout: float) -> tuple[bytes, object] | None:
        sock.settimeout(max(timeout, 1e-3))
        try:
            return sock.recvfrom(2048)
        except TimeoutError:
            return None

    try:
        return exchange(lambda d: sock.sendto(d, server), recv, rto=rto, max_sends=max_sends)
    finally:
        if own:
            sock.close()
        else:
            sock.settimeout(old_timeout)


def stun_query(send: Send, recv: Recv, timeout: float = 10.0) -> stun.Address:
    """One request, no retransmission (so the replies can be counted): the reflexive
    address, or an AssertionError after ``timeout`` seconds."""
    try:
        return exchange(send, recv, rto=timeout, max_sends=1, last_wait_factor=1.0)[0]
    except stun.StunError as e:
        raise AssertionError(str(e)) from None


@contextlib.contextmanager
def stun_server(netns: str | None = None, port: int = stun.DEFAULT_PORT
                ) -> Iterator[collections.Counter[str]]:
    """The relay's :class:`StunResponder` on UDP ``port``, IPv4 and IPv6, inside ``netns``,
    on a loop thread; yields its counters (``stun_replies``: requests answered)."""
    counters: collections.Counter[str] = collections.Counter()
    thread = LoopThread("stun-server")
    socks: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket_in(netns, family, socket.SOCK_DGRAM)
            socks.append(s)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            thread.call(StunResponder.listen(sock=s, counters=counters), 10)
        yield counters
    finally:
        thread.stop()
        for s in socks:
            s.close()
