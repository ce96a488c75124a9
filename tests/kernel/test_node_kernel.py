"""The Node on the kernel backend, in the VM: the kernel grid subset (eim x eim direct, trusted
only after a WireGuard handshake; eim x symmetric; symmetric x symmetric and udp-blocked
relayed through the loopback bridge), the ACL enforced by nftables on the WireGuard
interface, and a file through the tunnel. One lab, to keep the emulated VM's budget.

Every CI run proves the kernel's direct path (eim x eim, trusted after a handshake) and its
relayed path through the loopback bridge (eim x udp-blocked). The pairs that need NATs of
their own (eim x symmetric, whose single-port linear scan may end either way, and
symmetric x symmetric, relayed like udp-blocked) only repeat those two paths at four more
emulated nodes' cost, so they run in the soak run (``--soak``), as does the full kernel grid
(README)."""

from __future__ import annotations

import hashlib
import os

import pytest
from flows import SERVER, connect
from polling import wait_for

from wgmesh.lab.grid import expected_path, measure_pair
from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_kernel_nodes_direct_relay_filter_and_file(lab: Lab) -> None:
    policy = {"groups": {}, "tags": ["tag:web"], "rules": [
        {"src": ["*"], "dst": ["*:*"], "proto": "icmp"},
        {"src": ["*"], "dst": ["*:22"], "proto": "tcp", "caps": ["file-send"]},
        {"src": ["*"], "dst": ["tag:web:80"], "proto": "tcp"}]}
    mesh = MeshLab(lab, relays=1, backend="kernel", policy=policy)
    # eim x eim (direct) and eim x udp-blocked (relay), plus the filter and a file
    a = mesh.add_node("a", "eim")
    b = mesh.add_node("b", "eim", tags=("tag:web",))
    c = mesh.add_node("c", "udp-blocked")
    mesh.wait_connected(240)
    assert a.status()["backend"] == "kernel"

    # relay first (via the loopback bridge), then direct for the EIM pair
    r = wait_for(lambda: (r := a.ping("c", timeout=3)) and r["rtt_ms"] is not None and r, 120)
    assert r["path"] == "relay"
    wait_for(lambda: (p := a.peer("b")) and p["path"] == "direct", 120)
    r = wait_for(lambda: (r := a.ping("b", timeout=3))["rtt_ms"] and r["path"] == "direct" and r,
               60)
    assert r["endpoint"].startswith("198.51.100.")
    pb = a.peer("b")
    assert pb["last_handshake"] and pb["rx_bytes"] > 0

    # the kernel backend's packet filter: an nftables table on the interface
    out = lab.run(a.host, ["nft", "list", "ruleset"]).stdout
    assert 'iifname "wga" ct state established,related accept' in out
    lab.python(b.host, "-c", SERVER, "80", "81").wait_for_output("ready", timeout=120)
    assert connect(lab, a.host, b.ipv4, 80) == "hello"  # allowed: * -> tag:web:80
    assert connect(lab, a.host, b.ipv4, 81).startswith("refused")  # denied by default

    # a file through the tunnel, relayed (c is udp-blocked), digest checked
    data = os.urandom(2 * 1024 * 1024)
    path = mesh.dir / "f.bin"
    path.write_bytes(data)
    a.call("file_send", {"peer": "c", "paths": [str(path)]}, timeout=240)
    got = c.call("file_list")
    assert any(f["sha256"] == hashlib.sha256(data).hexdigest() for f in got)
    mesh.close()


@pytest.mark.soak
def test_kernel_grid_pairs_with_their_own_nats(lab: Lab) -> None:
    """The kernel grid pairs that need their own NATs, measured as `wgmesh lab grid` does."""
    mesh = MeshLab(lab, relays=1, backend="kernel")
    # eim x symmetric: the kernel has one port, so the port search is a linear scan that may
    # miss within its budget; either path passes and the result is printed.
    for i, (ka, kb) in enumerate([("eim", "symmetric"), ("symmetric", "symmetric")]):
        r = measure_pair(mesh, i, ka, kb, direct_budget=45)
        print(r)
        want = expected_path(ka, kb, "kernel")
        assert r.connected and (want == "either" or r.path == want), r

    mesh.close()
