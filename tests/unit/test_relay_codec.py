"""Relay frame codec and handshake (sans-I/O), with fuzzing."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import (
    MAGIC,
    MAX_FRAME,
    MAX_PACKET,
    NONCE_LEN,
    RUN_BYTES,
    FrameDecoder,
    FrameError,
    FrameType,
    RelayURL,
    SendRun,
    encode_frame,
    frame_client_hello,
    frame_deliver,
    frame_forward,
    frame_peer,
    frame_recv,
    frame_send,
    frame_server_hello,
    frame_server_info,
    open_client_hello,
    open_server_info,
    parse_deliver,
    parse_forward,
    parse_peer,
    parse_server_hello,
    split_frames,
    split_key,
)
from wgmesh.relaynet.admission import SharedAdmission
from wgmesh.relaynet.client import HomeSelector, regions_of

pytestmark = pytest.mark.unit

SERVER = PrivateKey.generate()
NODE = PrivateKey.generate()
NONCE = bytes(range(NONCE_LEN))


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
    (t, body), = FrameDecoder().feed(frame_client_hello(NODE, server_key, ch, {"x": 1}, nonce=NONCE))
    got = open_client_hello(SERVER, challenge, body)
    assert got.key == NODE.public and got.info["x"] == 1 and not got.wants_mesh
    # the private key travels nowhere in the hello
    assert NODE.raw() not in body
    # replayed against a fresh challenge: refused
    with pytest.raises(FrameError, match="another challenge"):
        open_client_hello(SERVER, bytes(32), body)


def test_hello_uses_the_callers_nonce_once() -> None:
    """The nonce is the caller's randomness: it travels in clear, and must be the right size."""
    (_, body), = FrameDecoder().feed(frame_client_hello(NODE, SERVER.public, bytes(32),
                                                       nonce=NONCE))
    assert body[40:40 + NONCE_LEN] == NONCE
    with pytest.raises(FrameError, match="nonce"):
        frame_client_hello(NODE, SERVER.public, bytes(32), nonce=NONCE[1:])


def test_forged_hello_claiming_another_key_fails() -> None:
    victim = PrivateKey.generate().public
    challenge = bytes(32)
    (_, body), = FrameDecoder().feed(frame_client_hello(NODE, SERVER.public, challenge, nonce=NONCE))
    forged = body[:8] + victim.raw + body[40:]
    with pytest.raises(FrameError, match="does not open"):
        open_client_hello(SERVER, challenge, forged)
    with pytest.raises(FrameError, match="magic"):
        open_client_hello(SERVER, challenge, b"XXXXXXXX" + body[8:])
    with pytest.raises(FrameError, match="magic"):
        parse_server_hello(b"NOTRELAY" + bytes(64))


def _server_info(server: PrivateKey, info: dict[str, object] | None = None,
                 mesh: bytes | None = None, nonce: bytes = NONCE) -> bytes:
    """The SERVER_INFO body ``server`` sends NODE in answer to a hello with ``nonce``."""
    (_, hello_body), = FrameDecoder().feed(
        frame_client_hello(NODE, server.public, bytes(32), nonce=nonce))
    hello = open_client_hello(server, bytes(32), hello_body)
    (_, body), = FrameDecoder().feed(frame_server_info(
        server, hello, info or {"x": 1}, nonce=os.urandom(NONCE_LEN), mesh_key=mesh))
    return body


def test_server_proves_its_key() -> None:
    """Only the holder of the relay's private key seals a SERVER_INFO for this very hello."""
    body = _server_info(SERVER)
    assert open_server_info(NODE, SERVER.public, NONCE, body)["x"] == 1
    impostor = _server_info(PrivateKey.generate())  # answers as itself, claims SERVER's key
    with pytest.raises(FrameError, match="did not prove the key"):
        open_server_info(NODE, SERVER.public, NONCE, impostor)
    with pytest.raises(FrameError, match="another hello"):  # an old answer, replayed
        open_server_info(NODE, SERVER.public, bytes(NONCE_LEN), body)
    with pytest.raises(FrameError, match="did not prove"):
        open_server_info(NODE, SERVER.public, NONCE, b"short")


def test_mesh_key_is_proved_never_sent() -> None:
    mesh = bytes(range(32))
    (_, body), = FrameDecoder().feed(
        frame_client_hello(NODE, SERVER.public, bytes(32), nonce=NONCE, mesh_key=mesh))
    # not even sealed: whoever can open the hello (the real relay) learns only a proof
    plain = open_client_hello(SERVER, bytes(32), body)
    assert mesh.hex() not in json.dumps(plain.info) and mesh not in body
    assert plain.wants_mesh and plain.proves_mesh_key(mesh, SERVER.public)
    assert not plain.proves_mesh_key(bytes(32), SERVER.public)  # another region's key
    assert not plain.proves_mesh_key(mesh, NODE.public)  # a proof made for another relay
    # the relay answers with its own proof, which a wrong mesh key does not accept
    info = open_server_info(NODE, SERVER.public, NONCE, _server_info(SERVER, mesh=mesh),
                            mesh_key=mesh)
    assert mesh.hex() not in json.dumps(info)
    for answer in (_server_info(SERVER), _server_info(SERVER, mesh=bytes(32))):
        with pytest.raises(FrameError, match="mesh key"):
            open_server_info(NODE, SERVER.public, NONCE, answer, mesh_key=mesh)


def test_relay_url() -> None:
    u = RelayURL.parse("https://relay.example:8443")
    assert (u.tls, u.host, u.port, u.path) == (True, "relay.example", 8443, "/relay")
    assert RelayURL.parse("http://203.0.113.5").port == 80
    assert str(RelayURL.parse("http://[2001:db8::1]:3340/relay")) == "http://[2001:db8::1]:3340/relay"
    assert b"Upgrade: wgmesh-relay" in u.upgrade_request()
    assert u.key is None
    pinned = RelayURL.parse(f"http://relay.example:3340#{SERVER.public.b64()}")
    assert pinned.key == SERVER.public and str(pinned) == "http://relay.example:3340/relay"
    for bad in ("ftp://x", "http://", "http://h:99999", "http://[::1", "http://[::1]:x",
                "http://h:1#not-a-key"):
        with pytest.raises(WgmeshError, match="relay URL"):
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
                                                 RelayNode("b", "http://b:1",
                                                           key=SERVER.public))),
                   RelayRegion(8, "empty")))
    assert regions_of(rm) == {7: ["http://a:1", f"http://b:1#{SERVER.public.b64()}"]}
    assert RelayURL.parse(regions_of(rm)[7][1]).key == SERVER.public
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
               lambda: open_server_info(NODE, SERVER.public, NONCE, body),
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
    (_, body), = FrameDecoder().feed(frame_client_hello(NODE, SERVER.public, bytes(32), info,
                                                         nonce=os.urandom(NONCE_LEN)))
    got = open_client_hello(SERVER, bytes(32), body).info
    assert {k: got[k] for k in info} == info
    assert json.dumps(got)
    assert body[:8] == MAGIC
    assert Key.from_raw(body[8:40]) == NODE.public


def _sealed_hello(info_bytes: bytes, challenge: bytes = bytes(32)) -> bytes:
    """A CLIENT_HELLO body that opens, carrying ``info_bytes`` verbatim as its info."""
    from nacl.public import Box
    from nacl.public import PublicKey as NaclPublicKey

    sealed = Box(NODE.nacl(), NaclPublicKey(SERVER.public.raw)).encrypt(
        challenge + info_bytes, NONCE)
    return MAGIC + NODE.public.raw + sealed.nonce + sealed.ciphertext


def test_deeply_nested_hello_is_a_frame_error() -> None:
    """Issue 14 item 6: "[[[[..." inside a valid box is refused like any bad hello
    (it used to escape as RecursionError, which the server logged with a traceback)."""
    for deep in (b"[" * 4000, b'[{"":' * 800):
        with pytest.raises(FrameError, match="nested too deeply"):
            open_client_hello(SERVER, bytes(32), _sealed_hello(deep))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=30)
hello_infos = (json_values.map(lambda v: json.dumps(v).encode())
               | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * (n % 3))
               | st.integers(1, 1500).map(lambda n: b'{"k":' * n)
               | st.binary(max_size=200))


@given(hello_infos)
def test_fuzz_server_hello_parsing(info: bytes) -> None:
    """Whatever a key holder seals as its info, the server gets a ClientHello with a dict,
    or a FrameError: never another exception (which would log a traceback)."""
    body = _sealed_hello(info[:4096])
    try:
        hello = open_client_hello(SERVER, bytes(32), body)
    except FrameError:
        return
    assert isinstance(hello.info, dict) and hello.key == NODE.public
    assert hello.wants_mesh == ("mesh_proof" in hello.info)


# ---- the relay's hot path and the workers' frames ------------------------------------------
def _sends(dsts: list[Key], sizes: list[int]) -> list[bytes]:
    return [frame_send(d, bytes([i % 251]) * n) for i, (d, n) in enumerate(zip(dsts, sizes, strict=True))]


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3000)), max_size=40),
       st.integers(1, 5000))
def test_feed_relayed_turns_sends_into_the_recv_frames_each_destination_gets(
        plan: list[tuple[int, int]], step: int) -> None:
    """Whatever the chunking, every SEND comes out once, in order, as the RECV frame the
    relay would have built for it (from the sender's key), grouped in runs of one
    destination; other frames come out as (type, body) between them."""
    keys = [PrivateKey.generate().public for _ in range(3)]
    src = NODE.public.raw
    frames = _sends([keys[d] for d, _ in plan], [n for _, n in plan])
    frames.insert(len(frames) // 2, encode_frame(FrameType.PING, b"12345678"))
    stream = b"".join(frames)
    dec = FrameDecoder()
    items = []
    for i in range(0, len(stream), step):
        items += dec.feed_relayed(stream[i:i + step], src)
    assert dec.buffered == 0
    got, dsts, other = [], [], []
    for item in items:
        if isinstance(item, SendRun):
            parts = split_frames(item.frames)
            assert len(parts) == item.count and len(item.frames) <= max(RUN_BYTES, len(parts[0]))
            assert item.payload == sum(len(p) - 37 for p in parts)
            got += parts
            dsts += [item.dst] * item.count
        else:
            other.append(item)
    want = [frame_recv(src, f[37:]) for f in frames if f[0] == FrameType.SEND]
    assert got == want
    assert dsts == [keys[d].raw for d, _ in plan]
    assert other == [(FrameType.PING, b"12345678")]


def test_feed_relayed_leaves_malformed_sends_to_the_frame_path() -> None:
    short = encode_frame(FrameType.SEND, bytes(31))  # no room for a key
    items = FrameDecoder().feed_relayed(short + frame_send(NODE.public, b"x"), SERVER.public.raw)
    assert items[0] == (FrameType.SEND, bytes(31)) and isinstance(items[1], SendRun)
    with pytest.raises(FrameError):
        FrameDecoder().feed_relayed(b"\x63\x00\x00\x00\x00", SERVER.public.raw)


def test_deliver_and_sibling_presence_round_trip() -> None:
    run = frame_recv(NODE.public.raw, b"a") + frame_recv(NODE.public.raw, b"bc")
    (t, body), = FrameDecoder().feed(frame_deliver(NODE.public.raw, SERVER.public.raw, 2, run))
    assert t == FrameType.DELIVER
    assert parse_deliver(body) == (NODE.public.raw, SERVER.public.raw, 2, run)
    with pytest.raises(FrameError):
        parse_deliver(body[:67])
    (t, body), = FrameDecoder().feed(frame_peer(FrameType.PEER_PRESENT, NODE.public.raw,
                                                since=123456789))
    assert parse_peer(t, body) == (NODE.public, 123456789)
    with pytest.raises(FrameError):
        parse_peer(t, body[:35])


def test_shared_admission_counts_like_one_relay() -> None:
    """The workers' shared caps against a plain count, through random admissions and
    releases on two workers (tiny table: probe runs and backward-shift deletes happen),
    then a dead worker's share cleared."""
    rng = random.Random(7)
    caps = SharedAdmission(2, 8, 3)
    other = copy.copy(caps)  # the second worker's view of the same memory, as after a fork
    caps.become(0)
    other.become(1)
    held: collections.Counter[tuple[int, str]] = collections.Counter()
    for _ in range(5000):
        w, s = rng.randrange(2), f"198.51.100.{rng.randrange(30)}"
        view = (caps, other)[w]
        total = sum(held.values())
        per = held[(0, s)] + held[(1, s)]
        if rng.random() < 0.55:
            want = ("too_many_connections" if total >= 8
                    else "too_many_from_source" if per >= 3 else None)
            assert view.admit(s) == want
            if want is None:
                held[(w, s)] += 1
        elif held[(w, s)]:
            view.release(s)
            held[(w, s)] -= 1
        assert caps.connections == other.connections == sum(held.values())
        assert caps.sources == len({s for (_, s), n in held.items() if n})
    caps.clear(1)
    assert caps.connections == sum(n for (w, _), n in held.items() if w == 0)
