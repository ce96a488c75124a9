"""System tools a test needs, found or skipped (under CI=true a skip fails the run).

Its own module, not ``conftest``: ``from conftest import need`` bound to whichever
``conftest`` pytest imported first, so running a netns file together with a service
file broke collection."""

from __future__ import annotations

import shutil

import pytest


def need(tool: str) -> str:
    """The path of a system tool, or skip naming the package that provides it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (scripts/setup-debian.sh installs it)")
    return path
