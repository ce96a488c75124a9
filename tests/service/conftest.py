"""Fixtures of the control service tests: a server on 127.0.0.1, its admin client, an auth key,
and a database on SQLite and (with ``WGMESH_TEST_POSTGRES_DSN``) a fresh PostgreSQL one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgmesh.control import ControlClient, ControlServer

DSN = os.environ.get("WGMESH_TEST_POSTGRES_DSN")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, keepalive_s=0.3,
                       flush_delay_s=0.0) as srv:
        yield srv


@pytest.fixture
def admin(server: ControlServer) -> ControlClient:
    return ControlClient(server.url, api_key=server.admin_key)


@pytest.fixture
def authkey(admin: ControlClient) -> str:
    return admin.create_auth_key(reusable=True)["key"]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A control database: a SQLite path, then a PostgreSQL DSN (skipped without one)."""
    if request.param == "sqlite":
        yield str(tmp_path / "control.db")
        return
    if not DSN:
        pytest.skip("WGMESH_TEST_POSTGRES_DSN not set (scripts/start-postgres.sh)")
    import psycopg

    name = f"wgm_{secrets.token_hex(4)}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{DSN.rpartition('/')[0]}/{name}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
