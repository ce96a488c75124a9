"""Test tiers and shared fixtures.

Tiers (markers): ``unit`` (pure), ``netns`` (root, namespaces), ``kernel`` (the
in-kernel WireGuard module: run inside one virtme-ng VM per session, see
``tests/vmtier.py``) and ``service`` (a real PostgreSQL). A tier that cannot
run here skips with its reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from wgmesh.lab import Lab

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
