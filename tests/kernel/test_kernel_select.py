"""Backend selection: auto picks the kernel module where it works and says why;
explicit choices that can't be honoured are clear errors. The host has no
WireGuard module (netns tier); the VM has one (kernel tier)."""

from __future__ import annotations

import os

import pytest

from wgmesh.wireguard.backend import BackendError, kernel_wireguard_available
from wgmesh.wireguard.select import open_backend

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="probing needs root")


@pytest.mark.netns
@needs_root
def test_host_without_module_falls_back_or_refuses() -> None:
    ok, why = kernel_wireguard_available()
    if ok:
        pytest.skip("this host has kernel WireGuard; the kernel tier covers it")
    with pytest.raises(BackendError, match="backend 'kernel' requested but kernel refused"):
        open_backend("kernel", "wg9")
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        open_backend("fast", "wg9")
    with pytest.raises(BackendError, match="cannot be placed in 'elsewhere'"):
        open_backend("auto", "wg9", netns="elsewhere")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun for the userspace fallback")
    backend, reason = open_backend("auto", "wg9")
    backend.down()  # never started: releases its wake-up pipe
    assert backend.kind == "userspace" and reason.startswith("userspace: no kernel WireGuard")
    assert why in reason
    backend, reason = open_backend("userspace", "wg9")
    backend.down()
    assert reason == "userspace: requested"


@pytest.mark.kernel
@pytest.mark.netns
def test_vm_auto_picks_kernel() -> None:
    for kind in ("auto", "kernel"):
        backend, reason = open_backend(kind, "wg9", netns="wgmnowhere")
        assert backend.kind == "kernel" and reason == "kernel: the kernel created a wireguard link"
        backend.close()  # never started: nothing to delete
