"""Mesh names in the lab: control's mesh domain reaches the nodes, each node answers
``dig @TUNNELADDR peer.DOMAIN`` (from itself and from a peer through the tunnel), and the
opt-in system hooks (a hosts-file block, resolv.conf) are written to files given as paths
(in a lab namespace ``/etc`` is the host's) and restored on ``down`` and after ``kill -9``."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from polling import wait_for
from systools import need

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Host, Lab
from wgmesh.node.names import resolved_running

pytestmark = pytest.mark.netns

DOMAIN = "corp.test"


def _dig(lab: Lab, host: Host, server: str, name: str) -> str:
    return lab.run(host, ["dig", f"@{server}", name, "A", "+short", "+time=2", "+tries=1"],
                   check=False).stdout.strip()


def test_dig_mesh_names_and_restore_the_resolver_files(lab: Lab, tmp_path: Path) -> None:
    need("dig")
    assert not resolved_running()  # the lab has no systemd-resolved: the file hooks apply
    hosts, resolv = tmp_path / "hosts", tmp_path / "resolv.conf"
    hosts.write_text("127.0.0.1 localhost\n")
    resolv.write_text("nameserver 192.0.2.53\nsearch example.test\n")
    originals = (hosts.read_text(), resolv.read_text())
    mesh = MeshLab(lab, relays=1, control_args=["--mesh-domain", DOMAIN])
    a = mesh.add_node("a", "eim", args=["--dns-hosts-file", str(hosts),
                                        "--dns-resolv-conf", str(resolv)])
    b = mesh.add_node("b", "eim")
    mesh.wait_connected()
    a_ip, b_ip = a.ipv4, b.ipv4
    wait_for(lambda: _dig(lab, a.host, a_ip, f"b.{DOMAIN}") == b_ip, 20, "a answers b")
    # through the tunnel: b asks a's responder for a's own name
    wait_for(lambda: _dig(lab, b.host, a_ip, f"a.{DOMAIN}") == a_ip, 20, "b asks a")
    assert _dig(lab, a.host, a_ip, f"nope.{DOMAIN}") == ""  # NXDOMAIN
    assert f"{b_ip} b.{DOMAIN} b" in hosts.read_text()
    assert hosts.read_text().startswith("127.0.0.1 localhost\n")
    text = resolv.read_text()
    assert f"nameserver {a_ip}" in text and f"search {DOMAIN} example.test" in text
    lab.run(a.host, [sys.executable, "-m", "wgmesh", "down", "--socket", a.socket])
    a.proc.wait(30)
    assert (hosts.read_text(), resolv.read_text()) == originals
    a.restart()
    wait_for(lambda: f"b.{DOMAIN}" in hosts.read_text(), 40, "hooks again after restart")
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    assert resolv.read_text() != originals[1]  # a killed agent leaves its hooks...
    a.restart()  # ...and its next start restores them before hooking in again
    a.proc.wait_for_output("wgmesh up:", timeout=40)
    assert resolv.read_text().count("nameserver") == 1
    lab.run(a.host, [sys.executable, "-m", "wgmesh", "down", "--socket", a.socket])
    a.proc.wait(30)
    assert (hosts.read_text(), resolv.read_text()) == originals
    mesh.close()
