"""Paths that explain themselves, and pins, on agents behind real lab NATs, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from polling import wait_for

from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import Lab
from wgmesh.traversal import REASON_DIRECT, REASON_HARD_BOTH, REASON_PINNED, REASON_UDP_BLOCKED

pytestmark = pytest.mark.netns
WGMESH = [sys.executable, "-m", "wgmesh"]


def _cli(node: MeshNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WGMESH, *args, "--socket", node.socket], capture_output=True,
                          text=True, timeout=60, check=check)


def _reason(node: MeshNode, peer: str) -> str | None:
    p = node.peer(peer)
    return p["reason"] if p else None


def test_reasons_name_the_obstacle_and_a_pin_moves_the_path(lab: Lab) -> None:
    mesh = MeshLab(lab)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    s = mesh.add_node("s", "symmetric")
    mesh.add_node("t", "symmetric")
    u = mesh.add_node("u", "udp-blocked")
    mesh.wait_connected()
    wait_for(lambda: (p := a.peer("b")) and p["path"] == "direct", 30, "a-b direct")
    assert _reason(a, "b") == REASON_DIRECT
    wait_for(lambda: _reason(s, "t") == REASON_HARD_BOTH, 60,
             lambda: f"s explains t: {_reason(s, 't')}")
    wait_for(lambda: _reason(u, "a") == REASON_UDP_BLOCKED, 60,
             lambda: f"u explains a: {_reason(u, 'a')}")
    cands = s.peer("t")["candidates"]  # type: ignore[index]
    assert cands and {c["result"] for c in cands} <= {"no answer", "not tried"}
    story = _cli(s, "status", "--explain", "t").stdout
    assert "because: endpoint-dependent NAT on both sides" in story
    assert "candidates tried:" in story
    # A direct pin that cannot be had (symmetric x symmetric): pin_failed, and the relay
    # keeps t reachable. The agent's event list shows it to a CLI that asks afterwards.
    _cli(s, "pin", "t", "direct")

    def pin_failed() -> list[dict[str, object]]:
        return json.loads(_cli(s, "events", "--name", "pin_failed", "--json").stdout)

    ev = wait_for(pin_failed, 60, "a pin_failed event from s")[0]
    assert ev["name"] == "pin_failed"
    assert {k: ev["data"][k] for k in ("peer", "pin")} == {"peer": "t", "pin": "direct"}
    assert ev["data"]["reason"]
    assert "pin_failed" in _cli(s, "events").stdout
    p = s.peer("t")
    assert p and p["path"] == "relay" and p["pinned"] == "direct"
    wait_for(lambda: s.ping("t", timeout=2)["rtt_ms"] is not None, 20, "t via the relay")
    _cli(s, "unpin", "t")

    # Pin a direct pair to the relay, and back.
    assert _cli(a, "pin", "b", "relay").stdout.strip() == "b: pinned to relay"
    p = wait_for(lambda: (p := a.peer("b")) and p["path"] == "relay" and p, 10, "pinned")
    assert p["reason"] == REASON_PINNED and p["pinned"] == "relay"
    # b loses its direct path to a (no pongs) and follows onto the relay: still reachable.
    wait_for(lambda: (p := b.peer("a")) and p["path"] == "relay", 20, "b follows")
    wait_for(lambda: a.ping("b", timeout=2)["rtt_ms"] is not None, 20, "ping via the relay")
    assert json.loads(_cli(a, "status", "--json").stdout)["peers"][0]["pinned"] == "relay"
    _cli(a, "unpin", "b")
    p = wait_for(lambda: (p := a.peer("b")) and p["path"] == "direct" and p, 20, "unpinned")
    assert p["reason"] == REASON_DIRECT and p["pinned"] is None
    # A region: the lab has one, region 1; an unknown one is one clear line.
    _cli(a, "pin", "b", "1")
    wait_for(lambda: (p := a.peer("b")) and p["path"] == "relay" and p["relay_region"] == 1,
             10, "pinned to region 1")
    bad = _cli(a, "pin", "b", "9", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "no relay region 9" in bad.stderr
    # An expired node drops out of its peers' configuration and says why.
    mesh.admin("nodes", "expiry", "u", "--set", "2020-01-01")
    wait_for(lambda: a.peer("u") is None, 20, "u drops out of a's netmap")
    st = wait_for(lambda: (st := u.status())["state"] == "expired" and st, 20, "u knows")
    assert "expired at 2020-01-01" in st["state_reason"]
    assert "expired: node key expired" in _cli(u, "status").stdout
    # Re-authenticating with an auth key renews it: back in, and running.
    assert u.call("reauthenticate", {"authkey": mesh.authkey()})["key_expiry"] > 0
    wait_for(lambda: a.peer("u") is not None, 20, "u is back in a's netmap")
    wait_for(lambda: u.status()["state"] == "running", 20, "u runs again")
    mesh.close()
