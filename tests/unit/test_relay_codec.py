"""Relay frame codec and handshake (sans-I/O), with fuzzing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import (
    MAGIC,
    MAX_FRAME,
    MAX_PACKET,
    FrameDecoder,
    FrameError,
    FrameType,
    RelayURL,
    encode_frame,
    frame_client_hello,
    frame_forward,
    frame_peer,
    frame_recv,
    frame_send,
    frame_server_hello,
    open_client_hello,
    parse_forward,
    parse_peer,
    parse_server_hello,
    split_key,
)
from wgmesh.relaynet.client import HomeSelector, regions_of

pytestmark = pytest.mark.unit

SERVER = PrivateKey.generate()
NODE = PrivateKey.generate()


def test_frames_round_trip_in_any_chunking() -> None:
    k = NODE.public
    stream = b"".join([
        frame_send(k, b"hello"), frame_recv(k.raw, b"world"), encode_frame(FrameType.KEEPALIVE),
        frame_forward(k.raw, SERVER.public.raw, b"fwd"),
        frame_peer(FrameType.PEER_GONE, k.raw, 1), frame_peer(FrameType.PEER_PRESENT, k.raw)])
    for step in (1, 3, 7, len(stream)):
        dec = FrameDecoder()
        frames = []
        for i in range(0, len(stream), step):
            frames += dec.feed(stream[i:i + step])
        assert [t for t, _ in frames] == [4, 5, 6, 12, 9, 10]
        assert dec.buffered == 0
    assert split_key(frames[0][1]) == (k.raw, b"hello")
    assert parse_forward(frames[3][1]) == (k.raw, SERVER.public.raw, b"fwd")
    assert parse_peer(FrameType.PEER_GONE, frames[4][1]) == (k, 1)
    assert parse_peer(FrameType.PEER_PRESENT, frames[5][1]) == (k, 0)


def test_oversize_is_rejected_from_the_header_alone() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameError, match="exceeds"):
        dec.feed(bytes((FrameType.SEND,)) + (MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        frame_send(NODE.public, bytes(MAX_PACKET + 1))
    assert len(frame_send(NODE.public, bytes(MAX_PACKET))) == 5 + 32 + MAX_PACKET


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        FrameDecoder().feed(b"\x63\x00\x00\x00\x00")
    with pytest.raises(FrameError):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n")  # HTTP where frames belong


def test_handshake_proves_the_node_key() -> None:
    challenge = bytes(range(32))
    hello = frame_server_hello(SERVER.public, challenge)
    (t, body), = FrameDecoder().feed(hello)
    assert t == FrameType.SERVER_HELLO
    server_key, ch = parse_server_hello(body)
    assert server_key == SERVER.public and ch == challenge
    (t, body), = FrameDecoder().feed(frame_client_hello(NODE, server_key, ch, {"x": 1}))
    got = open_client_hello(SERVER, challenge, body)
    assert got.key == NODE.public and got.info["x"] == 1 and got.mesh_key is None
    # the private key travels nowhere in the hello
    assert NODE.raw() not in body
    # replayed against a fresh challenge: refused
    with pytest.raises(FrameError, match="another challenge"):
        open_client_hello(SERVER, bytes(32), body)


def test_forged_hello_claiming_another_key_fails() -> None:
    victim = PrivateKey.generate().public
    challenge = bytes(32)
    (_, body), = FrameDecoder().feed(frame_client_hello(NODE, SERVER.public, challenge))
    forged = body[:8] + victim.raw + body[40:]
    with pytest.raises(FrameError, match="does not open"):
        open_client_hello(SERVER, challenge, forged)
    with pytest.raises(FrameError, match="magic"):
        open_client_hello(SERVER, challenge, b"XXXXXXXX" + body[8:])
    with pytest.raises(FrameError, match="magic"):
        parse_server_hello(b"NOTRELAY" + bytes(64))


def test_mesh_key_travels_sealed() -> None:
    mesh = bytes(range(32))
    (_, body), = FrameDecoder().feed(
        frame_client_hello(NODE, SERVER.public, bytes(32), {"mesh_key": mesh.hex()}))
    assert mesh.hex().encode() not in body and mesh not in body
    assert open_client_hello(SERVER, bytes(32), body).mesh_key == mesh


def test_relay_url() -> None:
    u = RelayURL.parse("https://relay.example:8443")
    assert (u.tls, u.host, u.port, u.path) == (True, "relay.example", 8443, "/relay")
    assert RelayURL.parse("http://203.0.113.5").port == 80
    assert str(RelayURL.parse("http://[2001:db8::1]:3340/relay")) == "http://[2001:db8::1]:3340/relay"
    assert b"Upgrade: wgmesh-relay" in u.upgrade_request()
    for bad in ("ftp://x", "http://", "http://h:99999"):
        with pytest.raises(WgmeshError):
            RelayURL.parse(bad)


def test_home_selector_hysteresis() -> None:
    sel = HomeSelector(ratio=2 / 3, min_gain=0.001)
    sel.update(1, 0.020)
    sel.update(2, 0.025)
    assert sel.choose() == 1
    sel.update(2, 0.015)  # better, but not by a third: stay
    assert sel.choose() == 1
    sel.update(2, 0.010)  # clearly better: move
    assert sel.choose() == 2
    sel.update(1, 0.0095)  # marginally better: no flap back
    assert sel.choose() == 2
    sel.update(2, None)  # home unreachable: move at once
    assert sel.choose() == 1
    sel.update(1, None)
    assert sel.choose() == 1  # nothing reachable: keep trying the home


def test_regions_of() -> None:
    from wgmesh.netmap import RelayMap, RelayNode, RelayRegion

    rm = RelayMap((RelayRegion(7, "lab", nodes=(RelayNode("a", "http://a:1"),
                                                 RelayNode("b", "http://b:1"))),
                   RelayRegion(8, "empty")))
    assert regions_of(rm) == {7: ["http://a:1", "http://b:1"]}
    assert regions_of(["http://x:1"]) == {1: ["http://x:1"]}
    assert regions_of({3: ["http://y:1"]}) == {3: ["http://y:1"]}


# ---- fuzzing ------------------------------------------------------------------------
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_decoder_raises_only_frame_error(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_frame=1024)
    try:
        for c in chunks:
            for t, body in dec.feed(c):
                assert t in set(FrameType) and len(body) <= 1024
    except FrameError:
        pass
    assert dec.buffered <= 5 + 1024 + 64


@given(st.binary(max_size=300))
def test_fuzz_handshake_parsers(body: bytes) -> None:
    for fn in (lambda: parse_server_hello(body),
               lambda: open_client_hello(SERVER, bytes(32), body),
               lambda: parse_forward(body), lambda: split_key(body),
               lambda: parse_peer(FrameType.PEER_GONE, body),
               lambda: parse_peer(FrameType.PEER_PRESENT, body)):
        with contextlib.suppress(FrameError):
            fn()


@given(st.binary(max_size=2000), st.sampled_from(list(FrameType)))
def test_fuzz_frame_round_trip(body: bytes, t: FrameType) -> None:
    assert FrameDecoder().feed(encode_frame(t, body)) == [(int(t), body)]


@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=5))
def test_fuzz_hello_info_round_trip(info: dict[str, int]) -> None:
    info.pop("v", None)
    (_, body), = FrameDecoder().feed(frame_client_hello(NODE, SERVER.public, bytes(32), info))
    got = open_client_hello(SERVER, bytes(32), body).info
    assert {k: got[k] for k in info} == info
    assert json.dumps(got)
    assert body[:8] == MAGIC
    assert Key.from_raw(body[8:40]) == NODE.public
