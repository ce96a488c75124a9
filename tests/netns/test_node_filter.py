"""The ACL reaches the data plane: on the userspace backend the device drops a denied
flow, passes an allowed one, and lets replies to our own flows back in."""

from __future__ import annotations

import time

import pytest
from flows import SERVER, connect

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

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
    deadline = time.monotonic() + 30
    while (a.ping("web", timeout=1))["rtt_ms"] is None:  # tunnel up (ICMP is allowed)
        assert time.monotonic() < deadline
    assert connect(lab, a.host, web_ip, 80) == "hello"     # allowed: * -> tag:web:80
    assert connect(lab, a.host, web_ip, 81).startswith("refused")  # port not in the rule
    assert connect(lab, web.host, a_ip, 80).startswith("refused")  # nothing allows -> a
    # file-send opens the peer API's port to its holders, whatever the port rules say
    f = mesh.dir / "doc.txt"
    f.write_text("through the filter")
    a.call("file_send", {"peer": "web", "paths": [str(f)]}, timeout=60)
    assert [x["name"] for x in web.call("file_list")] == ["doc.txt"]
    mesh.close()
