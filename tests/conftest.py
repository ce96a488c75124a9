"""Test tiers and shared fixtures.

Tiers (markers): ``unit`` (pure), ``netns`` (root, namespaces), ``kernel`` (the
in-kernel WireGuard module: run inside one virtme-ng VM per session, see
``tests/support/vmtier.py``) and ``service`` (a real PostgreSQL). A tier that cannot
run here skips with its reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgmesh.lab import Lab

# Shared helpers (polling, flows, the VM tier plugin, ...) live in tests/support.
sys.path.insert(0, str(Path(__file__).with_name("support")))

pytest_plugins = ["vmtier"]

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("netns") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="netns tier needs root"))


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab per test; torn down even when the test fails."""
    if not IS_ROOT:
        pytest.skip("netns tier needs root")
    with Lab() as lb:
        yield lb


def need(tool: str) -> str:
    """The path of a system tool, or skip naming the package that provides it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (scripts/setup-debian.sh installs it)")
    return path


@pytest.fixture
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.getbasetemp() / "wg-payload.bin"
    if not path.exists():
        with path.open("wb") as f:
            for i in range(int(os.environ.get("WGMESH_WG_TRANSFER_MB", "100"))):
                f.write(hashlib.shake_256(i.to_bytes(4, "big")).digest(1 << 20))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
