"""The kernel backend's packet filter fails closed: without ``nft`` the enforcer raises
(instead of a stray FileNotFoundError or a log line), and backend selection refuses
the kernel backend, or falls back saying why. Runs nothing: ``PATH`` lacks ``nft``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wgmesh.netmap import FilterRule
from wgmesh.wireguard.backend import BackendError
from wgmesh.wireguard.kernel import KernelBackend
from wgmesh.wireguard.nftables import NftFilter, nft_available
from wgmesh.wireguard.select import open_backend

pytestmark = pytest.mark.unit

RULES = [FilterRule(src=("100.64.0.2/32",), dst=("100.64.0.1/32",), ports=((80, 80),),
                    proto="tcp")]


@pytest.fixture
def no_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with ``ip`` (the kernel probe needs it) and no ``nft``."""
    ip = shutil.which("ip")
    if ip is not None:
        (tmp_path / "ip").symlink_to(ip)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_nft_available_reports_a_missing_tool(no_nft: None) -> None:
    ok, why = nft_available()
    assert not ok and "nft" in why


def test_enforcer_without_nft_raises_backend_error(no_nft: None) -> None:
    f = NftFilter("wgt0")
    with pytest.raises(BackendError, match="wgt0: cannot run nft"):
        f.install(RULES)
    assert not f.installed
    backend = KernelBackend("wgt0")
    try:
        with pytest.raises(BackendError, match="cannot run nft"):
            backend.set_filter(RULES)  # what the node does before `up`
    finally:
        backend.close()


def test_selection_checks_for_nft(no_nft: None) -> None:
    with pytest.raises(BackendError, match="backend 'kernel' requested but nft"):
        open_backend("kernel", "wg9")
    try:
        backend, reason = open_backend("auto", "wg9")
    except BackendError as e:  # no root or no TUN here either
        assert "kernel: nft" in str(e)
    else:
        backend.down()  # never started: releases its wake-up pipe
        assert backend.kind == "userspace" and "nft" in reason

