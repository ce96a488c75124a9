"""File drop over the in-kernel WireGuard module (the VM tier), through a real NAT.

Sizes stay small here: the VM runs under emulation, so the 100 MiB and 1 GiB
proofs run over wireguard-go in tests/test_drop_netns.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from wgmesh import drop
from wgmesh.lab import Lab
from wgmesh.labwg import wg_mesh

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_drop_over_kernel_wireguard(lab: Lab) -> None:
    alice = lab.add_public_host("alice")
    bob = lab.add_node_host("bob", "eim")
    a, b = wg_mesh(lab, [alice, bob], device="kernel")
    work = Path(tempfile.mkdtemp(prefix="wgmesh-drop-kernel-"))
    try:
        srv = lab.python(alice, "-m", "wgmesh.dropd", "serve", "--interface", a.ifname,
                         "--state-dir", str(work / "alice"), "--name",
                         f"bob={b.public_key.b64()}", "--allow", "bob")
        srv.wait_for_output("listening", timeout=120)
        files = [work / "empty", work / "one", work / "ten.bin"]
        files[0].write_bytes(b"")
        files[1].write_bytes(b"\x01")
        files[2].write_bytes(os.urandom(10 << 20))
        cp = lab.run(bob, [sys.executable, "-m", "wgmesh.dropd", "file", "send", a.ip,
                           *map(str, files), "--json"], timeout=600)
        results = [json.loads(line) for line in cp.stdout.splitlines()]
        inbox = work / "alice" / "inbox"
        for f, r in zip(files, results, strict=True):
            assert r["sha256"] == drop.file_digest(f) == drop.file_digest(inbox / f.name)
        assert os.listdir(inbox / ".partial") == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
