"""File drop without namespaces: name rules, offers, the inbox, identity, and the
protocol against a real peer API on loopback (identity fixed by address there)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from budget import examples
from droptools import BOB, LoopServer, raw_put
from hypothesis import given, settings
from hypothesis import strategies as st
from polling import wait_for

from wgmesh.cli import file as file_cli
from wgmesh.drop import protocol
from wgmesh.drop.inbox import Inbox, suffixed
from wgmesh.drop.protocol import BadName, check_name
from wgmesh.drop.sender import Connection, read_response, request, send_file
from wgmesh.drop.server import PeerAPIServer
from wgmesh.keys import Key
from wgmesh.netmap import CAP_FILE_SEND, Netmap, NodeInfo, Peer

pytestmark = pytest.mark.unit

HOSTILE = [
    "", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "..\\x",
    "a\x00b", "\x00", "bell\x07", "esc\x1b[31mred", "new\nline", "tab\t", "del\x7f",
    "CON", "con.txt", "Nul.tar.gz", "LPT1", "com3.log", "aux ", ".hidden", ".partial",
    "trailing.", "trailing ", "x" * 256, "é" * 128, "evil\u202etxt.exe", "zw\u200bsp",
    "a:b", "what?", "star*", 'q"uote', "<tag>", "pi|pe",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_refused(name: str) -> None:
    with pytest.raises(BadName):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "report.pdf", "résumé final.docx", "数据.csv",
                                  "x" * 255, "a (1).txt", "con-game.txt", "a..b"])
def test_ordinary_names_accepted(name: str) -> None:
    assert check_name(name) == name


@given(st.text(max_size=300))
@settings(max_examples=examples(500))
def test_check_name_fuzz(name: str) -> None:
    """Anything accepted is exactly one child of the inbox; anything else is BadName."""
    try:
        check_name(name)
    except BadName:
        return
    base = Path("/inbox")
    assert (base / name).parent == base and (base / name).name == name
    assert "\x00" not in name and not name.startswith(".")
    assert len(name.encode()) <= 255


def test_suffix_goes_before_every_extension() -> None:
    assert suffixed("report.tar.gz", 0) == "report.tar.gz"
    assert suffixed("report.tar.gz", 2) == "report (2).tar.gz"
    assert suffixed("README", 1) == "README (1)"


GOOD_SHA = "a" * 64


def test_parse_offer() -> None:
    q = {"name": "f.bin", "size": "10", "sha256": GOOD_SHA, "offset": "4"}
    assert protocol.parse_offer(q, with_offset=True) == protocol.Offer("f.bin", 10, GOOD_SHA, 4)
    assert protocol.parse_offer(q, with_offset=False).offset == 0
    for bad in ({**q, "size": "-1"}, {**q, "size": "1e3"}, {**q, "size": "٣"},
                {**q, "offset": "11"}, {**q, "sha256": GOOD_SHA.upper()},
                {**q, "sha256": "ab"}, {k: v for k, v in q.items() if k != "size"},
                {**q, "size": "9" * 17}):
        with pytest.raises(protocol.BadRequest):
            protocol.parse_offer(bad, with_offset=True)
    with pytest.raises(BadName):
        protocol.parse_offer({**q, "name": "../f"}, with_offset=True)


def test_admit_counts_quota_then_disk() -> None:
    """Quota covers the whole file beside what is held; the disk only what is still to come."""
    offer = protocol.Offer("f.bin", 100, GOOD_SHA)
    assert protocol.admit(offer, 40, free=60) == 60
    assert protocol.admit(offer, 40, free=60, quota=150, held=50) == 60
    with pytest.raises(protocol.Refusal, match="quota") as e:
        protocol.admit(offer, 40, free=60, quota=150, held=51)
    assert e.value.status == 413
    with pytest.raises(protocol.Refusal, match="no room") as e:
        protocol.admit(offer, 40, free=59)
    assert e.value.status == 507
    assert protocol.refusal_text(599, {}, "h") == "h refused the file (599): error"
    assert protocol.refusal_text(413, {}, "h").endswith("Request Entity Too Large")


@given(st.dictionaries(st.sampled_from(["name", "size", "sha256", "offset", "x"]),
                       st.text(max_size=80)))
def test_parse_offer_fuzz(q: dict[str, str]) -> None:
    try:
        o = protocol.parse_offer(q, with_offset=True)
    except (protocol.BadRequest, BadName):
        return
    assert 0 <= o.offset <= o.size and check_name(o.name) == o.name


# ---------------------------------------------------------------------- inbox


def _partial(inbox: Inbox, name: str, data: bytes) -> Path:
    p = inbox.partial_path("sender", name, len(data), hashlib.sha256(data).hexdigest())
    p.write_bytes(data)
    return p


def test_commit_never_overwrites_and_hides_partials(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")
    inbox.create()
    first = inbox.commit(_partial(inbox, "a.txt", b"one"), "a.txt")
    pending = _partial(inbox, "b.txt", b"partial")
    second = inbox.commit(_partial(inbox, "a.txt", b"two"), "a.txt")
    assert (first.name, second.name) == ("a.txt", "a (1).txt")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert [f.name for f in inbox.list()] == ["a.txt", "a (1).txt"]
    assert pending.exists() and inbox.usage() == 3 + 3 + 7
    assert inbox.usage(exclude=pending) == 6


def test_move_to_suffixes_on_clash_and_empties_inbox(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")
    inbox.create()
    inbox.commit(_partial(inbox, "a.txt", b"new"), "a.txt")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.txt").write_bytes(b"mine")
    moved = inbox.move_to(dest)
    assert [p.name for p in moved] == ["a (1).txt"]
    assert (dest / "a.txt").read_bytes() == b"mine" and moved[0].read_bytes() == b"new"
    assert inbox.list() == []


def test_wait_times_out_empty_and_prune(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox")
    inbox.create()
    assert inbox.wait(timeout=0.05, poll=0.01) == []
    old = _partial(inbox, "x", b"x")
    os.utime(old, (1, 1))
    fresh = _partial(inbox, "y", b"y")
    assert inbox.prune_partials(max_age=3600) == 1
    assert not old.exists() and fresh.exists()


# ---------------------------------------------------------------------- identity


def _key() -> Key:
    return Key.from_raw(os.urandom(32))


def _netmap(caps: tuple[str, ...]) -> Netmap:
    me = NodeInfo(1, "me", _key(), _key(), "100.64.0.1", "fd7a:115c:a1e0::1")
    bob = Peer(2, "bob", _key(), _key(), "100.64.0.2", "fd7a:115c:a1e0::2",
               allowed_ips=("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), caps=caps)
    router = Peer(3, "router", _key(), _key(), "100.64.0.3", "fd7a:115c:a1e0::3",
                  allowed_ips=("100.64.0.3/32", "10.9.0.0/16"))
    return Netmap(seq=1, self_node=me, peers={2: bob, 3: router})


def test_identity_from_allowed_ips_and_policy() -> None:
    nm = _netmap((CAP_FILE_SEND,))
    identify = protocol.netmap_identify(lambda: nm)
    authorize = protocol.netmap_authorize(lambda: nm)
    bob = identify("100.64.0.2")
    assert bob == protocol.PeerIdentity("bob", nm.peers[2].node_key)
    assert identify("fd7a:115c:a1e0::2") == bob
    assert identify("10.9.4.4") == protocol.PeerIdentity("router", nm.peers[3].node_key)
    assert identify("100.64.0.99") is None
    assert authorize(bob) and not authorize(identify("100.64.0.3"))  # type: ignore[arg-type]
    assert not protocol.netmap_authorize(lambda: _netmap(()))(bob)
    assert protocol.netmap_identify(lambda: None)("100.64.0.2") is None


# ---------------------------------------------------------------------- protocol on loopback

@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., LoopServer]]:
    servers: list[LoopServer] = []

    def start(**kw: object) -> LoopServer:
        s = LoopServer(tmp_path / "inbox", **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_send_and_clash_and_progress(serve: Callable[..., LoopServer], tmp_path: Path) -> None:
    s = serve()
    data = os.urandom(3 * protocol.CHUNK + 7)
    src = _file(tmp_path, "f.bin", data)
    seen: list[tuple[int, int]] = []
    r = send_file("127.0.0.1", src, port=s.server.port,
                       progress=lambda d, t: seen.append((d, t)))
    r2 = send_file(f"127.0.0.1:{s.server.port}", src)
    assert (r.name, r2.name) == ("f.bin", "f (1).bin")
    assert (s.server.inbox.dir / "f (1).bin").read_bytes() == data
    assert r.sha256 == hashlib.sha256(data).hexdigest() and r.resumed_from == 0
    assert r.hash_seconds == 0.0  # hashed as it streamed: nothing waited for the digest
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert not any(s.server.inbox.partial_dir.iterdir())


def test_write_behind_flushes_during_the_transfer(serve: Callable[..., LoopServer],
                                                 tmp_path: Path) -> None:
    """With a 64 KiB write-behind a 4 MiB drop starts flushing long before its end,
    and the file still arrives whole; without fsync nothing is flushed early."""
    data = os.urandom(4 << 20)
    src = _file(tmp_path, "big.bin", data)
    s = serve(write_behind=64 << 10)
    send_file("127.0.0.1", src, port=s.server.port)
    assert (s.server.inbox.dir / "big.bin").read_bytes() == data
    assert s.server.counters["early_flushes"] >= 1
    lazy = serve(write_behind=64 << 10, fsync=False)
    send_file("127.0.0.1", src, port=lazy.server.port)
    assert lazy.server.counters["early_flushes"] == 0
    assert lazy.server.counters["received"] == 1


def test_denied_and_unknown_senders_get_403(serve: Callable[..., LoopServer],
                                            tmp_path: Path) -> None:
    src = _file(tmp_path, "f", b"x")
    denied = serve(authorize=lambda who: False)
    with pytest.raises(protocol.DropRefused, match="bob may not send files") as e:
        send_file("127.0.0.1", src, port=denied.server.port)
    assert e.value.status == 403
    stranger = serve(identify=lambda ip: None)
    with pytest.raises(protocol.DropRefused, match="not a peer") as e:
        send_file("127.0.0.1", src, port=stranger.server.port)
    assert e.value.status == 403 and stranger.server.inbox.list() == []


def _put(port: int, q: dict[str, object], body: bytes) -> tuple[int, dict[str, object]]:
    return raw_put(port, q, body)


@pytest.mark.parametrize("digest_first", [False, True])
def test_resume_from_offset_rehashes_kept_bytes(serve: Callable[..., LoopServer],
                                                tmp_path: Path, digest_first: bool) -> None:
    """Both offers resume from what the receiver kept: a streamed one (the sender's) and
    a digest-first one (earlier senders'), each keyed apart."""
    s = serve()
    data = os.urandom(3 * protocol.CHUNK + 100_000)
    sha = hashlib.sha256(data).hexdigest()
    q = {"name": "r.bin", "size": len(data), **({"sha256": sha} if digest_first else {})}
    partial = s.server.inbox.partial_path(BOB.node_key.b64(), "r.bin", len(data),
                                          sha if digest_first else "")
    kept = protocol.CHUNK + 40_000
    partial.write_bytes(data[:kept])  # what an interrupted first attempt left
    status, body = _put(s.server.port, {**q, "offset": kept + 10_000}, data[kept + 10_000:])
    assert (status, body["offset"]) == (409, kept)
    if digest_first:
        status, body = _put(s.server.port, {**q, "offset": kept}, data[kept:])
        assert status == 201 and body["sha256"] == sha
    else:
        r = send_file("127.0.0.1", _file(tmp_path, "r.bin", data), port=s.server.port)
        assert (r.resumed_from, r.sent, r.sha256) == (kept, len(data) - kept, sha)
        assert r.hash_seconds > 0  # the kept prefix is read and hashed before sending
    assert (s.server.inbox.dir / "r.bin").read_bytes() == data and not partial.exists()


def _commit(port: int, q: dict[str, object]) -> tuple[int, dict[str, object]]:
    c = Connection("127.0.0.1", port, 10, None)
    try:
        return request(c, "POST", "/v1/commit", q)
    finally:
        c.close()


def test_streamed_offer_is_held_until_a_matching_commit(serve: Callable[..., LoopServer]) -> None:
    """A PUT without a digest leaves the file held, not published; only a commit naming
    the right SHA-256 publishes it, a wrong one discards it, and a commit before all bytes
    arrived says how many are held."""
    s = serve()
    port, inbox = s.server.port, s.server.inbox
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    q = {"name": "s.bin", "size": len(data)}
    assert _put(port, {**q, "offset": 0}, data[:50_000] + b"x" * 150_000) == \
        (200, {"offset": len(data)})
    assert inbox.list() == [] and len(list(inbox.partial_dir.iterdir())) == 1
    status, err = _commit(port, {**q, "sha256": sha})  # the bytes held are not this file
    assert status == 422 and "hash to" in str(err["error"])
    assert list(inbox.partial_dir.iterdir()) == [] and inbox.list() == []
    assert _put(port, {**q, "offset": 0}, data[:120_000])[0] == 400  # short body
    partial = inbox.partial_path(BOB.node_key.b64(), "s.bin", len(data), "")
    partial.write_bytes(data[:120_000])
    assert _commit(port, {**q, "sha256": sha}) == (409, {
        "error": "the receiver holds only 120000 bytes of s.bin", "offset": 120_000})
    assert _commit(port, q)[0] == 400  # a commit must name the digest
    assert _put(port, {**q, "offset": 120_000}, data[120_000:]) == (200, {"offset": len(data)})
    assert inbox.list() == []
    status, body = _commit(port, {**q, "sha256": sha})
    assert (status, body["name"], body["sha256"]) == (201, "s.bin", sha)
    assert (inbox.dir / "s.bin").read_bytes() == data and not partial.exists()
    assert _commit(port, {**q, "sha256": sha})[0] == 409  # nothing held any more


def test_streamed_commit_after_a_restart_hashes_what_is_held(
        serve: Callable[..., LoopServer]) -> None:
    """The digest taken on the way in lives in memory; a receiver restarted between the
    body and the commit hashes the held file itself."""
    first = serve()
    data = os.urandom(300_000)
    q = {"name": "late.bin", "size": len(data)}
    assert _put(first.server.port, {**q, "offset": 0}, data)[0] == 200
    first.close()
    again = serve()
    status, body = _commit(again.server.port, {**q, "sha256": hashlib.sha256(data).hexdigest()})
    assert (status, body["name"]) == (201, "late.bin")
    assert (again.server.inbox.dir / "late.bin").read_bytes() == data


def test_resume_onto_another_files_bytes_starts_over(serve: Callable[..., LoopServer],
                                                    tmp_path: Path) -> None:
    """A held prefix of another file of the same name and size fails the commit; the
    sender then sends the whole file once more, and the right bytes arrive."""
    s = serve()
    data = os.urandom(2 * protocol.CHUNK)
    partial = s.server.inbox.partial_path(BOB.node_key.b64(), "same.bin", len(data), "")
    partial.write_bytes(os.urandom(protocol.CHUNK))  # an older version's first half
    r = send_file("127.0.0.1", _file(tmp_path, "same.bin", data), port=s.server.port)
    assert (r.resumed_from, r.sent) == (0, len(data) + protocol.CHUNK)
    assert (s.server.inbox.dir / "same.bin").read_bytes() == data
    assert s.server.counters["refused"] == 1  # the one 422


def test_file_changed_while_sent_is_not_delivered(serve: Callable[..., LoopServer],
                                                 tmp_path: Path) -> None:
    s = serve()
    src = _file(tmp_path, "live.log", os.urandom(3 * protocol.CHUNK))

    def scribble(done: int, total: int) -> None:
        if done == protocol.CHUNK:  # the first chunk is out: the file changes under us
            with open(src, "r+b") as f:
                f.write(b"changed")

    with pytest.raises(protocol.DropError, match="changed while it was being sent"):
        send_file("127.0.0.1", src, port=s.server.port, progress=scribble)
    assert s.server.inbox.list() == []


def test_sender_offers_the_digest_first_to_a_receiver_that_wants_it(
        serve: Callable[..., LoopServer], tmp_path: Path) -> None:
    """A receiver from before the commit (its offer check demands ``sha256``): the sender
    hashes first and sends a digest-first PUT."""

    class DigestFirst(PeerAPIServer):
        async def _offset(self, request: Any) -> Any:
            if "sha256" not in request.query:
                from aiohttp import web
                return web.json_response({"error": "sha256 must be 64 lowercase hex digits"},
                                         status=400)
            return await super()._offset(request)

    s = serve(server_class=DigestFirst)
    data = os.urandom(protocol.CHUNK + 5)
    r = send_file("127.0.0.1", _file(tmp_path, "old.bin", data), port=s.server.port)
    assert r.sha256 == hashlib.sha256(data).hexdigest() and r.hash_seconds > 0
    assert (s.server.inbox.dir / "old.bin").read_bytes() == data
    assert list(s.server.inbox.partial_dir.iterdir()) == []


def test_bad_digest_quota_and_framing_leave_nothing(serve: Callable[..., LoopServer],
                                                    tmp_path: Path) -> None:
    s = serve(quota=1000)
    port = s.server.port
    body = b"y" * 10
    status, err = _put(port, {"name": "d", "size": 10, "sha256": GOOD_SHA, "offset": 0}, body)
    assert status == 422 and "hash to" in str(err["error"])
    status, err = _put(port, {"name": "q", "size": 11, "sha256": GOOD_SHA, "offset": 0}, body)
    assert status == 400 and "Content-Length" in str(err["error"])
    with pytest.raises(protocol.DropRefused, match="quota") as e:
        send_file("127.0.0.1", _file(tmp_path, "big", b"z" * 1001), port=port)
    assert e.value.status == 413
    for name in ("../up", "CON", "a\x00b", ".partial"):
        status, err = _put(port, {"name": name, "size": 1, "sha256": GOOD_SHA, "offset": 0},
                           b"x")
        assert status == 400 and "file name" in str(err["error"])
    assert os.listdir(s.server.inbox.dir) == [".partial"]
    assert os.listdir(s.server.inbox.partial_dir) == []
    assert sorted(os.listdir(tmp_path)) == ["big", "inbox"]


def test_binds_only_to_given_addresses(tmp_path: Path) -> None:
    for bad in ([], ["0.0.0.0"], ["::"]):
        with pytest.raises(ValueError):
            PeerAPIServer(tmp_path, bad, identify=lambda ip: None,
                               authorize=lambda w: False)


def _start_put(port: int, data: bytes, sent: int) -> socket.socket:
    """A PUT of ``data`` that stops after ``sent`` bytes, its connection left open."""
    from urllib.parse import urlencode

    q = urlencode({"name": "cut.bin", "size": len(data), "offset": 0})
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(f"PUT /v1/files?{q} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
              .encode() + data[:sent])
    return c


@pytest.mark.parametrize("how", ["closed", "silent", "superseded"])
def test_interrupted_transfer_keeps_its_bytes_and_resumes(
        how: str, serve: Callable[..., LoopServer], tmp_path: Path) -> None:
    """A cut, a silent (NAT flushed) or a still-open stale connection: resume from its bytes."""
    s = serve(idle_timeout=0.3 if how == "silent" else 60.0)
    data = os.urandom(1 << 20)
    c = _start_put(s.server.port, data, 300_000)
    partials = s.server.inbox.partial_dir
    wait_for(lambda: sum(p.stat().st_size for p in partials.iterdir()) == 300_000, 10,
             "the first 300,000 bytes on disk")
    if how == "closed":
        c.close()
    if how != "superseded":
        wait_for(lambda: s.server.counters["interrupted"] == 1, 10,
                 "the server to count the interruption")
    assert s.server.inbox.list() == []
    r = send_file("127.0.0.1", _file(tmp_path, "cut.bin", data), port=s.server.port)
    c.close()
    assert (r.resumed_from, r.sent) == (300_000, len(data) - 300_000)
    assert (s.server.inbox.dir / "cut.bin").read_bytes() == data
    assert list(partials.iterdir()) == []


def test_progress_bar_ends_at_full() -> None:
    out = io.StringIO()
    show = file_cli.progress_bar("f.bin", out)
    for done in (0, 50, 100):
        show(done, 100)
    show(0, 0)  # an empty file is complete at once
    lines = out.getvalue().split("\r")
    assert "100%" in lines[-2] and lines[-2].endswith("\n") and "100%" in lines[-1]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert file_cli.main(["send", "not-an-address", str(tmp_path)]) == 1
    assert "tunnel address" in capsys.readouterr().err
    assert file_cli.main(["send", "127.0.0.1", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wgmesh: error:") and err.count("\n") == 1
    assert file_cli.main(["receive", "--state-dir", str(tmp_path), "--wait",
                          "--timeout", "0.05"]) == 1
    assert "no file arrived" in capsys.readouterr().err


def test_whoami_names_the_tunnel_identity(serve: Callable[..., LoopServer]) -> None:
    s = serve(authorize=lambda who: False)
    c = Connection("127.0.0.1", s.server.port, 10, None)
    try:
        status, body = request(c, "GET", "/v1/whoami", {})
    finally:
        c.close()
    assert (status, body) == (200, {"name": "bob", "key": BOB.node_key.b64(),
                                    "may_send": False})


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopServer]:
    s = LoopServer(tmp_path_factory.mktemp("fuzz") / "inbox", quota=1 << 20)
    yield s
    s.close()


_QUERY_KEY = st.sampled_from(["name", "size", "sha256", "offset", "x"])


@given(q=st.lists(st.tuples(_QUERY_KEY, st.text(max_size=40)), max_size=6),
       body=st.binary(max_size=64), method=st.sampled_from(["PUT", "GET", "POST"]))
@settings(max_examples=examples(150), deadline=None)
def test_live_server_fuzz(fuzz_server: LoopServer, q: list[tuple[str, str]], body: bytes,
                          method: str) -> None:
    """Arbitrary requests get a clear 4xx, never a 5xx, and leave nothing behind."""
    from urllib.parse import urlencode

    path = {"PUT": "/v1/files", "GET": "/v1/offset", "POST": "/v1/commit"}[method]
    c = Connection("127.0.0.1", fuzz_server.server.port, 10, None)
    try:
        c.putrequest(method, f"{path}?{urlencode(q)}")
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        c.send(body)
        status, resp = read_response(c)
    finally:
        c.close()
    inbox = fuzz_server.server.inbox
    assert status in (200, 400, 409, 413, 422) and (status == 200 or resp["error"])
    held = list(inbox.partial_dir.iterdir())
    if method == "PUT" and status == 200:  # a well-formed streamed body: held, not published
        assert len(held) == 1 and held[0].stat().st_size == int(dict(q)["size"])
        held[0].unlink()
    else:
        assert held == []
    assert inbox.list() == []
