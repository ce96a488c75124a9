"""wgmesh userspace <-> the in-kernel WireGuard module, inside the virtme-ng VM.

Python runs about 10x slower there (TCG), so: one ping and a 2 MB transfer. The
kernel side is configured with plain ``ip`` and ``wg``; wgmesh over its UAPI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import wgsides as wi
from systools import need

from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]
#: Estimated seconds in the emulated VM (tests/support/vmtier.py balances its VMs by it).
VM_COST_S = 80


def test_userspace_with_kernel_wireguard(lab: Lab, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel initiates (only it knows an endpoint); wgmesh answers, learns the
    kernel's endpoint from the handshake, pings back and sends 2 MB."""
    need("wg")
    monkeypatch.setattr(wi, "STARTUP_S", 120.0)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(2 << 20))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    ha, hb = lab.add_public_host("a"), lab.add_public_host("b")
    a = wi.Side(lab, ha, f"{lab.prefix}a", "wgmesh", 1, tmp_path)
    k = wi.Side(lab, hb, f"{lab.prefix}k", "kernel", 2, tmp_path)
    a.add_peer(k, endpoint=False)
    k.add_peer(a, endpoint=True)
    for src, dst in ((k, a), (a, k)):
        r = lab.run(src.host, ["ping", "-c", "2", "-W", "20", dst.addr], check=False,
                    timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
    assert a.endpoint() == f"{k.host.ip}:{wi.PORT}"
    wi.transfer(a, k, (payload, digest))
