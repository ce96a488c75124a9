"""Mesh lock with the control service compromised: its database says one thing, the admins'
lock keys another, and the nodes follow the lock keys (userspace backend; the kernel
backend runs the rogue-node case in tests/kernel/test_node_kernel.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from locktools import (
    control_db,
    insert_forged_update,
    insert_rogue_node,
    keygen,
    lock_cli,
    restart_control,
)
from polling import wait_for

import wgmesh
from wgmesh import lock
from wgmesh.keys import Key
from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns


def in_wireguard(node: wgmesh.Node) -> set[Key]:
    """The peers the node's WireGuard device holds: what counts, not what the map says."""
    assert node.aio.backend is not None
    return set(node.aio.backend.stats())


def test_compromised_control_cannot_add_a_node(lab: Lab, tmp_path: Path) -> None:
    mesh = MeshLab(lab, relays=1)
    db = control_db(mesh)
    admin_key = keygen(mesh, tmp_path / "admin.lock")
    forger_key = keygen(mesh, tmp_path / "forger.lock")
    authkey = mesh.authkey()
    nodes: dict[str, wgmesh.Node] = {}
    rejected: list[wgmesh.Event] = []
    got_rejected = threading.Event()

    def on_rejected(ev: wgmesh.Event) -> None:
        rejected.append(ev)
        got_rejected.set()

    def up(name: str) -> wgmesh.Node:
        host = lab.add_node_host(name, "eim")
        n = wgmesh.Node(mesh.control_url, authkey=authkey, state_dir=tmp_path / name,
                        netns=host.ns, hostname=name, ifname=f"wgl{name}",
                        backend="userspace", control_ca=mesh.control_ca)
        nodes[name] = n
        n.up()
        return n

    try:
        a, b = up("a"), up("b")
        b_key, a_key = Key(b.status().public_key), Key(a.status().public_key)
        wait_for(lambda: b_key in in_wireguard(a), 20, "b in a's WireGuard (unlocked)")

        # Lock the mesh and sign the two honest nodes.
        lock_cli(mesh, "init", "--key-file", str(admin_key))
        lock_cli(mesh, "sign", "a", "--key-file", str(admin_key))
        lock_cli(mesh, "sign", "b", "--key-file", str(admin_key))
        wait_for(lambda: a.status().peer("b").lock == "signed", 20, "a verified b's signature")
        assert b_key in in_wireguard(a) and a_key in in_wireguard(b)
        head = a.status().lock["head"]  # type: ignore[index]

        # The attacker writes a node into the database; a restart fans it out.
        rogue = insert_rogue_node(db)
        restart_control(mesh)
        for n in (a, b):
            wait_for(lambda n=n: n.netmap is not None and n.netmap.peer_by_key(rogue),
                     30, "control handing out the rogue node")
            assert n.status().peer("rogue").lock == "needs signature"
        assert rogue not in in_wireguard(a) | in_wireguard(b)
        assert b_key in in_wireguard(a) and a_key in in_wireguard(b)

        # A legitimate new node waits for an admin's signature, then comes in within seconds.
        c = up("c")
        c_key = Key(c.status().public_key)
        wait_for(lambda: a.status().peer("c") is not None, 20, "c in a's netmap")
        status = json.loads(lock_cli(mesh, "status", "--json").stdout)
        assert {n["name"]: n["lock"] for n in status["nodes"]} == {
            "a": "signed", "b": "signed", "c": "needs signature", "rogue": "needs signature"}
        assert "needs signature" in lock_cli(mesh, "status").stdout  # the table, too
        assert c_key not in in_wireguard(a) and a.status().peer("c").lock == "needs signature"
        t0 = time.monotonic()
        lock_cli(mesh, "sign", "c", "--key-file", str(admin_key))
        wait_for(lambda: c_key in in_wireguard(a) and c_key in in_wireguard(b), 10,
                 "c in WireGuard after signing")
        signed_in = time.monotonic() - t0
        wait_for(lambda: a.ping("c", timeout=1).rtt_ms is not None, 20, "a pings c")
        print(f"mesh lock: signed node configured on both peers {signed_in:.2f}s after "
              "`wgmesh lock sign`")

        # Revoking takes it out again.
        t0 = time.monotonic()
        lock_cli(mesh, "revoke", "c", "--key-file", str(admin_key))
        wait_for(lambda: c_key not in in_wireguard(a) | in_wireguard(b), 10,
                 "c out of WireGuard after revoking")
        print(f"mesh lock: revoked node removed {time.monotonic() - t0:.2f}s after "
              "`wgmesh lock revoke`")
        assert a.status().peer("c").lock == "revoked"
        head = a.status().lock["head"]  # type: ignore[index]

        # A forged update through the API: control refuses it (422) ...
        cp = lock_cli(mesh, "sign", "rogue", "--key-file", str(forger_key), check=False)
        assert cp.returncode == 1 and "not a trusted lock key" in cp.stderr
        assert "HTTP 422" in cp.stderr
        # ... and written straight into the database, every node refuses it and says so.
        for n in (a, b):
            n.on("lock_rejected", on_rejected)
        forged = insert_forged_update(db, lock.LockPrivateKey.parse(forger_key.read_text()))
        wait_for(lambda: len(rejected) >= 2, 15, "both nodes reporting the forged update")
        assert all("not a trusted lock key" in ev.data["error"] for ev in rejected)
        assert {ev.data["advertised"] for ev in rejected} == {forged.hash.hex()}
        for n in (a, b):
            st = n.status()
            assert st.lock["head"] == head  # type: ignore[index]
            assert "not a trusted lock key" in st.lock["rejected"]  # type: ignore[index]
        assert in_wireguard(a) == {b_key} and in_wireguard(b) == {a_key}
    finally:
        for n in nodes.values():
            n.down()
        mesh.close()
