"""Mesh lock in the lab: the admin CLI, and what an attacker holding control's database does."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from wgmesh import lock
from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.mesh import MeshLab


def lock_cli(mesh: MeshLab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``wgmesh lock ARGS`` run on the control host as an admin would."""
    return mesh.lab.run(mesh.control, [sys.executable, "-m", "wgmesh", "lock", *args,
                                       "--server", mesh.control_url,
                                       "--control-ca", mesh.control_ca,
                                       "--api-key-file", str(mesh.api_key_file)], check=check)


def keygen(mesh: MeshLab, path: Path) -> Path:
    mesh.lab.run(mesh.control, [sys.executable, "-m", "wgmesh", "lock", "keygen",
                                "--out", str(path)])
    return path


def control_db(mesh: MeshLab) -> Path:
    return mesh.dir / "control" / "control.db"


def restart_control(mesh: MeshLab) -> None:
    """What makes a database write reach the streams without the change feed: a restart."""
    mesh.control_proc.stop()
    mesh.control_proc = mesh.lab.spawn(mesh.control, mesh.control_proc.argv)
    mesh.control_proc.wait_for_output("listening", timeout=60)


def insert_rogue_node(db: Path, name: str = "rogue") -> Key:
    """A node row with the attacker's own key, written past every API check."""
    rogue = PrivateKey.generate().public
    conn = sqlite3.connect(db, timeout=10)
    with conn:
        last = conn.execute("SELECT MAX(addr_index) FROM nodes").fetchone()[0]
        conn.execute(
            "INSERT INTO nodes (name, node_key, disco_key, addr_index, tags, created_at, "
            "key_expiry, endpoints, home_relay, online, last_seen, hostinfo, auth_key_id) "
            "VALUES (?, ?, ?, ?, '[]', ?, 0, '[]', 0, 1, ?, '{}', '')",
            (name, rogue.b64(), PrivateKey.generate().public.b64(), last + 1, time.time(),
             time.time()))
    conn.close()
    return rogue


def insert_forged_update(db: Path, forger: lock.LockPrivateKey) -> lock.Update:
    """A lock update signed by a key nobody trusts, appended straight into the database and
    announced on the change feed, so every stream carries the forged head within a poll."""
    conn = sqlite3.connect(db, timeout=10)
    with conn:
        rows = conn.execute("SELECT data FROM lock_updates ORDER BY seq").fetchall()
        state = lock.verify([lock.decode_update(bytes.fromhex(r[0])) for r in rows])
        forged = lock.sign_node(state, PrivateKey.generate().public, forger,
                                time=int(time.time()))
        conn.execute("INSERT INTO lock_updates VALUES (?, ?, ?, ?, ?)",
                     (len(rows) + 1, forged.hash.hex(), forged.parent.hex(),
                      forged.encode().hex(), time.time()))
        conn.execute("INSERT INTO changes (ts, kind, entity, data) VALUES (?, 'lock', ?, '{}')",
                     (time.time(), forged.hash.hex()))
    conn.close()
    return forged
