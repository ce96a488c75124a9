"""File drop over the in-kernel WireGuard module (the VM tier), through a real NAT.

0 B, 1 B, 100 MiB and 1 GiB (sparse files with a random block every MiB: sendfile(2)
keeps the sender out of the emulated CPU's way).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from wgmesh.drop import peerapi as drop
from wgmesh.lab.network import Lab
from wgmesh.lab.wg import wg_mesh

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_drop_over_kernel_wireguard(lab: Lab) -> None:
    alice = lab.add_public_host("alice")
    bob = lab.add_node_host("bob", "eim")
    a, b = wg_mesh(lab, [alice, bob], device="kernel")
    work = Path(tempfile.mkdtemp(prefix="wgmesh-drop-kernel-"))
    try:
        srv = lab.python(alice, "-m", "wgmesh.lab.dropd", "serve", "--interface", a.ifname,
                         "--state-dir", str(work / "alice"), "--name",
                         f"bob={b.public_key.b64()}", "--allow", "bob")
        srv.wait_for_output("listening", timeout=120)
        files = [work / "empty", work / "one", work / "hundred.bin", work / "giga.bin"]
        files[0].write_bytes(b"")
        files[1].write_bytes(b"\x01")
        for path, size in ((files[2], 100 << 20), (files[3], 1 << 30)):
            with open(path, "wb") as f:  # sparse, a random block every MiB
                f.truncate(size)
                for off in range(0, size, 1 << 20):
                    f.seek(off)
                    f.write(os.urandom(4096))
        cp = lab.run(bob, [sys.executable, "-m", "wgmesh.lab.dropd", "file", "send", a.ip,
                           *map(str, files), "--json"], timeout=600)
        results = [json.loads(line) for line in cp.stdout.splitlines()]
        inbox = work / "alice" / "inbox"
        for f, r in zip(files, results, strict=True):
            assert r["sha256"] == drop.file_digest(f) == drop.file_digest(inbox / f.name)
        assert os.listdir(inbox / ".partial") == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
