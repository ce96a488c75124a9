"""Node life cycle on a real control server: ephemeral nodes, approval, expiry, tag owners.

Each test runs on SQLite and, when ``WGMESH_TEST_POSTGRES_DSN`` is set, on a
fresh PostgreSQL database too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from test_control import Follower, register

from wgmesh.cli.main import main as cli_main
from wgmesh.control import ControlAPIError, ControlClient, ControlServer

pytestmark = pytest.mark.service


def _server(db: str, tmp_path: Path, **kw: Any) -> ControlServer:
    return ControlServer(db, listen="127.0.0.1:0", state_dir=tmp_path, keepalive_s=0.3,
                         flush_delay_s=0.0, **kw)


def _actions(admin: ControlClient, action: str) -> list[str]:
    return [e["target"] for e in admin.audit() if e["action"] == action]


def test_ephemeral_node_is_removed_after_grace_unless_it_reconnects(db: str,
                                                                   tmp_path: Path) -> None:
    with _server(db, tmp_path, ephemeral_grace_s=1.0) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        plain = admin.create_auth_key(reusable=True)["key"]
        eph = admin.create_auth_key(reusable=True, ephemeral=True)
        assert eph["auth_key"]["ephemeral"] is True
        ca, _, _ = register(srv.url, plain, "a")
        c1, _, e1 = register(srv.url, eph["key"], "e1")
        c2, _, e2 = register(srv.url, eph["key"], "e2")
        fa, f1, f2 = Follower(ca), Follower(c1), Follower(c2)
        try:
            fa.wait(lambda m: {e1.id, e2.id} <= set(m.peers), "a sees both ephemeral nodes")
            wait_for(lambda: all(n["online"] for n in admin.nodes()), 10, "all online")
            f1.close()
            f2.close()
            f1 = Follower(c1)  # e1 reconnects at once; e2 stays away
            f1.wait(lambda m: True, "e1's stream is back")
            fa.wait(lambda m: e2.id not in m.peers, "peers are told e2 is gone", timeout=15)
            assert _actions(admin, "node.ephemeral_removed") == [f"node:{e2.id}"]
            ids = {n["id"] for n in admin.nodes()}
            assert e2.id not in ids and e1.id in ids
            assert e1.id in fa.peers()
            # Its address is free again: the next node takes it.
            _, _, nxt = register(srv.url, plain, "next")
            assert nxt.ipv4 == e2.ipv4
        finally:
            fa.close()
            f1.close()


def test_ephemeral_node_that_left_while_no_control_ran_is_removed_after_restart(
        db: str, tmp_path: Path) -> None:
    """Its stream ended with the control, so no offline report was written: it counts as
    offline from the restart, while a node that reconnects keeps renewing its lease."""
    srv = _server(db, tmp_path, ephemeral_grace_s=1.0).__enter__()
    admin = ControlClient(srv.url, api_key=srv.admin_key)
    eph = admin.create_auth_key(reusable=True, ephemeral=True)["key"]
    (ce, _, e), (ck, _, k) = (register(srv.url, eph, n) for n in ("gone", "back"))
    fe, fk = Follower(ce), Follower(ck)
    wait_for(lambda: all(n["online"] for n in admin.nodes()), 10, "both online")
    srv.__exit__(None, None, None)
    fe.close()
    fk.close()
    with _server(db, tmp_path, ephemeral_grace_s=1.0) as srv:
        started = time.monotonic()
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        assert all(n["online"] for n in admin.nodes())  # as the last replica left them
        ck.url = srv.url
        fk = Follower(ck)
        try:
            lease = srv.store.presence_lease_s if srv.store else 0.0
            wait_for(lambda: _actions(admin, "node.ephemeral_removed"), lease + 15,
                     "the node that did not come back is removed")
            assert time.monotonic() - started >= lease - 1  # offline since the restart
            assert _actions(admin, "node.ephemeral_removed") == [f"node:{e.id}"]
            # The one that came back outlived the lease since its reconnect: renewed.
            assert [(n["id"], n["online"]) for n in admin.nodes()] == [(k.id, True)]
            assert admin.nodes()[0]["last_seen"] > time.time() - 10
        finally:
            fk.close()


def test_approval_required_keeps_new_nodes_pending(db: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with _server(db, tmp_path, approval="required") as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        pre = admin.create_auth_key(reusable=True, preapproved=True)["key"]
        ca, _, a = register(srv.url, pre, "a")
        cp, _, p = register(srv.url, admin.create_auth_key()["key"], "p")
        assert a.approved and not p.approved
        fa, fp = Follower(ca), Follower(cp)
        try:
            fp.wait(lambda m: not m.self_node.approved, "p learns it is pending")
            fa.wait(lambda m: m.seq >= 0, "a's map")
            assert p.id not in fa.peers() and fp.peers() == {}
            assert cli_main(["control", "nodes", "list", "--server", srv.url, "--api-key-file",
                             str(srv.api_key_file)]) == 0
            assert "pending" in next(line for line in capsys.readouterr().out.splitlines()
                                     if " p " in f" {line} ")
            assert cli_main(["control", "nodes", "approve", "p", "--server", srv.url,
                             "--api-key-file", str(srv.api_key_file)]) == 0
            fa.wait(lambda m: p.id in m.peers, "a sees p once approved")
            fp.wait(lambda m: a.id in m.peers and m.self_node.approved, "p sees a")
            assert _actions(admin, "node.approve") == [f"node:{p.id}"]
        finally:
            fa.close()
            fp.close()


@pytest.mark.parametrize("db", ["postgres"], indirect=True)  # replicas share PostgreSQL
def test_a_replica_starting_leaves_nodes_streaming_to_another_alone(db: str,
                                                                     tmp_path: Path) -> None:
    """The other replica renews their presence lease, so neither start nor sweep removes them."""
    with _server(db, tmp_path, ephemeral_grace_s=1.0) as a:
        admin = ControlClient(a.url, api_key=a.admin_key)
        ck, _, k = register(a.url, admin.create_auth_key(ephemeral=True)["key"], "k")
        fk = Follower(ck)
        try:
            wait_for(lambda: admin.nodes()[0]["online"], 10, "k online on replica a")
            with _server(db, tmp_path, ephemeral_grace_s=1.0) as b:
                started, lease = time.time(), b.store.presence_lease_s if b.store else 0.0
                # Renewed after a full lease since b started: both sweeps ran meanwhile.
                wait_for(lambda: admin.nodes()[0]["last_seen"] > started + lease, lease + 15,
                         "a renews k's lease")
                assert [n["id"] for n in admin.nodes()] == [k.id]
                assert not _actions(admin, "node.ephemeral_removed")
        finally:
            fk.close()


def test_pending_node_reregistering_with_a_preapproved_key_is_approved(
        db: str, tmp_path: Path) -> None:
    with _server(db, tmp_path, approval="required") as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ca, _, _ = register(srv.url, admin.create_auth_key(preapproved=True)["key"], "a")
        _, key, p = register(srv.url, admin.create_auth_key()["key"], "p")
        assert not p.approved
        # Without pre-approval it stays pending; with it, it is in.
        _, _, again = register(srv.url, admin.create_auth_key()["key"], "p", key)
        assert again.id == p.id and not again.approved
        fa = Follower(ca)
        try:
            fa.wait(lambda m: m.seq >= 0, "a's map")
            assert p.id not in fa.peers()
            _, _, again = register(srv.url, admin.create_auth_key(preapproved=True)["key"],
                                   "p", key)
            assert again.id == p.id and again.approved
            fa.wait(lambda m: p.id in m.peers, "a sees p once approved")
            # Approval is not taken back by a later plain key.
            _, _, again = register(srv.url, admin.create_auth_key()["key"], "p", key)
            assert again.approved
        finally:
            fa.close()


def test_expiry_set_disable_and_cli(db: str, tmp_path: Path) -> None:
    with _server(db, tmp_path) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        (ca, _, _), (_, _, b) = (register(srv.url, admin.create_auth_key()["key"], n)
                                 for n in "ab")
        f = Follower(ca)
        try:
            f.wait(lambda m: b.id in m.peers, "b")
            admin.set_node_expiry("b", time.time() + 1.0)
            f.wait(lambda m: b.id not in m.peers, "b expires by time and drops out",
                   timeout=8)
            cli = ["--server", srv.url, "--api-key-file", str(srv.api_key_file)]
            assert cli_main(["control", "nodes", "expiry", "b", "--disable", *cli]) == 0
            f.wait(lambda m: b.id in m.peers and m.peers[b.id].key_expiry == 0,
                   "b is back, never expiring")
            assert cli_main(["control", "nodes", "expiry", "b", "--set", "2030-01-02", *cli]) == 0
            f.wait(lambda m: m.peers[b.id].key_expiry == 1893542400.0, "b expires in 2030")
            assert [e["action"] for e in admin.audit()
                    if e["target"] == f"node:{b.id}"][-4:] == [
                "node.set_expiry", "node.key_expired", "node.set_expiry", "node.set_expiry"]
        finally:
            f.close()


def test_tag_owners_limit_who_may_hand_out_a_tag(db: str, tmp_path: Path) -> None:
    with _server(db, tmp_path) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        owner_key = admin.create_api_key("admin", "owns tag:server")
        owner = ControlClient(srv.url, api_key=owner_key["key"])
        policy = {"tags": ["tag:server", "tag:dev"],
                  "rules": [{"src": ["*"], "dst": ["*:*"]}],
                  "tagOwners": {"tag:server": [f"apikey:{owner_key['api_key']['id']}"]}}
        admin.set_policy(policy)
        with pytest.raises(ControlAPIError) as e:
            admin.create_auth_key(tags=["tag:server"])
        assert e.value.status == 403
        assert admin.create_auth_key(tags=["tag:dev"])["auth_key"]["tags"] == ["tag:dev"]
        minted = owner.create_auth_key(reusable=True, tags=["tag:server"])["key"]
        _, _, s = register(srv.url, minted, "srv")
        assert s.tags == ("tag:server",)
        # Adding tag:dev is allowed to anyone; keeping tag:server is not a new grant.
        admin.tag_node("srv", ["tag:server", "tag:dev"])
        register(srv.url, admin.create_auth_key(reusable=True)["key"], "d")
        with pytest.raises(ControlAPIError) as e:
            admin.tag_node("d", ["tag:server"])
        assert e.value.status == 403
        # The owner loses tag:server: its key can no longer register nodes into it.
        admin.set_policy({**policy, "tagOwners": {"tag:server": []}})
        with pytest.raises(ControlAPIError) as e:
            register(srv.url, minted, "srv2")
        assert e.value.status == 403
        assert "srv2" not in {n["name"] for n in admin.nodes()}
