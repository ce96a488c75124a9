"""Mesh lock on the control service: it stores and orders the chain, refuses junk, fans out.

The store runs on SQLite and, with ``WGMESH_TEST_POSTGRES_DSN`` set, on PostgreSQL too.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_control import Follower, register

from wgmesh import lock
from wgmesh.control import ControlAPIError, ControlClient, ControlServer
from wgmesh.control.errors import Conflict, Unprocessable
from wgmesh.control.store import Store, open_store
from wgmesh.keys import PrivateKey

pytestmark = pytest.mark.service

ADMIN = lock.LockPrivateKey(hashlib.sha256(b"admin").digest())
ROGUE = lock.LockPrivateKey(hashlib.sha256(b"rogue").digest())
T0 = 1_700_000_000


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    s = open_store(db)
    yield s
    s.close()


def _genesis() -> lock.Update:
    return lock.genesis([ADMIN.public], ADMIN, nonce=bytes(16), time=T0)


def test_store_appends_only_verified_updates_on_the_head(store: Store) -> None:
    assert store.lock_chain() == ("", "", []) and store.lock_head() == ""
    g = _genesis()
    state = store.lock_append(g.encode(), "apikey:x")
    node = PrivateKey.generate().public
    signed = lock.sign_node(state, node, ADMIN, time=T0 + 1)
    stale = lock.revoke_node(state, node, ADMIN, time=T0 + 2)  # built on the old head
    state = store.lock_append(signed.encode(), "apikey:x")
    assert state.allows(node)
    with pytest.raises(Conflict, match="not the lock head"):
        store.lock_append(stale.encode(), "apikey:x")
    forged = lock.revoke_node(state, node, ROGUE, time=T0 + 3)
    with pytest.raises(Unprocessable, match="not a trusted lock key"):
        store.lock_append(forged.encode(), "apikey:x")
    with pytest.raises(Unprocessable, match="version-1 lock update"):
        store.lock_append(b"junk", "apikey:x")
    with pytest.raises(Conflict):  # a second genesis names no parent: not the head either
        store.lock_append(lock.genesis([ROGUE.public], ROGUE, nonce=bytes(16), time=T0)
                          .encode(), "apikey:x")
    lock_id, head, updates = store.lock_chain()
    assert (lock_id, head) == (g.hash.hex(), signed.hash.hex()) == (lock_id, store.lock_head())
    assert updates == [g.encode(), signed.encode()]
    assert store.lock_chain(g.hash)[2] == [signed.encode()]
    assert store.lock_chain(bytes(32))[2] == updates  # an unknown head: the whole chain
    actions = [e.action for e in store.audit_entries()]
    assert actions.count("lock.genesis") == 1 and actions.count("lock.sign-node") == 1
    kinds = [c.kind for c in store.changes_since(0)]
    assert kinds.count("lock") == 2


def test_database_refuses_a_fork(tmp_path: Path) -> None:
    """UNIQUE(parent): even a write that bypasses the store cannot branch the chain."""
    store = open_store(str(tmp_path / "control.db"))
    state = store.lock_append(_genesis().encode(), "apikey:x")
    a = lock.sign_node(state, PrivateKey.generate().public, ADMIN, time=T0 + 1)
    b = lock.sign_node(state, PrivateKey.generate().public, ADMIN, time=T0 + 1)
    store.lock_append(a.encode(), "apikey:x")
    store.close()
    db = sqlite3.connect(tmp_path / "control.db")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("INSERT INTO lock_updates VALUES (3, ?, ?, ?, 0)",
                   (b.hash.hex(), b.parent.hex(), b.encode().hex()))
    db.close()


def test_api_codes_and_fan_out(server: ControlServer, admin: ControlClient,
                               authkey: str) -> None:
    node, _, _ = register(server.url, authkey, "n1")
    f = Follower(node)
    try:
        f.wait(lambda m: m.lock_head == "" and m.seq >= 0, "a first map")
        assert node.lock_chain() == {"lock_id": "", "head": "", "updates": []}
        g = _genesis()
        out = admin.lock_append(g.encode())
        assert out == {"lock_id": g.hash.hex(), "head": g.hash.hex(), "seq": 0}
        f.wait(lambda m: m.lock_head == g.hash.hex(), "the lock head in a delta", timeout=5)
        state = lock.verify([g])
        with pytest.raises(ControlAPIError) as e:
            admin.lock_append(lock.sign_node(state, PrivateKey.generate().public, ROGUE,
                                             time=T0).encode())
        assert e.value.status == 422 and "not a trusted lock key" in e.value.message
        s1 = lock.sign_node(state, PrivateKey.generate().public, ADMIN, time=T0 + 1)
        admin.lock_append(s1.encode())
        with pytest.raises(ControlAPIError) as e:  # built on the genesis, not the head
            admin.lock_append(lock.sign_node(state, PrivateKey.generate().public, ADMIN,
                                             time=T0 + 2).encode())
        assert e.value.status == 409
        with pytest.raises(ControlAPIError) as e:  # nodes may read the chain, not write it
            ControlClient(server.url, api_key=node.node_token).lock_append(s1.encode())
        assert e.value.status == 401
        reply = node.lock_chain(g.hash.hex())
        assert reply["head"] == s1.hash.hex()
        assert [base64.b64decode(u) for u in reply["updates"]] == [s1.encode()]
        with pytest.raises(ControlAPIError) as e:
            node.lock_chain("not hex")
        assert e.value.status == 400
    finally:
        f.close()
    # A full map carries the head too (a node that connects later).
    late, _, _ = register(server.url, authkey, "n2")
    f2 = Follower(late)
    try:
        f2.wait(lambda m: m.lock_head == s1.hash.hex(), "the lock head in a full map")
    finally:
        f2.close()
