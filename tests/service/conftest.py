"""Fixtures of the control service tests: a server on 127.0.0.1, its admin client, an auth key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wgmesh.control import ControlClient, ControlServer


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
