"""The ACL reaches the data plane: on the userspace backend the device drops a denied
flow, passes an allowed one, and lets replies to our own flows back in; the kernel
backend's nftables enforcer works in the interface's namespace and fails closed."""

from __future__ import annotations

import subprocess

import pytest
from flows import SERVER, connect
from polling import wait_for
from systools import need

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab
from wgmesh.netmap import FilterRule
from wgmesh.wireguard.backend import BackendError
from wgmesh.wireguard.kernel import KernelBackend
from wgmesh.wireguard.nftables import NftFilter

pytestmark = pytest.mark.netns

POLICY = {"groups": {}, "tags": ["tag:web"], "rules": [
    {"src": ["*"], "dst": ["tag:web:80"], "proto": "tcp"},
    {"src": ["*"], "dst": ["*:*"], "proto": "icmp"},
    {"src": ["*"], "dst": ["tag:web:22"], "proto": "tcp", "caps": ["file-send"]}]}

def test_acl_enforced_in_userspace_device(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1, policy=POLICY)
    a = mesh.add_node("a", "eim")
    web = mesh.add_node("web", "eim", tags=("tag:web",))
    mesh.wait_connected()
    for n in (a, web):
        lab.python(n.host, "-c", SERVER, "80", "81").wait_for_output("ready")
    web_ip, a_ip = web.ipv4, a.ipv4
    # tunnel up (ICMP is allowed)
    wait_for(lambda: a.ping("web", timeout=1)["rtt_ms"] is not None, 30, "a ping to web")
    assert connect(lab, a.host, web_ip, 80) == "hello"     # allowed: * -> tag:web:80
    assert connect(lab, a.host, web_ip, 81).startswith("refused")  # port not in the rule
    assert connect(lab, web.host, a_ip, 80).startswith("refused")  # nothing allows -> a
    # file-send opens the peer API's port to its holders, whatever the port rules say
    f = mesh.dir / "doc.txt"
    f.write_text("through the filter")
    a.call("file_send", {"peer": "web", "paths": [str(f)]}, timeout=60)
    assert [x["name"] for x in web.call("file_list")] == ["doc.txt"]
    mesh.close()


def test_kernel_filter_is_nftables_in_the_interface_namespace(lab: Lab) -> None:
    """No WireGuard module needed: the table matches the interface by name, so it goes in
    before the interface exists (as the node does it), is replaced in one transaction,
    and leaves with ``down``; a failure is a BackendError, never a log line."""
    need("nft")
    h = lab.add_node_host("k", "none")

    def table() -> str:
        return lab.run(h, ["nft", "list", "ruleset"]).stdout

    def rule(port: int) -> FilterRule:
        return FilterRule(src=("100.64.0.2/32",), dst=("100.64.0.1/32",),
                          ports=((port, port),), proto="tcp")

    backend = KernelBackend("wgk", netns=h.ns)
    backend.set_filter([rule(80)])
    assert 'iifname "wgk" ip saddr 100.64.0.2 ip daddr 100.64.0.1 tcp dport 80 accept' \
        in table() and 'iifname "wgk" drop' in table()
    here = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "wgmesh_wgk" not in here  # the lab host's namespace, not ours
    backend.set_filter([rule(81)])
    assert "dport 81 accept" in table() and "dport 80" not in table()
    with pytest.raises(BackendError, match="nft failed"):  # a script nft refuses
        NftFilter('wg"k', netns=h.ns).install([rule(82)])
    with pytest.raises(BackendError, match="cannot run nft"):  # no such namespace
        NftFilter("wgk", netns=h.ns + "-gone").install([rule(82)])
    assert "dport 81 accept" in table()
    backend.down()
    assert "wgmesh_wgk" not in table()
