"""File drop between Nodes: relayed and direct, with captures proving the relay carries only
ciphertext and the control service never sees file bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from polling import wait_for

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns

MARKER = b"WGMESH-PLAINTEXT-MARKER-7f3a9c"


def _payload(path: Path, size: int) -> str:
    block = (MARKER * (65536 // len(MARKER) + 1))[:65536]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _capture(lab: Lab, host, path: Path):  # type: ignore[no-untyped-def]
    p = lab.spawn(host, ["tcpdump", "-i", "any", "-U", "-s", "0", "-w", str(path), "tcp or udp"])
    wait_for(lambda: "listening" in p.stderr, 10, lambda: f"tcpdump: {p.stderr}")
    return p


def test_files_relayed_and_direct_never_in_plaintext_outside_the_tunnel(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    home = mesh.add_node("home", "eim")
    office = mesh.add_node("office", "udp-blocked")  # only the relay reaches it
    cafe = mesh.add_node("cafe", "eim")
    mesh.wait_connected()
    relay_pcap, control_pcap = mesh.dir / "relay.pcap", mesh.dir / "control.pcap"
    caps = [_capture(lab, mesh.relay_hosts[0], relay_pcap),
            _capture(lab, mesh.control, control_pcap)]
    sizes = {"empty.bin": 0, "one.bin": 1, "ten.bin": 10 * 1024 * 1024}
    digests = {n: _payload(mesh.dir / n, s) for n, s in sizes.items()}
    for name in sizes:
        res = home.call("file_send", {"peer": "office", "paths": [str(mesh.dir / name)]},
                        timeout=180)
        assert res[0]["size"] == sizes[name]
    assert home.peer("office")["path"] == "relay"
    got = {f["name"]: f for f in office.call("file_list")}
    for name, size in sizes.items():
        assert got[name]["size"] == size and got[name]["sha256"] == digests[name]

    # direct path: wait for it, then a file
    wait_for(lambda: (home.peer("cafe") or {}).get("path") == "direct", 30, "a direct path",
             interval=0.2)
    home.call("file_send", {"peer": "cafe", "paths": [str(mesh.dir / "ten.bin")]}, timeout=180)
    assert {f["sha256"] for f in cafe.call("file_list")} == {digests["ten.bin"]}

    for c in caps:
        c.stop()
    relay_bytes, control_bytes = relay_pcap.read_bytes(), control_pcap.read_bytes()
    assert len(relay_bytes) > 10 * 1024 * 1024  # the relayed file really went through here
    assert MARKER not in relay_bytes and MARKER[:16] not in relay_bytes
    assert MARKER[:16] not in control_bytes
    assert len(control_bytes) < 1024 * 1024  # control saw small JSON, no file
    assert MARKER.decode() not in mesh.control_proc.stdout + mesh.control_proc.stderr
    # nothing written outside the inbox of the receiver's state dir
    inbox = mesh.dir / "nodes" / "office" / "inbox"
    assert sorted(p.name for p in inbox.iterdir() if not p.name.startswith(".")) == \
        sorted(sizes)
    assert not any(os.path.exists(mesh.dir / "nodes" / "office" / n) for n in sizes)
    mesh.close()


@pytest.mark.soak  # the 10 MiB relayed in the test above proves this path
def test_one_gigabyte_over_the_relay(lab: Lab) -> None:
    """1 GiB (sparse, with random blocks) between Nodes whose only path is the relay."""
    mesh = MeshLab(lab, relays=1)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "udp-blocked")
    mesh.wait_connected()
    path = mesh.dir / "big.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        for off in range(0, 1 << 30, 1 << 24):
            f.seek(off)
            f.write(os.urandom(4096))
    with open(path, "rb") as f:
        want = hashlib.file_digest(f, "sha256").hexdigest()
    res = a.call("file_send", {"peer": "b", "paths": [str(path)]}, timeout=900)
    assert res[0]["size"] == 1 << 30 and a.peer("b")["path"] == "relay"
    assert [(f["size"], f["sha256"]) for f in b.call("file_list", timeout=300)] == \
        [(1 << 30, want)]
    path.unlink()
    mesh.close()
