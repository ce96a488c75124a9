"""Control-service faults (issue 14, Faults): ``kill -9`` mid-write and a full disk.

The control service runs as a real ``wgmesh control serve`` process so it can be killed
with SIGKILL, on SQLite and on PostgreSQL; the disk-full case puts the database on a small
tmpfs: SQLite's state directory mounted in a private mount namespace (``unshare -m``),
which disappears with the process, or a PostgreSQL tablespace. The mesh side of the same fault (tunnels carry traffic while control is
down, streams resume) is ``tests/netns/test_faults.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from polling import wait_for
from test_control import register

from wgmesh import netmap as nm
from wgmesh.cli.main import main as cli_main
from wgmesh.control import ControlAPIError, ControlClient
from wgmesh.errors import WgmeshError
from wgmesh.lab.network import read_output

pytestmark = pytest.mark.service
DSN = os.environ.get("WGMESH_TEST_POSTGRES_DSN")


class ControlProcess:
    """``wgmesh control serve`` on 127.0.0.1 as a child process a test may SIGKILL.

    ``tmpfs``: a size (``1M``); the state directory is then a tmpfs of that size mounted
    in the process's own mount namespace, reachable from the test as :attr:`fs`.
    """

    def __init__(self, state: Path, db: str | None = None, tmpfs: str | None = None) -> None:
        self.state = state
        serve = [sys.executable, "-m", "wgmesh", "control", "serve", "--listen", "127.0.0.1:0",
                 "--state-dir", str(state), "--challenge-rate", "0", "--keepalive", "0.3",
                 *(["--db", db] if db else [])]
        if tmpfs:
            state.mkdir(parents=True, exist_ok=True)
            mount = shlex.join(["mount", "-t", "tmpfs", "-o", f"size={tmpfs}", "tmpfs",
                                str(state)])
            serve = ["unshare", "-m", "sh", "-c", f"{mount} && exec {shlex.join(serve)}"]
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(serve, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)
        line = wait_for(self._listening, 30, lambda: f"control to listen: {self.stderr}")
        self.url = line.split("listening on ")[1].split(",")[0]
        self.fs = Path(f"/proc/{self.proc.pid}/root{state}") if tmpfs else state
        self.admin = ControlClient(self.url, api_key=(self.fs / "admin.key").read_text().strip())

    def _listening(self) -> str | None:
        assert self.proc.poll() is None, f"control exited: {self.stderr}"
        return next((ln for ln in read_output(self._out).splitlines()
                     if "listening on" in ln), None)

    @property
    def stderr(self) -> str:
        return read_output(self._err)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()
        self._err.close()


@contextlib.contextmanager
def control(state: Path, db: str | None = None, tmpfs: str | None = None
            ) -> Iterator[ControlProcess]:
    c = ControlProcess(state, db, tmpfs)
    try:
        yield c
    finally:
        c.stop()


def _policy(i: int) -> dict[str, Any]:
    """Policy number ``i``: each one different, so the stored text names which it is."""
    return {"tags": [f"tag:v{i}"], "rules": [{"src": [f"tag:v{i}"], "dst": ["*:*"]}]}


def test_kill_9_mid_registration_and_policy_change_loses_nothing_committed(
        db: str, tmp_path: Path) -> None:
    """SIGKILL while ~16 registrations and a policy change are in flight: after a restart
    every answered registration is there with its address, the policy is a whole one no
    older than the last answered, the audit chain verifies, and writes work again."""
    db_arg = None if db.endswith(".db") else db  # SQLite: the default <state>/control.db
    state = tmp_path / "state"
    answered: dict[int, tuple[str, str, str]] = {}  # node id -> (key, ipv4, ipv6)
    policies: list[tuple[int, int]] = []  # (policy number, version it got)
    cut: list[BaseException] = []  # requests the kill cut off (their outcome is unknown)
    stop = threading.Event()
    with control(state, db_arg) as c:
        ak = c.admin.create_auth_key(reusable=True)["key"]

        def one(i: int) -> None:
            if stop.is_set():
                return
            try:
                _, key, node = register(c.url, ak, f"storm{i}")
            except WgmeshError as e:  # refused or cut off: its outcome is unknown
                cut.append(e)
            else:
                answered[node.id] = (str(key.public), node.ipv4, node.ipv6)

        def change_policy() -> None:
            with contextlib.suppress(WgmeshError):
                for i in range(1, 10_000):
                    if stop.is_set():
                        return
                    policies.append((i, c.admin.set_policy(_policy(i))))

        with ThreadPoolExecutor(16) as pool:
            pool.submit(change_policy)
            for i in range(2000):
                pool.submit(one, i)
            wait_for(lambda: len(answered) >= 60 and len(policies) >= 3, 60,
                     lambda: f"60 registrations and 3 policies ({len(answered)}, "
                             f"{len(policies)})")
            c.kill9()
            stop.set()
    assert answered and policies and cut  # the kill did land mid-registration
    with control(state, db_arg) as c:
        nodes = {n["id"]: n for n in c.admin.nodes()}
        for nid, (key, v4, v6) in answered.items():
            assert nid in nodes, f"answered registration of node {nid} lost"
            assert (nodes[nid]["node_key"], nodes[nid]["ipv4"], nodes[nid]["ipv6"]) == (
                key, v4, v6)
        # No half-written node: each has both addresses, none shared, and its audit entry.
        for field in ("ipv4", "ipv6", "name"):
            values = [n[field] for n in nodes.values()]
            assert all(values) and len(set(values)) == len(values), field
        audit = c.admin.audit(limit=10_000)
        registered = {e["target"] for e in audit if e["action"] == "node.register"}
        assert registered == {f"node:{nid}" for nid in nodes}
        last_number, last_version = policies[-1]
        pol = c.admin.get_policy()
        assert pol["version"] >= last_version
        # The answered policy or the one in flight, whole (it parses and is one we sent).
        assert pol["policy"] in (_policy(last_number), _policy(last_number + 1)), pol
        assert c.admin.audit_verify()["ok"]
        # The service takes writes again.
        assert c.admin.set_policy(_policy(0)) == pol["version"] + 1
        _, _, again = register(c.url, ak, "after")
        assert again.id not in answered and again.ipv4 not in {a[1] for a in answered.values()}
        assert c.admin.audit_verify()["ok"]
    audit_db = db_arg or str(state / "control.db")
    assert cli_main(["control", "audit", "verify", "--db", audit_db,
                     "--audit-key-file", str(state / "audit.key")]) == 0
    if db_arg is None:
        with sqlite3.connect(audit_db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC
    try:  # the last few blocks
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


@dataclasses.dataclass
class SmallDisk:
    """Where a control database lives on a small file system that the test fills."""

    kind: str  # "sqlite" or "postgres"
    db: str | None = None  # --db; None: SQLite in the state directory ...
    tmpfs: str | None = None  # ... which is then a tmpfs of this size
    mount: Path | None = None  # PostgreSQL: the tmpfs holding the database's tablespace


@contextlib.contextmanager
def postgres_on_tmpfs(dsn: str, size: str) -> Iterator[tuple[str, Path]]:
    """A fresh database on the server of ``dsn`` whose tables live in a tablespace on a
    tmpfs of ``size``: (its DSN, the mount point). All of it is removed afterwards."""
    import psycopg

    name = f"wgm_{secrets.token_hex(4)}"
    mount = Path(tempfile.mkdtemp(prefix="wgmesh-pg-tablespace-"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        owner = os.stat(row[0])  # the server's user must own the tablespace's directory
        subprocess.run(["mount", "-t", "tmpfs", "-o",
                        f"size={size},mode=0700,uid={owner.st_uid},gid={owner.st_gid}",
                        "tmpfs", str(mount)], check=True)
        try:
            conn.execute(f"CREATE TABLESPACE {name} LOCATION '{mount}'")
            try:
                conn.execute(f"CREATE DATABASE {name}")
                try:
                    conn.execute(f"ALTER DATABASE {name} SET default_tablespace = {name}")
                    yield f"{dsn.rpartition('/')[0]}/{name}", mount
                finally:
                    conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
            finally:
                conn.execute(f"DROP TABLESPACE {name}")
        finally:
            subprocess.run(["umount", str(mount)], check=True)
            mount.rmdir()


@pytest.fixture(params=["sqlite", "postgres"])
def small_disk(request: pytest.FixtureRequest) -> Iterator[SmallDisk]:
    """SQLite with its state directory on a 16 MiB tmpfs in the server's own mount
    namespace; PostgreSQL (``WGMESH_TEST_POSTGRES_DSN``) with the tables in a tablespace on
    a 4 MiB tmpfs (the server's WAL stays on its own disk: a full WAL stops the server)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs")
    if request.param == "sqlite":
        yield SmallDisk("sqlite", tmpfs="16M")
        return
    if not DSN:
        pytest.skip("WGMESH_TEST_POSTGRES_DSN not set (scripts/start-postgres.sh)")
    with postgres_on_tmpfs(DSN, "4M") as (db, mount):
        yield SmallDisk("postgres", db=db, mount=mount)


def _until_refused(write: Callable[[], Any], tries: int = 400) -> tuple[list[Any], ControlAPIError]:
    """Repeat ``write`` until it is refused: what it returned until then, and the refusal.

    PostgreSQL first fills the free room of the pages it already holds, so on a full disk
    a write fails only once a table must grow; SQLite appends every commit to its WAL."""
    done = []
    for _ in range(tries):
        try:
            done.append(write())
        except ControlAPIError as e:
            return done, e
    pytest.fail(f"{tries} writes on a full disk all succeeded")


def _postgres_corruption(db: str) -> list[tuple[Any, ...]]:
    """What PostgreSQL's own checker (amcheck) finds wrong in every table and index."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        found = conn.execute(
            "SELECT c.relname, v.* FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,"
            " verify_heapam(c.oid) v WHERE n.nspname = 'public' AND c.relkind = 'r'").fetchall()
        for (index,) in conn.execute(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind = 'i'").fetchall():
            conn.execute("SELECT bt_index_check(%s, true)", (index,))  # raises if corrupt
        return found


def test_disk_full_is_a_clear_error_and_corrupts_nothing(small_disk: SmallDisk,
                                                         tmp_path: Path) -> None:
    """The database's file system filled while a node is streaming: every kind of write is
    refused with a 507 that says why (no 500, no traceback in the log), reads still work;
    once space is freed what was committed is intact and the service takes writes again."""
    state = tmp_path / "state"
    with control(state, small_disk.db, small_disk.tmpfs) as c:
        ak = c.admin.create_auth_key(reusable=True)["key"]
        _, _, first = register(c.url, ak, "before")
        versions = [c.admin.set_policy(_policy(1))]
        stream_client, _, streaming = register(c.url, ak, "streamer")
        stream = stream_client.stream()
        next(stream)  # a node streaming throughout: presence writes hit the full disk too
        late_client, _, late = register(c.url, ak, "late")
        _fill((small_disk.mount or c.fs) / "filler")
        late_stream = late_client.stream()  # comes online while nothing can be written
        next(late_stream)
        names = (f"during{i}" for i in range(10_000))
        policies = iter(range(2, 10_000))
        registered, refused = _until_refused(lambda: register(c.url, ak, next(names))[2].name)
        errors = [refused]
        answered, refused = _until_refused(lambda: c.admin.set_policy(_policy(next(policies))))
        versions += answered
        errors.append(refused)
        for attempt in (lambda: c.admin.create_auth_key(reusable=True),
                        lambda: c.admin.tag_node(first.id, ["tag:v1"]),
                        c.admin.nodes):  # an admin read is audited first: refused too
            done, refused = _until_refused(attempt)
            errors.append(refused)
            if small_disk.kind == "sqlite":
                assert not done, "a write committed on a full disk"
        for e in errors:
            assert (e.status, e.code) == (507, "insufficient_storage"), e
            assert "disk" in e.message
        if small_disk.kind == "sqlite":
            assert not registered and not answered, "a write committed on a full disk"
        # What needs no write goes on: the node's stream (keepalives), the health check.
        assert isinstance(next(stream), nm.Keepalive)
        assert requests.get(c.url + "/v1/health", timeout=5).json()["ok"]
        if small_disk.kind == "sqlite":
            # Housekeeping renews the streaming node's presence every 5 s: let it meet the
            # full disk (on PostgreSQL the update may fit in a page the table already has).
            wait_for(lambda: "housekeeping failed" in c.stderr or "Traceback" in c.stderr, 10,
                     "a background write to meet the full disk", interval=0.2)
        ((small_disk.mount or c.fs) / "filler").unlink()
        # Freed: committed state intact, audit chain whole, writes work again.
        register(c.url, ak, "after")
        assert c.admin.set_policy(_policy(1000)) == versions[-1] + 1
        nodes = {n["name"]: n for n in c.admin.nodes()}
        assert set(nodes) == {"before", "streamer", "late", *registered, "after"}
        assert c.admin.get_policy() == {"version": versions[-1] + 1, "policy": _policy(1000)}
        assert (nodes["before"]["id"], nodes["before"]["ipv4"]) == (first.id, first.ipv4)
        assert c.admin.audit_verify()["ok"]
        # The background writers outlived the full disk: presence of the streaming node is
        # renewed again (every 5 s) after space came back.
        freed_seen = nodes["streamer"]["last_seen"]
        wait_for(lambda: next(n["last_seen"] for n in c.admin.nodes()
                              if n["id"] == streaming.id) > freed_seen, 15,
                 "the streaming node's presence renewed after the disk was freed", interval=0.5)
        # The presence report that met the full disk is written once there is room.
        wait_for(lambda: next(n["online"] for n in c.admin.nodes() if n["id"] == late.id), 10,
                 "the node that came online during the full disk to be marked online",
                 interval=0.5)
        stream.close()
        late_stream.close()
        log = c.stderr
        assert "Traceback" not in log, log[-3000:]
        assert "out of disk space" in log
        if small_disk.db:
            assert _postgres_corruption(small_disk.db) == []
        else:
            with sqlite3.connect(c.fs / "control.db") as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
