"""The pure part of moving a node's connection between relay workers: the handoff message
(round trip, and any bytes either decode or raise HandoffError), the choice of which end of
a crossing pair moves, and the caps counting a moved connection over them."""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import socket
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polling import wait_for

from wgmesh.keys import PrivateKey
from wgmesh.relay import FrameDecoder, FrameType, encode_frame, frame_send
from wgmesh.relaynet.admission import LocalAdmission, SharedAdmission
from wgmesh.relaynet.handoff import (
    MAX_KEYS,
    MAX_MESSAGE,
    Handoff,
    HandoffError,
    decode,
    encode,
    partner,
)
from wgmesh.relaynet.server import RelayServer

pytestmark = pytest.mark.unit

keys = st.binary(min_size=32, max_size=32)
handoffs = st.builds(Handoff, keys, st.booleans(), st.binary(max_size=2000),
                     st.lists(keys, max_size=5).map(tuple), st.lists(keys, max_size=5).map(tuple))


@given(handoffs)
@settings(max_examples=300, deadline=None)
def test_a_handoff_round_trips(h: Handoff) -> None:
    assert decode(encode(h)) == h


@given(st.binary(max_size=400))
@settings(max_examples=1000, deadline=None)
def test_any_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        h = decode(data)
    except HandoffError:
        return
    assert encode(h) == data  # what decodes is exactly one handoff


@given(handoffs, st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=3))
@settings(max_examples=300, deadline=None)
def test_a_damaged_handoff_is_refused(h: Handoff, at: int, junk: bytes) -> None:
    data = encode(h)
    at %= len(data)
    for bad in (data[:at], data + junk, data[:4].replace(b"WGH1", b"WGH2") + data[4:]):
        with pytest.raises(HandoffError):
            decode(bad)


def test_a_full_handoff_fits_its_bound() -> None:
    """The receiver reads MAX_MESSAGE bytes: the largest handoff (every remembered key,
    the largest frame read all but its last byte) fits."""
    frame = frame_send(PrivateKey.generate().public, bytes(64 * 1024))
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == [] and dec.pending == frame[:-1]
    big = Handoff(bytes(32), True, dec.pending, (bytes(32),) * (MAX_KEYS + 7),
                  (bytes(32),) * MAX_KEYS)
    data = encode(big)
    assert len(data) <= MAX_MESSAGE
    back = decode(data)
    assert len(back.interest) == MAX_KEYS and back.pending == frame[:-1]
    # the bytes carried over finish the frame in a fresh decoder
    fresh = FrameDecoder()
    assert fresh.feed(back.pending) == [] and fresh.feed(frame[-1:])[0][0] == FrameType.SEND
    assert FrameDecoder().pending == b"" and len(encode_frame(FrameType.KEEPALIVE)) == 5


LOW, HIGH, THIRD = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
NODE = PrivateKey.generate().public.raw


def test_exactly_one_end_of_a_crossing_pair_moves() -> None:
    """Both workers see the pair's packets (each for its own end, both directions); the end
    with the smaller key moves to the other's worker, the other stays."""
    assert partner(LOW, {HIGH: 900}, 1000, 500) == HIGH
    assert partner(HIGH, {LOW: 900}, 1000, 500) is None
    # one direction only: the receiving end's worker counts the same packets for it
    assert partner(HIGH, {LOW: 600}, 600, 500) is None
    assert partner(LOW, {HIGH: 600}, 600, 500) == HIGH


def test_who_does_not_move() -> None:
    assert partner(LOW, {}, 5000, 500) is None  # nothing crossed
    assert partner(LOW, {HIGH: 499}, 499, 500) is None  # too little to be worth it
    # a hub: most of its traffic is with others (on its own worker or spread out)
    assert partner(LOW, {HIGH: 600}, 1200, 500) is None
    assert partner(LOW, {HIGH: 600, THIRD: 600}, 1200, 500) is None  # half is not most
    # the busiest crossing peer is the one it joins
    assert partner(LOW, {HIGH: 300, THIRD: 900}, 1250, 100) == THIRD


def test_a_moved_connection_counts_over_the_caps() -> None:
    """It was admitted once; the worker it moves to counts it even at the caps, and the
    one it left releases it, so the relay's total stays right."""
    caps = SharedAdmission(2, 2, 2)
    other = copy.copy(caps)
    caps.become(0)
    other.become(1)
    assert caps.admit("192.0.2.1") is None and caps.admit("192.0.2.1") is None
    assert other.admit("192.0.2.1") == "too_many_connections"
    assert other.admit("192.0.2.1", force=True) is None  # moved here from worker 0
    caps.release("192.0.2.1")  # ... and released there
    assert caps.connections == other.connections == 2
    assert other.admit("192.0.2.2") == "too_many_connections"
    local = LocalAdmission(1, 1)
    assert local.admit("x") is None and local.admit("x") == "too_many_connections"
    assert local.admit("x", force=True) is None and local.connections == 2


def test_a_worker_adopts_a_handed_connection_and_refuses_anything_else() -> None:
    """A relay worker on its handoff channel: a TCP connection with the start of a frame
    is adopted (the node's next bytes finish that frame and it is answered on the same
    connection; it counts against the caps once, and leaves them when it hangs up); junk,
    a message without a connection or with two, and a socket that is not TCP are each
    refused, counted, and their descriptors closed."""
    async def main() -> None:
        srv = RelayServer(host="127.0.0.1", port=0)
        await srv.start()
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        here.setblocking(False)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"\0wgmesh-test-handoff-{secrets.token_hex(4)}")
        listener.listen()
        listener.setblocking(False)
        await srv.serve_siblings(listener, secrets.token_bytes(32), [], handoff=[here])
        loop = asyncio.get_running_loop()

        async def until(pred: Callable[[], bool], what: str) -> None:
            await asyncio.to_thread(wait_for, pred, 10, what, 0.01)

        unix_a, unix_b = socket.socketpair()
        good = encode(Handoff(NODE))
        refused = [(b"junk", [unix_a.fileno()]), (good, []),
                   (good, [unix_a.fileno(), unix_b.fileno()]), (good, [unix_a.fileno()])]
        open_fds = len(os.listdir("/proc/self/fd"))
        for msg, fds in refused:
            socket.send_fds(there, [msg], fds)
        await until(lambda: srv.drops["bad_handoff"] == len(refused), "each refused")
        # the copies the relay received are closed (same process: counted, not looked up)
        assert len(os.listdir("/proc/self/fd")) == open_fds
        assert srv.metrics()["clients"] == 0 and srv.admission.connections == 0
        # a TCP connection handed over in the middle of a PING frame
        with socket.create_server(("127.0.0.1", 0)) as ls:
            node = socket.create_connection(ls.getsockname())
            relay_end, _ = ls.accept()
        ping = encode_frame(FrameType.PING, b"12345678")
        socket.send_fds(there, [encode(Handoff(NODE, pending=ping[:3]))], [relay_end.fileno()])
        relay_end.close()
        await until(lambda: srv.counters["clients_moved_in"] == 1, "adopted")
        assert srv.metrics()["clients"] == 1 and srv.admission.connections == 1
        await loop.sock_sendall(node, ping[3:])
        node.setblocking(False)
        reply = b""
        while len(reply) < len(ping):
            reply += await loop.sock_recv(node, 64)
        assert reply == encode_frame(FrameType.PONG, b"12345678")
        node.close()
        await until(lambda: srv.metrics()["clients"] == 0, "gone when it hangs up")
        assert srv.admission.connections == 0
        await srv.close()
        for s in (here, there, listener, unix_a, unix_b):
            s.close()

    asyncio.run(asyncio.wait_for(main(), 60))
