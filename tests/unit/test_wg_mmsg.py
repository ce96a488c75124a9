"""Batched UDP receive (``recvmmsg``) on real loopback sockets: every datagram comes
back whole, in order, one per slot, at most ``batch`` a call; errors surface as
``recv``'s would."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh.wireguard.mmsg import BatchReceiver

pytestmark = pytest.mark.unit

MAX_UDP4 = 65507  # the largest UDP payload over IPv4
SO_RCVBUFFORCE = 33  # Linux


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking receiver on loopback and a sender connected to it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # room for the bursts below even where net.core.rmem_max is the default
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    except PermissionError:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx.connect(rx.getsockname())
    yield rx, tx
    rx.close()
    tx.close()


def drain(r: BatchReceiver, fd: int) -> list[list[bytes]]:
    """Every call's datagrams until one returns none."""
    calls = []
    while got := r.recv(fd):
        calls.append(got)
    return calls


def test_nothing_waiting_is_an_empty_batch(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, _ = pair
    assert BatchReceiver(8).recv(rx.fileno()) == []


def test_edge_sizes_come_back_whole_and_separate(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Empty and maximum-size datagrams beside ordinary ones: none truncated, none
    merged with its neighbour, none lost; 10 datagrams at batch 4 take calls of 4, 4, 2."""
    rx, tx = pair
    sent = [b"", b"\x01" * MAX_UDP4, b"abc", b"", bytes(range(256)) * 5, b"\x02" * MAX_UDP4,
            b"x", b"\x03" * 1440, b"", b"end"]
    for d in sent:
        tx.send(d)
    calls = drain(BatchReceiver(4), rx.fileno())
    assert [len(c) for c in calls] == [4, 4, 2]
    assert [d for c in calls for d in c] == sent


def test_a_pending_icmp_error_is_raised_as_recv_would() -> None:
    """A connected socket whose peer port is closed: the ICMP error is reported once,
    as ``ConnectionRefusedError``, then the socket reads empty again."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        closed.bind(("127.0.0.1", 0))
        s.connect(closed.getsockname())
        closed.close()
        s.setblocking(False)
        s.send(b"to nobody")  # loopback answers with port unreachable at once
        r = BatchReceiver(4)
        with pytest.raises(ConnectionRefusedError):
            r.recv(s.fileno())
        assert r.recv(s.fileno()) == []
    finally:
        s.close()


@settings(max_examples=examples(60), deadline=None)
@given(sizes=st.lists(st.integers(0, 2000), max_size=40),
       big_at=st.lists(st.integers(0, 40), max_size=2), batch=st.integers(1, 16))
def test_any_burst_comes_back_byte_exact_in_order(
        pair: tuple[socket.socket, socket.socket], sizes: list[int], big_at: list[int],
        batch: int) -> None:
    """Bursts of any sizes, up to two of them maximal, at any batch size."""
    rx, tx = pair
    for i in big_at:
        sizes.insert(i, MAX_UDP4)
    sent = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    for d in sent:
        tx.send(d)
    calls = drain(BatchReceiver(batch), rx.fileno())
    assert all(len(c) <= batch for c in calls)
    assert [d for c in calls for d in c] == sent
