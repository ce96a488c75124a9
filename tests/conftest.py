"""Test tiers and shared fixtures.

Tiers (markers): ``unit`` (pure), ``netns`` (root, namespaces), ``kernel`` (the
in-kernel WireGuard module: run inside one virtme-ng VM per session, see
``tests/support/vmtier.py``) and ``service`` (a real PostgreSQL). A tier that cannot
run here skips with its reason; in CI (``CI=true``) such a skip fails the run, so a
machine missing the VM, PostgreSQL or a tool is red, not quietly green.

Hypothesis budgets are the ``ci`` profile unless ``WGMESH_HYPOTHESIS`` names a longer
one (``tests/support/budget.py``).

``soak`` tests repeat a path a smaller test already proves, at a size that costs
minutes (1 GiB where 100 MiB proves it); they run only with ``--soak`` or
``WGMESH_SOAK=1``, which keeps every tier well inside its time budget.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from wgmesh.lab import Lab

# Shared helpers (polling, flows, the VM tier plugin, ...) live in tests/support.
sys.path.insert(0, str(Path(__file__).with_name("support")))

pytest_plugins = ["vmtier"]

# Before any test module is imported: their @settings inherit the active profile.
import budget  # noqa: E402

budget.register()

IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI") == "true"
TIERS = ("kernel", "service", "netns", "unit")  # a kernel test is netns too: the first wins
SOAK_SKIP = "soak: repeats a proven path at a large size (run with --soak or WGMESH_SOAK=1)"
# Skips that are a test's own logic, not a gap in this machine: allowed in CI as well.
DESIGNED_SKIPS = (SOAK_SKIP, "this host has kernel WireGuard; the kernel tier covers it")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     default=os.environ.get("WGMESH_SOAK") == "1",
                     help="also run the soak tests (large repeats of proven paths)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = config.getoption("soak")
    for item in items:
        if item.get_closest_marker("netns") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="netns tier needs root"))
        if item.get_closest_marker("soak") and not soak:
            item.add_marker(pytest.mark.skip(reason=SOAK_SKIP))


def _ci_gap(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """The reason of a skip that in CI is a gap in the machine (else None)."""
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return None if any(s in reason for s in DESIGNED_SKIPS) else reason


_tier_seconds: dict[str, list[float]] = {}  # tier -> [tests, seconds]
_collect_gaps: list[str] = []
_started = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (reason := _ci_gap(report)) is not None:
        report.outcome = "failed"
        report.longrepr = f"CI=true: a skip for a gap in this machine fails the run: {reason}"
    names = {m.name for m in item.iter_markers()} | {item.path.parent.name}
    tier = next((t for t in TIERS if t in names), "other")
    counts = _tier_seconds.setdefault(tier, [0, 0.0])
    counts[0] += call.when == "setup"
    counts[1] += report.duration
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if (reason := _ci_gap(report)) is not None:
        _collect_gaps.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _collect_gaps:  # a whole module skipped in CI: the run fails
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Per-tier time, for the CI time budget (the kernel tier's is the VM line)."""
    tr = terminalreporter
    if _collect_gaps:
        tr.write_sep("=", "CI=true: modules skipped for a gap in this machine", red=True)
        for gap in _collect_gaps:
            tr.write_line(gap)
    if not _tier_seconds:
        return
    tr.write_sep("-", "time per tier (setup + call + teardown, summed)")
    for tier, (n, secs) in sorted(_tier_seconds.items()):
        note = "  (stand-ins waiting for the VM)" if tier == "kernel" and n and not \
            os.environ.get("WGMESH_IN_VM") else ""
        tr.write_line(f"{tier:8} {n:4.0f} tests {secs:7.0f}s{note}")
    tr.write_line(f"session wall clock {time.monotonic() - _started:.0f}s")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab per test; torn down even when the test fails."""
    if not IS_ROOT:
        pytest.skip("netns tier needs root")
    with Lab() as lb:
        yield lb


@pytest.fixture
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.getbasetemp() / "wg-payload.bin"
    if not path.exists():
        with path.open("wb") as f:
            for i in range(int(os.environ.get("WGMESH_WG_TRANSFER_MB", "100"))):
                f.write(hashlib.shake_256(i.to_bytes(4, "big")).digest(1 << 20))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
