"""The STUN codec against coturn, a reference server, across a real NAT."""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import need
from wgmesh.lab.network import Host, Lab

pytestmark = pytest.mark.netns

# Queries from a fixed port so the expected mapping (eim keeps the port) is known.
CLIENT = """
import json, socket, sys
from wgmesh import stun
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 41641))
addr, rtt = stun.query((sys.argv[1], int(sys.argv[2])), sock=s, rto=0.2, max_sends=6)
print(json.dumps({"addr": addr, "rtt": rtt}))
"""


def stun_query(lab: Lab, host: Host, server: str, port: int) -> dict[str, object]:
    """Query until the server is up (it binds asynchronously), within a deadline."""
    deadline = time.monotonic() + 20
    while True:
        cp = lab.run(host, [sys.executable, "-c", CLIENT, server, str(port)], check=False)
        if cp.returncode == 0:
            return json.loads(cp.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(cp.stderr)


def test_codec_against_coturn(lab: Lab) -> None:
    turnserver = need("turnserver")
    srv = lab.add_public_host("stun")
    pc = lab.add_node_host("pc", "eim")
    assert pc.nat is not None
    lab.spawn(srv, [turnserver, "--stun-only", "--no-cli", "--no-tls", "--no-dtls",
                    "-L", srv.ip, "-p", "3478", "--log-file", "stdout", "--simple-log", "-n"])
    out = stun_query(lab, pc, srv.ip, 3478)
    assert out["addr"] == [pc.nat.ip, 41641]
    assert isinstance(out["rtt"], float) and out["rtt"] > 0
