"""Control hardening (issue 14): each test pins one review finding that used to hold.

Expiry renewal by rotation, policy names squatted by hostnames, hostile node data,
malformed input that crashed a handler, ambiguous admin references, ``since=0``,
the unauthenticated challenge flood and the unkeyed audit chain.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from test_control import POLICY, Follower, register

from wgmesh import netmap as nm
from wgmesh.cli.main import main as cli_main
from wgmesh.control import ControlAPIError, ControlClient, ControlError, ControlServer
from wgmesh.control.audit import entry_hash
from wgmesh.keys import PrivateKey

pytestmark = pytest.mark.service


def _cli(server: ControlServer, capsys: pytest.CaptureFixture[str], *argv: str
         ) -> tuple[int, str, str]:
    base = ["--server", server.url, "--api-key-file", str(server.api_key_file)]
    rc = cli_main(["control", *argv[:2], *base, *argv[2:]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _post(url: str, path: str, body: Any, token: str | None = None) -> requests.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(url + path, data=raw, headers=headers, timeout=10)


# ------------------------------------------------------------------ item 3


def test_rotation_keeps_the_key_expiry_only_an_auth_key_or_admin_renews_it(
        server: ControlServer, authkey: str, admin: ControlClient,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, key, first = register(server.url, authkey, "n")
    assert first.key_expiry > 0
    for _ in range(3):  # to a new key, then to the same key again: neither renews
        new = PrivateKey.generate()
        reg = c.register(new, PrivateKey.generate().public, "n", rotate_from=key)
        assert reg.node.key_expiry == first.key_expiry
        key = new
        reg = c.register(key, PrivateKey.generate().public, "n", rotate_from=key)
        assert reg.node.key_expiry == first.key_expiry
    again = c.register(key, PrivateKey.generate().public, "n", auth_key=authkey)
    assert again.node.key_expiry > first.key_expiry
    # An admin's extension is the other renewal, and it brings an expired node back.
    admin.expire_node(first.id)
    extended = admin.extend_node(first.id, 7200)["key_expiry"]
    assert time.time() + 7000 < extended < again.node.key_expiry  # from now, as asked
    rc, out, _ = _cli(server, capsys, "nodes", "extend", "n", "--by", "0")
    assert rc == 0 and "expires never" in out
    assert [n["expired"] for n in admin.nodes()] == [False]
    assert [e["action"] for e in admin.audit()].count("node.extend") == 2


# ------------------------------------------------------------------ item 4

SQUAT_POLICY = {"tags": ["tag:srv"],
                "rules": [{"src": ["ops-laptop"], "dst": ["tag:srv:*"]}]}


def test_policy_node_names_match_only_names_an_admin_assigned(
        server: ControlServer, admin: ControlClient, authkey: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    admin.set_policy(SQUAT_POLICY)
    srv_key = admin.create_auth_key(tags=["tag:srv"])["key"]
    cs, _, s = register(server.url, srv_key, "db")
    cm, _, mallory = register(server.url, authkey, "ops-laptop")  # squats the policy's name
    _, _, ops = register(server.url, authkey, "laptop")
    assert mallory.name == "ops-laptop"
    fs, fm = Follower(cs), Follower(cm)
    try:
        fm.wait(lambda m: m.seq > 0, "mallory's map")
        fs.wait(lambda m: m.seq > 0, "srv map")
        assert s.id not in fm.peers() and mallory.id not in fs.peers()
        # The admin gives the name to the real laptop: the squatter moves aside.
        rc, out, _ = _cli(server, capsys, "nodes", "rename", f"id:{ops.id}", "ops-laptop")
        assert rc == 0 and "ops-laptop" in out
        fs.wait(lambda m: ops.id in m.peers and mallory.id not in m.peers, "ops sees srv")
        names = {n["id"]: (n["name"], n["name_assigned"]) for n in admin.nodes()}
        assert names[ops.id] == ("ops-laptop", True)
        assert names[mallory.id] == ("ops-laptop-2", False)
        # Nobody takes an assigned name: not a new node, not another rename by hostname.
        _, _, late = register(server.url, authkey, "ops-laptop")
        assert late.name != "ops-laptop"
        with pytest.raises(ControlAPIError) as e:
            admin.rename_node(mallory.id, "ops-laptop")
        assert e.value.status == 409
        with pytest.raises(ControlAPIError) as e:
            admin.rename_node(mallory.id, "Not A Label")
        assert e.value.status == 400
    finally:
        fs.close()
        fm.close()
    assert "node.rename" in [e["action"] for e in admin.audit()]


# ------------------------------------------------------------------ item 5


def _nested(depth: int) -> bytes:
    """``{"hostinfo": {"a": [[[...]]]}}``: two bytes a level, so 1,000 fit the 4 KiB limit.

    Built as text: encoding it with :mod:`json` would overflow this test's own stack.
    """
    return b'{"hostinfo": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


def test_hostile_node_data_is_refused_and_cannot_break_the_admin_api(
        server: ControlServer, admin: ControlClient, authkey: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, _, info = register(server.url, authkey, "n")
    tok = c.node_token
    for depth in range(900, 1000, 3):  # where the JSON encoder ran out of stack before
        r = _post(server.url, "/v1/node/update", _nested(depth), tok)
        assert r.status_code == 400, (depth, r.text)
        nodes = requests.get(server.url + "/v1/admin/nodes", timeout=10, headers={
            "Authorization": f"Bearer {server.admin_key}"})
        assert nodes.status_code == 200, (depth, nodes.text)
    r = _post(server.url, "/v1/node/update", {"hostinfo": {"os": "linux", "n": [1, 2]}}, tok)
    assert r.status_code == 200
    for raw in (b'{"home_relay": NaN}', b'{"hostinfo": {"x": Infinity}}',
                b'{"hostinfo": {"x": -Infinity}}', b'{"hostinfo": {"x": 1e999}}'):
        r = _post(server.url, "/v1/node/update", raw, tok)
        assert r.status_code == 400, (raw, r.text)
    ula_host = info.ipv6.rsplit(":", 1)[0] + ":beef"
    for ep in ("127.0.0.1:41641", "0.0.0.0:41641", "[::1]:41641", "[::]:41641",
               "100.64.0.9:41641", "100.127.255.1:41641", f"[{ula_host}]:41641",
               "224.0.0.1:41641"):
        r = _post(server.url, "/v1/node/update", {"endpoints": [ep]}, tok)
        assert r.status_code == 400, (ep, r.text)
    r = _post(server.url, "/v1/node/update", {"endpoints": ["198.51.100.7:41641",
                                                           "[fd00:1::7]:41641"]}, tok)
    assert r.status_code == 200, r.text
    assert requests.get(server.url + "/v1/admin/nodes", timeout=10, headers={
        "Authorization": f"Bearer {server.admin_key}"}).status_code == 200
    rc, out, _ = _cli(server, capsys, "nodes", "list")
    assert rc == 0 and "n" in out


# ------------------------------------------------------------------ item 6


def test_malformed_inputs_get_a_clear_4xx(server: ControlServer, admin: ControlClient,
                                          authkey: str) -> None:
    zero = base64.b64encode(bytes(32)).decode()
    r = _post(server.url, "/v1/register/challenge", {"node_key": zero})
    assert r.status_code == 400 and "node_key" in r.json()["message"], r.text
    r = _post(server.url, "/v1/register/challenge",
              {"node_key": PrivateKey.generate().public.b64(), "rotate_from": zero})
    assert r.status_code == 400 and "rotate_from" in r.json()["message"], r.text
    long = "h" * 62
    names = [register(server.url, authkey, long)[2].name for _ in range(4)]
    assert len(set(names)) == 4 and all(len(n) <= 63 for n in names)
    bad_policy = {"rules": [{"src": ["*"], "dst": ["*:*"], "caps": [["file-send"]]}]}
    with pytest.raises(ControlAPIError) as e:
        admin.set_policy(bad_policy)
    assert e.value.status == 400 and e.value.details[0]["path"] == "rules[0].caps[0]"
    for url in ("http://[::1", "http://[::1]:bad", "http://[zz]/"):
        with pytest.raises(ControlAPIError) as e:
            admin.set_relay_map({"regions": [{"region_id": 1, "code": "x", "nodes": [
                {"name": "r", "url": url}]}]})
        assert e.value.status == 400, url


def test_a_bad_relay_map_file_fails_start_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "relays.json"
    path.write_text(json.dumps({"regions": [{"region_id": 1, "code": "x", "nodes": [
        {"name": "r", "url": "http://[::1"}]}]}))
    with pytest.raises(ControlError, match=r"relays\.json"), \
            ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, relay_map_file=path):
        pass


# ------------------------------------------------------------------ item 7


def test_admin_node_references_are_never_ambiguous(
        server: ControlServer, admin: ControlClient, authkey: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, first = register(server.url, authkey, "alpha")
    _, _, one = register(server.url, authkey, "1")
    assert (first.id, one.name) == (1, "1")
    rc, _, err = _cli(server, capsys, "nodes", "expire", "1")
    assert rc == 1 and "ambiguous" in err and "id:1" in err and "name:1" in err
    assert not any(n["expired"] for n in admin.nodes())
    rc, out, _ = _cli(server, capsys, "nodes", "expire", "name:1")
    assert rc == 0 and f"node {one.id} (1)" in out
    rc, out, _ = _cli(server, capsys, "nodes", "expire", "id:1")
    assert rc == 0 and "node 1 (alpha)" in out
    assert [n["expired"] for n in admin.nodes()] == [True, True]
    rc, out, _ = _cli(server, capsys, "nodes", "tag", "alpha")
    assert rc == 0 and "node 1 (alpha)" in out
    rc, out, _ = _cli(server, capsys, "nodes", "tag", str(one.id))  # only an id matches "2"
    assert rc == 0 and f"node {one.id} (1)" in out
    for ref in ("id:x", "id:", "name:", "nosuch", "id:99"):
        with pytest.raises(ControlAPIError) as e:
            admin.expire_node(ref)
        assert e.value.status in (400, 404), ref


# ------------------------------------------------------------------ item 8


def test_since_zero_gets_a_full_netmap(server: ControlServer, authkey: str) -> None:
    ca, _, a = register(server.url, authkey, "a")
    _, _, b = register(server.url, authkey, "b")
    stream = ControlClient(server.url, node_token=ca.node_token).stream(since=0)
    try:
        first = next(stream)
        assert isinstance(first, nm.Netmap), first
        assert first.self_node.id == a.id and b.id in first.peers
    finally:
        stream.close()


# ----------------------------------------------------------------- item 11


def test_registration_challenges_are_rate_limited_per_source(server: ControlServer) -> None:
    key = PrivateKey.generate().public.b64()

    def challenge(_: int) -> requests.Response:
        return _post(server.url, "/v1/register/challenge", {"node_key": key})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(challenge, range(200)))
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 429} and 50 <= codes.count(200) < 150, codes
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"


def test_outstanding_challenges_are_bounded_and_expired_ones_pruned(tmp_path: Path) -> None:
    from wgmesh.control.store import open_store

    store = open_store(str(tmp_path / "c.db"), max_challenges=5)
    try:
        key = PrivateKey.generate().public
        ids = [store.add_challenge(key, None, "h") for _ in range(5)]
        newest = store.add_challenge(key, None, "h")  # full: the oldest goes, not the newest
        with store._read() as tx:
            left = {r[0] for r in tx.rows("SELECT id FROM challenges")}
        assert left == {*ids[1:], newest}
        with store._tx() as tx:  # time passes: the five expire
            tx.run("UPDATE challenges SET expires_at = expires_at - 61")
        assert store.prune_challenges() == 5
        for _ in range(5):
            store.add_challenge(key, None, "h")
        with store._tx() as tx:
            tx.run("UPDATE challenges SET expires_at = expires_at - 61")
        store.add_challenge(key, None, "h")  # a new one prunes the expired on its way in
        with store._read() as tx:
            assert tx.row("SELECT COUNT(*) FROM challenges")[0] == 1
    finally:
        store.close()


# ----------------------------------------------------------------- item 12


def _rewrite_history(db: str, seq: int, downgrade: bool = True) -> None:
    """What an attacker with the database does: edit an entry, recompute every later hash.

    Without the key only plain hashes can be recomputed: ``downgrade`` marks every entry
    unkeyed, else the keyed entries are left as they are.
    """
    with sqlite3.connect(db) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(audit)")]
        if "keyed" in cols and downgrade:
            conn.execute("UPDATE audit SET keyed = 0")
        conn.execute("UPDATE audit SET actor = 'nobody' WHERE seq = ?", (seq,))
        where = "WHERE keyed = 0" if "keyed" in cols else ""
        rows = conn.execute("SELECT seq, ts, actor, action, target, detail FROM audit "
                            f"{where} ORDER BY seq").fetchall()
        prev = "0" * 64
        for s, ts, actor, action, target, detail in rows:
            h = entry_hash(prev, s, ts, actor, action, target, detail)
            conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, s))
            prev = h


def test_rewritten_and_rehashed_audit_history_is_detected(
        server: ControlServer, admin: ControlClient, authkey: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    register(server.url, authkey, "a")
    admin.set_policy(POLICY)
    assert admin.audit_verify()["ok"]
    keyfile = server.state_dir / "audit.key"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    _rewrite_history(server.db, 3)
    assert not admin.audit_verify()["ok"]
    rc, out, _ = _cli(server, capsys, "audit", "verify")
    assert rc == 1 and "BROKEN" in out
    assert cli_main(["control", "audit", "verify", "--db", server.db]) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_an_old_unkeyed_database_upgrades_in_place(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from wgmesh.control.store import MIGRATIONS, open_store

    monkeypatch.setenv("WGMESH_STATE_DIR", str(tmp_path / "elsewhere"))  # no key there

    db = str(tmp_path / "control.db")
    with monkeypatch.context() as m:  # migrations after 4 then run on the server's start
        m.setattr("wgmesh.control.store.sql.MIGRATIONS",
                  [mg for mg in MIGRATIONS if mg[0] <= 4])
        store = open_store(db)  # no audit key: entries chained as before the upgrade
        for i in range(4):
            store.audit("system", "test.old", f"t{i}")
        store.close()
    with sqlite3.connect(db) as conn:  # the schema as it was before migration 4
        conn.execute("ALTER TABLE audit DROP COLUMN keyed")
        conn.execute("ALTER TABLE nodes DROP COLUMN name_assigned")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
        conn.execute("DELETE FROM meta WHERE key = 'audit_key_id'")
    with ControlServer(db, "127.0.0.1:0", state_dir=tmp_path) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        result = admin.audit_verify()
        assert result["ok"] and result["keyed_from"] == 5, result
        entries = admin.audit()
        assert [e["keyed"] for e in entries[:4]] == [False] * 4
        assert all(e["keyed"] for e in entries[4:])
        assert entries[4]["action"] == "audit.keyed"
        rc = cli_main(["control", "audit", "verify", "--server", srv.url,
                       "--api-key-file", str(srv.api_key_file)])
    out = capsys.readouterr().out
    assert rc == 0 and "unkeyed" in out and "keyed from seq 5" in out, out
    assert cli_main(["control", "audit", "verify", "--db", db]) == 0
    elsewhere = tmp_path / "copy" / "control.db"  # a copy without its key next to it
    elsewhere.parent.mkdir()
    with sqlite3.connect(db) as src, sqlite3.connect(elsewhere) as dst:
        src.backup(dst)
    capsys.readouterr()
    assert cli_main(["control", "audit", "verify", "--db", str(elsewhere)]) == 1
    assert "UNVERIFIED from seq 5" in capsys.readouterr().out
    assert cli_main(["control", "audit", "verify", "--db", str(elsewhere), "--audit-key-file",
                     str(tmp_path / "audit.key")]) == 0
    # An old entry rewritten before the upgrade point still breaks the keyed link after it.
    _rewrite_history(db, 2, downgrade=False)
    assert cli_main(["control", "audit", "verify", "--db", db]) == 1
    assert "BROKEN at seq 5: previous-hash link broken" in capsys.readouterr().out


def test_replicas_need_the_same_audit_key(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    with ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "a"):
        pass
    with pytest.raises(ControlError, match="audit key"), \
            ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "b"):
        pass
