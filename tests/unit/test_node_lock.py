"""The node-side mesh lock filter: fail closed, extend only by verified updates, persist."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from wgmesh import lock
from wgmesh.keys import Key
from wgmesh.node.meshlock import NodeLock
from wgmesh.node.state import StateDir

pytestmark = pytest.mark.unit

ADMIN = lock.LockPrivateKey(hashlib.sha256(b"admin").digest())
ROGUE = lock.LockPrivateKey(hashlib.sha256(b"rogue").digest())
T0 = 1_700_000_000


def node(i: int) -> Key:
    return Key.from_raw(hashlib.sha256(b"node %d" % i).digest())


class Control:
    """What ``GET /v1/lock`` answers, over a list the test (playing control) edits freely."""

    def __init__(self) -> None:
        self.updates: list[lock.Update] = []
        self.asked: list[str] = []

    @property
    def head(self) -> str:
        return self.updates[-1].hash.hex() if self.updates else ""

    def fetch(self, since: str) -> dict[str, Any]:
        self.asked.append(since)
        hashes = [u.hash.hex() for u in self.updates]
        start = hashes.index(since) + 1 if since in hashes else 0
        return {"head": self.head,
                "updates": [base64.b64encode(u.encode()).decode() for u in self.updates[start:]]}

    def state(self) -> lock.LockState:
        return lock.verify(self.updates)


def test_unlocked_mesh_allows_everyone_and_a_locked_one_nobody_until_verified(
        tmp_path: Path) -> None:
    nl = NodeLock(StateDir(tmp_path))
    assert nl.allows(node(1)) and nl.label(node(1)) is None and nl.summary() is None
    assert not nl.needs_sync("")
    assert nl.needs_sync("ab" * 32)  # a lock head shows up: fail closed from here on
    assert not nl.allows(node(1)) and nl.label(node(1)) == "needs signature"


def test_signed_peers_only_and_state_survives_a_restart(tmp_path: Path) -> None:
    c = Control()
    c.updates.append(lock.genesis([ADMIN.public], ADMIN, nonce=bytes(16), time=T0))
    c.updates.append(lock.sign_node(c.state(), node(1), ADMIN, time=T0 + 1))
    nl = NodeLock(StateDir(tmp_path))
    assert nl.needs_sync(c.head) and nl.sync(c.head, c.fetch)
    assert nl.allows(node(1)) and not nl.allows(node(2))
    assert nl.label(node(2)) == "needs signature"
    c.updates.append(lock.revoke_node(c.state(), node(1), ADMIN, time=T0 + 2))
    assert nl.sync(c.head, c.fetch) and c.asked[-1] == c.updates[1].hash.hex()  # a delta
    assert not nl.allows(node(1)) and nl.label(node(1)) == "revoked"
    again = NodeLock(StateDir(tmp_path))
    assert again.head == c.head and again.label(node(1)) == "revoked"
    assert not again.needs_sync(c.head) and not again.allows(node(3))


def test_forged_update_is_rejected_and_the_last_good_state_kept(tmp_path: Path) -> None:
    c = Control()
    c.updates.append(lock.genesis([ADMIN.public], ADMIN, nonce=bytes(16), time=T0))
    c.updates.append(lock.sign_node(c.state(), node(1), ADMIN, time=T0 + 1))
    nl = NodeLock(StateDir(tmp_path))
    nl.sync(c.head, c.fetch)
    good = nl.head
    # control (compromised) appends a signature by a key nobody trusts
    c.updates.append(lock.sign_node(c.state(), node(9), ROGUE, time=T0 + 2))
    assert nl.needs_sync(c.head)
    with pytest.raises(lock.UntrustedSigner):
        nl.sync(c.head, c.fetch)
    assert nl.head == good and not nl.allows(node(9)) and nl.allows(node(1))
    assert "not a trusted lock key" in nl.summary()["rejected"]  # type: ignore[index]
    assert not nl.needs_sync(c.head)  # the same forged head is not fetched again
    assert NodeLock(StateDir(tmp_path)).head == good
    # cutting the chain short (to undo the signature of node 1) is refused as well
    c.updates[1:] = []
    c.updates.append(lock.sign_node(c.state(), node(2), ADMIN, time=T0 + 3))
    with pytest.raises(lock.TruncatedChain):
        nl.sync(c.head, c.fetch)
    assert nl.head == good and nl.allows(node(1)) and not nl.allows(node(2))


def test_a_valid_prefix_is_kept_when_a_later_update_fails(tmp_path: Path) -> None:
    c = Control()
    c.updates.append(lock.genesis([ADMIN.public], ADMIN, nonce=bytes(16), time=T0))
    nl = NodeLock(StateDir(tmp_path))
    nl.sync(c.head, c.fetch)
    c.updates.append(lock.sign_node(c.state(), node(1), ADMIN, time=T0 + 1))
    c.updates.append(lock.sign_node(c.state(), node(2), ROGUE, time=T0 + 2))
    with pytest.raises(lock.UntrustedSigner):
        nl.sync(c.head, c.fetch)
    assert nl.head == c.updates[1].hash.hex() and nl.allows(node(1)) and not nl.allows(node(2))
    assert (tmp_path / "lock.json").stat().st_mode & 0o077 == 0
