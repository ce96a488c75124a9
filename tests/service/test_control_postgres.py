"""Control on a real PostgreSQL: the store, and two replicas fanning out via LISTEN/NOTIFY.

Needs ``WGMESH_TEST_POSTGRES_DSN`` (``scripts/start-postgres.sh`` prints it);
each test gets its own fresh database on that server.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from polling import wait_for
from test_control import POLICY, Follower, register

from wgmesh.control import ControlAPIError, ControlClient, ControlError, ControlServer
from wgmesh.control.store import MIGRATIONS, PostgresStore

pytestmark = pytest.mark.service
DSN = os.environ.get("WGMESH_TEST_POSTGRES_DSN")
if not DSN:
    pytest.skip("WGMESH_TEST_POSTGRES_DSN not set (scripts/start-postgres.sh starts a server)",
                allow_module_level=True)


@pytest.fixture
def dsn() -> Iterator[str]:
    import psycopg

    name = f"wgm_{secrets.token_hex(4)}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = DSN.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def replicas(dsn: str, tmp_path: Path) -> Iterator[tuple[ControlServer, ControlServer]]:
    keys = {"api_key_file": tmp_path / "admin.key", "audit_key_file": tmp_path / "audit.key",
            "control_key_file": tmp_path / "control.key"}  # replicas share all three
    with ControlServer(dsn, "127.0.0.1:0", state_dir=tmp_path / "a", keepalive_s=0.3,
                       flush_delay_s=0, **keys) as a, \
         ControlServer(dsn, "127.0.0.1:0", state_dir=tmp_path / "b", keepalive_s=0.3,
                       flush_delay_s=0, **keys) as b:
        yield a, b


def test_migrations_are_versioned_and_idempotent(dsn: str) -> None:
    s1 = PostgresStore(dsn)
    s2 = PostgresStore(dsn)  # a second replica starting on the migrated schema
    with s1._read() as tx:
        versions = [r[0] for r in tx.rows("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [v for v, _ in MIGRATIONS]
    assert s1.ula_prefix == s2.ula_prefix
    s1.close()
    s2.close()


def test_a_stream_on_replica_a_sees_changes_made_through_b(
        replicas: tuple[ControlServer, ControlServer]) -> None:
    a, b = replicas
    assert a.admin_key == b.admin_key
    admin_b = ControlClient(b.url, api_key=b.admin_key)
    ak = admin_b.create_auth_key(reusable=True)["key"]
    ca, _, _ = register(a.url, ak, "on-a")
    f = Follower(ca)
    try:
        f.wait(lambda m: m.seq > 0, "map from A")
        cb, _, nb = register(b.url, ak, "on-b")
        f.wait(lambda m: nb.id in m.peers, "node registered on B")
        cb.update(endpoints=["203.0.113.9:41641"], home_relay=2)
        f.wait(lambda m: m.peers[nb.id].home_relay == 2 and m.peers[nb.id].endpoints, "update")
        admin_b.set_policy(POLICY)
        f.wait(lambda m: m.policy_version == 2 and not m.peers, "policy via B")
        assert ControlClient(a.url, api_key=a.admin_key).get_policy()["version"] == 2
    finally:
        f.close()


def test_single_use_key_atomic_across_replicas(
        replicas: tuple[ControlServer, ControlServer]) -> None:
    a, b = replicas
    admin = ControlClient(a.url, api_key=a.admin_key)
    ak = admin.create_auth_key(reusable=False)["key"]

    def attempt(i: int) -> bool:
        try:
            register((a, b)[i % 2].url, ak, f"r{i}")
            return True
        except ControlAPIError:
            return False

    with ThreadPoolExecutor(50) as pool:
        assert sum(pool.map(attempt, range(50))) == 1
    assert len(admin.nodes()) == 1


def test_addresses_and_audit_on_postgres(replicas: tuple[ControlServer, ControlServer]) -> None:
    a, b = replicas
    admin = ControlClient(a.url, api_key=a.admin_key)
    ak = admin.create_auth_key(reusable=True)["key"]
    seen = set()
    for i in range(6):
        node = register((a, b)[i % 2].url, ak, "same")[2]
        seen.add((node.ipv4, node.ipv6, node.name))
    assert len(seen) == 6 and len({n for _, _, n in seen}) == 6
    admin.expire_node("same")
    entries = admin.audit(limit=1000)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert admin.audit_verify()["ok"]
    # Each admin read is itself audited, so the chain keeps growing.
    assert ControlClient(b.url, api_key=b.admin_key).audit_verify()["entries"] > len(entries)
    wait_for(lambda: b.world.seq == a.world.seq, what="replicas converge")
    assert b.world.live == a.world.live


def test_store_reconnects_after_its_connection_is_killed(dsn: str) -> None:
    import psycopg

    store = PostgresStore(dsn)
    pid = store.conn.info.backend_pid
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        store.get_policy()  # the request in flight fails...
    assert store.get_policy()[0] == 1  # ...the next one reconnects
    store.close()


def test_hardening_holds_on_postgres(replicas: tuple[ControlServer, ControlServer],
                                     tmp_path: Path) -> None:
    """Names, references and the keyed audit chain behave on PostgreSQL as on SQLite."""
    import psycopg

    from wgmesh.control.audit import entry_hash

    a, b = replicas
    admin = ControlClient(a.url, api_key=a.admin_key)
    ak = admin.create_auth_key(reusable=True)["key"]
    names = [register((a, b)[i % 2].url, ak, "p" * 62)[2].name for i in range(4)]
    assert len(set(names)) == 4 and max(map(len, names)) <= 63
    _, _, one = register(b.url, ak, "1")
    with pytest.raises(ControlAPIError) as e:
        admin.expire_node("1")
    assert e.value.status == 400 and "ambiguous" in e.value.message
    assert admin.rename_node(f"name:{one.name}", "one")["name_assigned"]
    assert admin.audit_verify()["ok"] and admin.audit_verify()["keyed_from"] == 1
    with pytest.raises(ControlError, match="audit key"), \
            ControlServer(a.store.dsn, "127.0.0.1:0", state_dir=tmp_path / "c"):
        pass
    with psycopg.connect(a.store.dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT seq, ts, actor, action, target, detail FROM audit "
                            "ORDER BY seq").fetchall()
        prev = "0" * 64
        for s, ts, actor, action, target, detail in rows:
            h = entry_hash(prev, s, ts, "mallory" if s == 2 else actor, action, target, detail)
            conn.execute("UPDATE audit SET actor = CASE WHEN seq = 2 THEN 'mallory' ELSE actor "
                         "END, keyed = 0, prev_hash = %s, hash = %s WHERE seq = %s",
                         (prev, h, s))
            prev = h
    assert not ControlClient(b.url, api_key=b.admin_key).audit_verify()["ok"]
