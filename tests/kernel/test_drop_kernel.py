"""File drop over the in-kernel WireGuard module (the VM tier), through a real NAT.

0 B, 1 B and 100 MiB; 1 GiB only in the soak run (it proves the same path again and took
826 s under emulation). Sparse files with a random block every MiB: sendfile(2) keeps the
sender out of the emulated CPU's way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from wgmesh.drop.sender import file_digest
from wgmesh.lab.network import Lab
from wgmesh.lab.wg import wg_mesh

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


@pytest.mark.parametrize("sizes", [
    pytest.param({"empty": 0, "one": 1, "hundred.bin": 100 << 20}, id="0B-1B-100MiB"),
    pytest.param({"giga.bin": 1 << 30}, id="1GiB", marks=pytest.mark.soak),
])
def test_drop_over_kernel_wireguard(lab: Lab, sizes: dict[str, int]) -> None:
    alice = lab.add_public_host("alice")
    bob = lab.add_node_host("bob", "eim")
    a, b = wg_mesh(lab, [alice, bob], device="kernel")
    work = Path(tempfile.mkdtemp(prefix="wgmesh-drop-kernel-"))
    try:
        srv = lab.python(alice, "-m", "wgmesh.lab.dropd", "serve", "--interface", a.ifname,
                         "--state-dir", str(work / "alice"), "--name",
                         f"bob={b.public_key.b64()}", "--allow", "bob")
        srv.wait_for_output("listening", timeout=120)
        files = [work / name for name in sizes]
        for path, size in zip(files, sizes.values(), strict=True):
            with open(path, "wb") as f:  # sparse, a random block every MiB
                f.truncate(size)
                for off in range(0, size, 1 << 20):
                    f.seek(off)
                    f.write(os.urandom(min(4096, size - off)))
        cp = lab.run(bob, [sys.executable, "-m", "wgmesh.cli.file", "send", a.ip,
                           *map(str, files), "--json"], timeout=600)
        results = [json.loads(line) for line in cp.stdout.splitlines()]
        inbox = work / "alice" / "inbox"
        for f, r in zip(files, results, strict=True):
            assert r["sha256"] == file_digest(f) == file_digest(inbox / f.name)
        assert os.listdir(inbox / ".partial") == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
