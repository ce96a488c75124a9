"""Control server end to end over HTTP on 127.0.0.1 with a real SQLite store.

The helpers here (``Follower``, ``register``) are shared with
``test_control_postgres.py``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from polling import wait_for

from wgmesh import netmap as nm
from wgmesh.cli.main import main as cli_main
from wgmesh.control import ControlAPIError, ControlClient, ControlError, ControlServer
from wgmesh.keys import PrivateKey

pytestmark = pytest.mark.service


class Follower:
    """Follows one node's netmap stream on a thread; keeps the raw messages and the map."""

    def __init__(self, client: ControlClient, since: int | None = None) -> None:
        self.client, self.messages, self.map = client, [], None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._since = since
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.client.stream(self._since):
                self.messages.append(msg)
                if isinstance(msg, nm.Netmap):
                    self.map = msg
                elif isinstance(msg, nm.NetmapDelta) and self.map is not None:
                    self.map = nm.apply(self.map, msg)
                if self.stop.is_set():
                    return
        except BaseException as e:
            self.error = e

    def peers(self) -> dict[int, nm.Peer]:
        return dict(self.map.peers) if self.map else {}

    def wait(self, pred: Callable[[nm.Netmap], Any], what: str, timeout: float = 10) -> Any:
        return wait_for(lambda: self.map is not None and pred(self.map), timeout, what)

    def close(self) -> None:
        """Ends at the next message (keepalives make that prompt), closing the stream."""
        self.stop.set()
        self.thread.join(10)


def register(url: str, auth_key: str | None, hostname: str,
             key: PrivateKey | None = None) -> tuple[ControlClient, PrivateKey, nm.NodeInfo]:
    key = key or PrivateKey.generate()
    c = ControlClient(url)
    reg = c.register(key, PrivateKey.generate().public, hostname, auth_key=auth_key)
    return c, key, reg.node


# ------------------------------------------------------------- registration


def test_addresses_stable_across_reregistration_and_restart(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ak = admin.create_auth_key(reusable=True)["key"]
        _, _, first = register(srv.url, ak, "box", key)
        _, _, other = register(srv.url, ak, "box")
        _, _, again = register(srv.url, ak, "box", key)
    assert ipaddress.ip_address(first.ipv4) in ipaddress.ip_network("100.64.0.0/10")
    v6 = ipaddress.ip_address(first.ipv6)
    assert v6 in ipaddress.ip_network("fc00::/7")
    assert (again.id, again.ipv4, again.ipv6, again.name) == (first.id, first.ipv4,
                                                              first.ipv6, "box")
    assert other.name == "box-2" and other.ipv4 != first.ipv4
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path) as srv:
        _, _, later = register(srv.url, ak, "renamed", key)
    assert (later.id, later.ipv4, later.ipv6) == (first.id, first.ipv4, first.ipv6)
    assert ipaddress.ip_network(first.ipv6 + "/48", strict=False) == ipaddress.ip_network(
        later.ipv6 + "/48", strict=False)


def test_single_use_key_is_atomic_under_50_concurrent_registrations(
        server: ControlServer, admin: ControlClient) -> None:
    ak = admin.create_auth_key(reusable=False)["key"]

    def attempt(i: int) -> bool:
        try:
            register(server.url, ak, f"racer{i}")
            return True
        except ControlAPIError as e:
            assert e.status == 401
            return False

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attempt, range(50)))
    assert sum(results) == 1
    assert len(admin.nodes()) == 1
    assert admin.list_auth_keys()[0]["uses"] == 1


def test_auth_key_tags_expiry_and_revocation(server: ControlServer,
                                             admin: ControlClient) -> None:
    tagged = admin.create_auth_key(reusable=True, tags=["tag:server"])["key"]
    _, _, n1 = register(server.url, tagged, "s1")
    _, _, n2 = register(server.url, tagged, "s2")
    assert n1.tags == n2.tags == ("tag:server",)
    short = admin.create_auth_key(expiry_s=0.2)["key"]
    wait_for(lambda: time.time() > admin.list_auth_keys()[-1]["expires_at"], what="expiry")
    with pytest.raises(ControlAPIError, match="expired"):
        register(server.url, short, "late")
    rec = admin.create_auth_key(reusable=True)
    admin.revoke_auth_key(rec["auth_key"]["id"])
    with pytest.raises(ControlAPIError) as e:
        register(server.url, rec["key"], "revoked")
    assert e.value.status == 401
    with pytest.raises(ControlAPIError):
        register(server.url, "wgk_0000000000000000_" + "A" * 43, "forged")
    assert len(admin.nodes()) == 2


def _challenge(url: str, key: PrivateKey) -> tuple[dict[str, Any], str]:
    from nacl.public import Box, PublicKey

    ch = requests.post(url + "/v1/register/challenge",
                       json={"node_key": key.public.b64()}, timeout=5).json()
    secret = Box(key.nacl(), PublicKey(base64.b64decode(ch["server_key"]))).decrypt(
        base64.b64decode(ch["sealed"]))
    return ch, base64.b64encode(secret).decode()


def test_proof_of_possession_and_replayed_challenge(server: ControlServer, authkey: str,
                                                   admin: ControlClient) -> None:
    key, disco = PrivateKey.generate(), PrivateKey.generate().public
    ch, proof = _challenge(server.url, key)
    body = {"node_key": key.public.b64(), "disco_key": disco.b64(), "hostname": "h",
            "challenge_id": ch["challenge_id"], "proof": proof, "auth_key": authkey}
    wrong = {**body, "proof": base64.b64encode(b"\0" * 32).decode()}
    r = requests.post(server.url + "/v1/register", json=wrong, timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    # The failed attempt consumed the challenge: the right proof is now a replay.
    r = requests.post(server.url + "/v1/register", json=body, timeout=5)
    assert r.status_code == 401 and "challenge" in r.json()["message"]
    ch, proof = _challenge(server.url, key)
    ok = {**body, "challenge_id": ch["challenge_id"], "proof": proof}
    assert requests.post(server.url + "/v1/register", json=ok, timeout=5).status_code == 200
    r = requests.post(server.url + "/v1/register", json=ok, timeout=5)
    assert r.status_code == 401  # replay of a used challenge
    # A proof for one key does not register another.
    other = PrivateKey.generate()
    ch, proof = _challenge(server.url, key)
    r = requests.post(server.url + "/v1/register", timeout=5,
                      json={**ok, "node_key": other.public.b64(),
                            "challenge_id": ch["challenge_id"], "proof": proof})
    assert r.status_code == 401
    assert [n["name"] for n in admin.nodes()] == ["h"]


def test_names_are_dns_safe_and_unique(server: ControlServer, authkey: str) -> None:
    names = [register(server.url, authkey, h)[2].name
             for h in ["My Laptop!.home.arpa", "my-laptop", "___", "x" * 80]]
    assert names == ["my-laptop", "my-laptop-2", "node", "x" * 63]


# ------------------------------------------------------------ netmap stream


def test_netmap_full_map_then_small_deltas(server: ControlServer, authkey: str,
                                           admin: ControlClient) -> None:
    ca, _, a = register(server.url, authkey, "a")
    f = Follower(ca)
    try:
        f.wait(lambda m: m.self_node.id == a.id, "full map")
        assert isinstance(f.messages[0], nm.Netmap) and not f.messages[0].peers
        cb, _, b = register(server.url, authkey, "b")
        f.wait(lambda m: b.id in m.peers, "b added")
        peer = f.peers()[b.id]
        assert peer.node_key == b.node_key and peer.allowed_ips == (
            f"{b.ipv4}/32", f"{b.ipv6}/128")
        n = len(f.messages)
        cb.update(endpoints=["198.51.100.7:41641", nm.Endpoint("10.0.0.2", 41641, "local")],
                  home_relay=3)
        f.wait(lambda m: m.peers[b.id].home_relay == 3 and m.peers[b.id].endpoints, "endpoints")
        deltas = [m for m in f.messages[n:] if isinstance(m, nm.NetmapDelta)]
        assert deltas and all(not d.peers_upsert and d.peers_changed for d in deltas)
        assert set(nm.to_json(deltas[-1].peers_changed[0])) <= {"id", "endpoints",
                                                                "home_relay"}
        fb = Follower(cb)
        f.wait(lambda m: m.peers[b.id].online, "b online")
        fb.close()
        f.wait(lambda m: not m.peers[b.id].online and m.peers[b.id].last_seen > 0, "b offline")
        admin.delete_node(b.id)
        f.wait(lambda m: b.id not in m.peers, "b removed")
        with pytest.raises(ControlAPIError) as e:
            cb.update(home_relay=1)
        assert e.value.status == 401
    finally:
        f.close()


def test_keepalive_on_idle_stream(server: ControlServer, authkey: str) -> None:
    ca, _, _ = register(server.url, authkey, "idle")
    f = Follower(ca)
    try:
        wait_for(lambda: any(isinstance(m, nm.Keepalive) for m in f.messages), 5,
                   "keepalive")
    finally:
        f.close()


def test_resume_by_sequence_or_full_map_when_too_far_behind(server: ControlServer,
                                                            authkey: str) -> None:
    ca, _, _ = register(server.url, authkey, "a")
    cb, _, b = register(server.url, authkey, "b")
    f = Follower(ca)
    f.wait(lambda m: b.id in m.peers, "b")
    seq = f.map.seq
    f.close()
    cb.update(home_relay=9)
    msgs: list[nm.Message] = []
    for msg in ControlClient(server.url, node_token=ca.node_token).stream(since=seq):
        msgs.append(msg)
        if not isinstance(msg, nm.Keepalive) or len(msgs) > 3:
            break
    first = msgs[0]
    assert isinstance(first, nm.NetmapDelta), first
    assert first.peers_changed[0].home_relay == 9 and first.seq > seq
    # A sequence the server cannot bridge (ring evicted or from elsewhere): full map.
    server.world.ring_entries = 1
    for i in range(3):
        cb.update(home_relay=10 + i)
    wait_for(lambda: server.world.subs[1].floor > first.seq, what="ring eviction")
    stream = ControlClient(server.url, node_token=ca.node_token).stream(since=seq)
    full = next(stream)
    assert isinstance(full, nm.Netmap) and full.peers[b.id].home_relay == 12
    stream.close()


def test_follow_reconnects_and_resumes(tmp_path: Path) -> None:
    """``follow`` survives the server going away and coming back."""
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, keepalive_s=0.3) as srv:
        port = srv.port
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ak = admin.create_auth_key(reusable=True)["key"]
        ca, _, _ = register(srv.url, ak, "a")
        cb, _, b = register(srv.url, ak, "b")
        maps: list[nm.Netmap] = []
        stop = threading.Event()
        from wgmesh.control.client import Backoff

        def run() -> None:
            for m in ca.follow(stop, Backoff(base_s=0.05, cap_s=0.2)):
                maps.append(m)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for(lambda: maps and b.id in maps[-1].peers, what="first map")
    with ControlServer(listen=f"127.0.0.1:{port}", state_dir=tmp_path, keepalive_s=0.3) as srv:
        cb.update(home_relay=4)
        wait_for(lambda: maps[-1].peers[b.id].home_relay == 4, what="update after restart")
        stop.set()


# ------------------------------------------------------------------- policy

POLICY = {
    "tags": ["tag:a", "tag:b", "tag:srv"],
    "groups": {"group:ops": ["tag:a", "opsbox"]},
    "rules": [
        {"src": ["tag:a"], "dst": ["tag:a:*"]},
        {"src": ["group:ops"], "dst": ["tag:srv:22,443"], "proto": "tcp",
         "caps": ["file-send"]},
    ],
}


def test_policy_visibility_filter_and_caps(server: ControlServer, admin: ControlClient) -> None:
    admin.set_policy(POLICY)
    keys = {t: admin.create_auth_key(reusable=True, tags=[f"tag:{t}"])["key"]
            for t in ("a", "b", "srv")}
    ca1, _, a1 = register(server.url, keys["a"], "a1")
    _, _, a2 = register(server.url, keys["a"], "a2")
    cb, _, b = register(server.url, keys["b"], "b")
    cs, _, s = register(server.url, keys["srv"], "srv")
    fa, fb, fs = Follower(ca1), Follower(cb), Follower(cs)
    try:
        fa.wait(lambda m: set(m.peers) == {a2.id, s.id}, "a1 sees a2 and srv")
        fb.wait(lambda m: m.seq > 0, "b map")
        assert fb.peers() == {}
        fs.wait(lambda m: set(m.peers) == {a1.id, a2.id}, "srv sees the a nodes")
        assert fs.map.peers[a1.id].caps == ("file-send",)
        assert fa.map.peers[s.id].caps == ()  # srv may not send files to a1
        rules = fs.map.filter
        assert nm.packet_allowed(rules, a1.ipv4, s.ipv4, "tcp", 22)
        assert not nm.packet_allowed(rules, a1.ipv4, s.ipv4, "udp", 22)
        assert not nm.packet_allowed(rules, a1.ipv4, s.ipv4, "tcp", 80)
        assert not nm.packet_allowed(rules, b.ipv4, s.ipv4, "tcp", 22)
        assert not nm.packet_allowed(fa.map.filter, s.ipv4, a1.ipv4, "tcp", 22)
        assert fs.map.policy_version == 2
        # A policy change reaches every affected node as a delta.
        n = len(fb.messages)
        admin.set_policy({**POLICY, "rules": [*POLICY["rules"],
                                              {"src": ["tag:b"], "dst": ["tag:a:80"]}]})
        fb.wait(lambda m: set(m.peers) == {a1.id, a2.id} and m.policy_version == 3,
                "b sees a")
        assert all(isinstance(m, nm.NetmapDelta | nm.Keepalive) for m in fb.messages[n:])
        fa.wait(lambda m: nm.packet_allowed(m.filter, b.ipv4, a1.ipv4, "tcp", 80), "filter")
        # Tag changes move a node between views.
        admin.tag_node(b.id, ["tag:srv"])
        fa.wait(lambda m: m.peers.get(b.id) and m.peers[b.id].tags == ("tag:srv",), "retag")
    finally:
        for f in (fa, fb, fs):
            f.close()


def test_policy_validation_errors_are_useful_and_change_nothing(admin: ControlClient) -> None:
    before = admin.get_policy()
    bad = {"tags": ["tag:ok", "Tag:Bad"], "bogus": 1,
           "rules": [{"src": ["tag:missing"], "dst": ["tag:ok:99999"]},
                     {"src": ["group:none"], "dst": ["*"], "caps": ["teleport"]},
                     "junk"]}
    with pytest.raises(ControlAPIError) as e:
        admin.set_policy(bad)
    assert e.value.status == 400 and e.value.code == "invalid_policy"
    paths = {d["path"] for d in e.value.details}
    assert {"bogus", "tags[1]", "rules[0].src[0]", "rules[0].dst[0]", "rules[1].src[0]",
            "rules[1].dst[0]", "rules[1].caps[0]", "rules[2]"} <= paths
    with pytest.raises(ControlAPIError) as e:
        admin.set_policy(POLICY, if_version=before["version"] + 5)
    assert e.value.status == 409
    assert admin.get_policy() == before


# --------------------------------------------------------- expiry, rotation


def test_expiry_reregistration_and_key_rotation(server: ControlServer, authkey: str,
                                                admin: ControlClient) -> None:
    ca, _, _ = register(server.url, authkey, "a")
    cb, kb, b = register(server.url, authkey, "b")
    f = Follower(ca)
    try:
        f.wait(lambda m: b.id in m.peers, "b")
        admin.expire_node("b")
        f.wait(lambda m: b.id not in m.peers, "expired b drops out")
        register(server.url, authkey, "b", kb)
        f.wait(lambda m: b.id in m.peers, "re-registered b is back")
        new = PrivateKey.generate()
        reg = cb.register(new, PrivateKey.generate().public, "b", rotate_from=kb)
        assert (reg.node.id, reg.node.ipv4) == (b.id, b.ipv4)
        f.wait(lambda m: m.peers[b.id].node_key == new.public, "rotated key")
        assert f.map.peer_by_key(kb.public) is None
        assert [n["node_key"] for n in admin.nodes() if n["id"] == b.id] == [new.public.b64()]
        # The old key can no longer rotate or register without an auth key.
        with pytest.raises(ControlAPIError):
            ControlClient(server.url).register(PrivateKey.generate(), new.public, "b",
                                               rotate_from=kb)
    finally:
        f.close()


def test_key_expiry_by_time(tmp_path: Path) -> None:
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, key_expiry_s=1.5,
                       keepalive_s=0.3) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ak = admin.create_auth_key(reusable=True)["key"]
        ca, _, _ = register(srv.url, ak, "a")
        _, _, b = register(srv.url, ak, "b")
        f = Follower(ca)
        try:
            f.wait(lambda m: b.id in m.peers, "b")
            f.wait(lambda m: not m.peers and m.self_node.expired(time.time()), "both expired",
                   timeout=8)
            expired = [e["target"] for e in admin.audit() if e["action"] == "node.key_expired"]
            assert sorted(expired) == ["node:1", "node:2"]
        finally:
            f.close()


# ----------------------------------------------------------- audit and CLI


def test_audit_chain_records_and_detects_tampering(server: ControlServer, authkey: str,
                                                   admin: ControlClient,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, _, a = register(server.url, authkey, "a")
    admin.expire_node(a.id)
    admin.set_policy(POLICY)
    admin.delete_node(a.id)
    actions = [e["action"] for e in admin.audit()]
    for want in ("apikey.create", "authkey.create", "authkey.use", "node.register",
                 "node.expire", "policy.set", "node.delete", "admin.read"):
        assert want in actions
    e = next(e for e in admin.audit() if e["action"] == "node.register")
    assert e["actor"].startswith("authkey:") and e["target"] == f"node:{a.id}" and e["ts"] > 0
    assert admin.audit_verify()["ok"]
    db = str(server.db)
    assert cli_main(["control", "audit", "verify", "--db", db]) == 0
    assert "audit chain OK" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET actor = 'nobody' WHERE seq = 3")
    assert cli_main(["control", "audit", "verify", "--db", db]) == 1
    assert "BROKEN at seq 3" in capsys.readouterr().out
    assert not admin.audit_verify()["ok"]


def test_cli_admin_commands(server: ControlServer, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path) -> None:
    base = ["--server", server.url, "--api-key-file", str(server.api_key_file)]

    def run(*argv: str) -> str:
        assert cli_main(["control", *argv[:2], *base, *argv[2:]]) == 0
        return capsys.readouterr().out

    key = run("authkey", "create", "--reusable", "--tag", "tag:srv", "--expiry", "1d").strip()
    assert key.startswith("wgk_")
    assert "tag:srv" in run("authkey", "list")
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps(POLICY))
    assert "policy version 2" in run("policy", "set", str(pol))
    assert json.loads(run("policy", "get")) == json.loads(json.dumps(POLICY, sort_keys=True))
    _, _, n = register(server.url, key, "clihost")
    out = run("nodes", "list")
    assert "clihost" in out and n.ipv4 in out
    assert "tag:a" in run("nodes", "tag", "clihost", "tag:a")
    run("nodes", "expire", str(n.id))
    assert "EXPIRED" in run("nodes", "list")
    run("nodes", "delete", "clihost")
    assert "clihost" not in run("nodes", "list")
    relay_key = run("apikey", "create", "--role", "relay").strip()
    assert "relay" in run("apikey", "list")
    assert "node.delete" in run("audit", "list", "--limit", "500")
    assert "audit chain OK" in run("audit", "verify")
    rm = tmp_path / "relays.json"
    rm.write_text(json.dumps({"regions": [{"region_id": 1, "code": "lab", "nodes": [
        {"name": "r1", "url": "http://203.0.113.10:8443", "stun_port": 3478}]}]}))
    run("relay-map", "set", str(rm))
    assert "203.0.113.10" in run("relay-map", "get")
    keys = ControlClient(server.url, api_key=relay_key).relay_nodes()["node_keys"]
    assert keys == []
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [{"src": ["tag:nope"], "dst": ["*:*"]}]}')
    assert cli_main(["control", "policy", "set", *base, str(bad)]) == 1
    assert "rules[0].src[0]" in capsys.readouterr().err


def test_serve_with_no_options_just_works(tmp_path: Path) -> None:
    env = {**os.environ, "WGMESH_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "wgmesh", "control", "serve",
                             "--listen", "127.0.0.1:0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        url = line.split("listening on ")[1].split(",")[0]
        keyfile = tmp_path / "control" / "admin.key"
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert (tmp_path / "control" / "control.db").exists()
        admin = ControlClient(url, api_key=keyfile.read_text().strip())
        assert admin.get_policy()["version"] == 1
        assert requests.get(url + "/v1/health", timeout=5).json()["ok"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_bootstrap_key_file_is_imported_by_a_fresh_database(tmp_path: Path) -> None:
    keyfile = tmp_path / "shared.key"
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path / "one",
                       api_key_file=keyfile) as srv:
        first = srv.admin_key
    assert keyfile.read_text().strip() == first
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path / "two",
                       api_key_file=keyfile) as srv:
        assert ControlClient(srv.url, api_key=first).nodes() == []


def test_a_server_that_fails_to_start_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    keyfile = tmp_path / "bad.key"
    keyfile.write_text("not a key\n")
    with pytest.raises(ControlError, match="not a wgmesh API key"), \
            ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, api_key_file=keyfile):
        pass
    assert "control-server" not in {t.name for t in threading.enumerate()}


def test_relay_endpoint_lists_live_node_keys(server: ControlServer, authkey: str,
                                             admin: ControlClient) -> None:
    relay = ControlClient(server.url, api_key=admin.create_api_key("relay")["key"])
    ca, _, a = register(server.url, authkey, "a")
    _, _, b = register(server.url, authkey, "b")
    wait_for(lambda: len(relay.relay_nodes()["node_keys"]) == 2, what="two keys")
    admin.expire_node(b.id)
    wait_for(lambda: relay.relay_nodes()["node_keys"] == [a.node_key.b64()], what="expired")
    with pytest.raises(ControlAPIError) as e:
        relay.nodes()
    assert e.value.status == 403
    with pytest.raises(ControlAPIError) as e:
        ControlClient(server.url, api_key=ca.node_token).relay_nodes()
    assert e.value.status == 401


def test_relay_map_from_file_and_admin_update_reach_streams(tmp_path: Path) -> None:
    rm = {"regions": [{"region_id": 1, "code": "lab", "name": "Lab", "nodes": [
        {"name": "r1", "url": "http://203.0.113.10:8443", "stun_port": 3478}]}]}
    path = tmp_path / "relays.json"
    path.write_text(json.dumps(rm))
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, relay_map_file=path,
                       keepalive_s=0.3) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ca, _, _ = register(srv.url, admin.create_auth_key()["key"], "a")
        f = Follower(ca)
        try:
            f.wait(lambda m: m.relay_map.region(1) is not None, "relay map from file")
            assert f.map.relay_map.region(1).nodes[0].stun_address == ("203.0.113.10", 3478)
            rm["regions"].append({"region_id": 2, "code": "two", "nodes": []})
            admin.set_relay_map(rm)
            f.wait(lambda m: m.relay_map.region(2) is not None, "relay map delta")
        finally:
            f.close()


def test_a_newer_stream_of_the_same_node_replaces_the_older(server: ControlServer,
                                                           authkey: str) -> None:
    ca, _, _ = register(server.url, authkey, "a")
    cb, _, b = register(server.url, authkey, "b")
    old = Follower(ControlClient(server.url, node_token=ca.node_token))
    old.wait(lambda m: b.id in m.peers, "old stream")
    new = Follower(ControlClient(server.url, node_token=ca.node_token))
    try:
        new.wait(lambda m: b.id in m.peers, "new stream")
        wait_for(lambda: not old.thread.is_alive(), what="old stream ends")
        cb.update(home_relay=5)
        new.wait(lambda m: m.peers[b.id].home_relay == 5, "delta on the new stream")
        assert server.world.subs[1].streams == 1
    finally:
        new.close()
