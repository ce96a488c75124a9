"""The STUN codec against coturn, a reference server, across a real NAT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from polling import wait_for
from systools import need

from wgmesh.lab.network import Host, Lab

pytestmark = pytest.mark.netns

SUPPORT = str(Path(__file__).parents[1] / "support")
# Queries from a fixed port so the expected mapping (eim keeps the port) is known.
CLIENT = """
import json, socket, sys
sys.path.insert(0, sys.argv[3])
from stuntools import query
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 41641))
addr, rtt = query((sys.argv[1], int(sys.argv[2])), sock=s, rto=0.2, max_sends=6)
print(json.dumps({"addr": addr, "rtt": rtt}))
"""


def stun_query(lab: Lab, host: Host, server: str, port: int) -> dict[str, object]:
    """Query until the server is up (it binds asynchronously), within a deadline."""
    errors: list[str] = []

    def answer() -> dict[str, object] | None:
        cp = lab.run(host, [sys.executable, "-c", CLIENT, server, str(port), SUPPORT],
                     check=False)
        errors.append(cp.stderr)
        return json.loads(cp.stdout) if cp.returncode == 0 else None
    return wait_for(answer, 20, lambda: f"a STUN answer: {errors[-1]}")


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
