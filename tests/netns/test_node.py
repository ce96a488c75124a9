"""The Node: public API (sync facade in-process, in a netns), the agent over its local API,
restart from the cached netmap, and the CLI's one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from polling import wait_for

import wgmesh
import wgmesh.node.localapi
from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns
WGMESH = [sys.executable, "-m", "wgmesh"]


def test_agents_go_direct_and_ping_through_the_tunnel(lab: Lab) -> None:
    mesh = MeshLab(lab)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    mesh.wait_connected()
    first = wait_for(lambda: (r := a.ping("b", timeout=1)) and r["rtt_ms"] is not None and r)
    assert first["peer"] == "b"
    wait_for(lambda: (p := a.peer("b")) and p["path"] == "direct")
    r = wait_for(lambda: (r := a.ping("b", timeout=1))["rtt_ms"] and r["path"] == "direct" and r)
    assert r["endpoint"].startswith("198.51.100.")  # b's NAT mapping, not its LAN address
    st = b.status()
    assert st["backend"] == "userspace" and st["ipv4"].startswith("100.")
    peer = st["peers"][0]
    assert peer["name"] == "a" and peer["last_handshake"] and peer["rx_bytes"] > 0
    sock = Path(a.socket)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    # netcheck from the node's own WireGuard port, through the agent
    nc = a.call("netcheck")
    assert nc["udp"] and nc["ipv4"].startswith("198.51.100.") and nc["hard_nat"] is False
    cp = subprocess.run([*WGMESH, "netcheck", "--socket", a.socket], capture_output=True,
                        text=True, timeout=60, check=True)
    assert "198.51.100." in cp.stdout
    # the CLI over the same socket: an aligned table, JSON, and ping with its path
    cp = subprocess.run([*WGMESH, "status", "--socket", a.socket], capture_output=True,
                        text=True, timeout=60, check=True)
    lines = cp.stdout.splitlines()  # summary lines (node, mesh DNS, ...), then the table
    at = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    head, row = lines[at:at + 2]
    assert head.split()[:3] == ["PEER", "ADDRESS", "PATH"] and row.split()[0] == "b"
    assert head.index("PATH") == row.index("direct")
    cp = subprocess.run([*WGMESH, "status", "--json", "--socket", a.socket],
                        capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(cp.stdout)["peers"][0]["name"] == "b"
    cp = subprocess.run([*WGMESH, "ping", "b", "--socket", a.socket], capture_output=True,
                        text=True, timeout=60, check=True)
    assert cp.stdout.startswith("pong from b") and "via direct 198.51.100." in cp.stdout
    mesh.close()


def test_sync_node_in_a_namespace_with_events_and_restart_from_cache(lab: Lab,
                                                                     tmp_path: Path) -> None:
    mesh = MeshLab(lab)
    key = mesh.authkey()
    ha = lab.add_node_host("a", "eim")
    hb = lab.add_node_host("b", "none")
    seen: list[wgmesh.Event] = []
    got_direct = threading.Event()

    def on_path(ev: wgmesh.Event) -> None:
        seen.append(ev)
        if ev.data["path"] == "direct":
            got_direct.set()

    na = wgmesh.Node(mesh.control_url, authkey=key, state_dir=tmp_path / "a", netns=ha.ns,
                     hostname="a", ifname="wgna", backend="userspace",
                     control_ca=mesh.control_ca)
    nb = wgmesh.Node(mesh.control_url, authkey=key, state_dir=tmp_path / "b", netns=hb.ns,
                     hostname="b", ifname="wgnb", backend="userspace",
                     control_ca=mesh.control_ca)
    na.on("peer_path_changed", on_path)
    try:
        st = na.up()
        nb.up()
        assert isinstance(st, wgmesh.Status) and st.ipv4
        na.wait_for(lambda s: s.peer("b") is not None, timeout=20)
        assert got_direct.wait(20), seen
        r = wait_for(lambda: (r := na.ping("b", timeout=1)).rtt_ms is not None and r)
        assert r.peer == "b"
        assert "PEER" in str(na.status()) and "<table>" in na.status()._repr_html_()
        key_file = tmp_path / "a" / "node.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        addr, pub = st.ipv4, st.public_key

        # Control goes away; a restarted node comes back from its cached netmap with the
        # same identity and address, and still reaches its peer.
        na.down()
        mesh.control_proc.stop()
        na = wgmesh.Node(mesh.control_url, state_dir=tmp_path / "a", netns=ha.ns,
                         hostname="a", ifname="wgna", backend="userspace",
                         control_ca=mesh.control_ca)
        st2 = na.up()
        assert (st2.ipv4, st2.public_key) == (addr, pub)
        assert not st2.control_online
        r = wait_for(lambda: (r := na.ping("b", timeout=1)).rtt_ms is not None and r, 30)
        assert r.peer == "b"
    finally:
        na.down()
        nb.down()
        mesh.close()


def test_async_node_inside_a_running_loop(lab: Lab, tmp_path: Path) -> None:
    """What a Jupyter cell does: a loop is already running on this thread."""
    mesh = MeshLab(lab, relays=1)
    key = mesh.authkey()
    ha = lab.add_node_host("solo", "none")

    async def main() -> str:
        # A sync Node works from inside a running loop: it has its own loop thread.
        n = wgmesh.Node(mesh.control_url, authkey=key, state_dir=tmp_path / "s",
                        netns=ha.ns, hostname="solo", ifname="wgsolo", backend="userspace",
                        control_ca=mesh.control_ca)
        try:
            return n.up().name
        finally:
            n.down()

    assert asyncio.run(main()) == "solo"
    mesh.close()


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WGMESH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WGMESH_DEBUG": ""})


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cp = _cli("status", "--socket", str(tmp_path / "none.sock"))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert cp.stderr.strip().count("\n") == 0 and "no wgmesh agent running" in cp.stderr
    cp = _cli("up", "--control", "http://127.0.0.1:9", "--authkey", "wgk_x", "--state-dir",
              str(tmp_path / "st"), "--socket", str(tmp_path / "a.sock"))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert "unreachable" in cp.stderr and cp.stderr.strip().count("\n") == 0


def test_bad_authkey_is_a_clear_error(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    h = lab.add_node_host("x", "none")
    cp = lab.run(h, [*WGMESH, "up", "--control", mesh.control_url, "--authkey", "wgk_bogus",
                     "--control-ca", mesh.control_ca,
                     "--state-dir", str(mesh.dir / "x"), "--socket", str(mesh.dir / "x.sock")],
                 check=False)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert "auth" in cp.stderr.lower()
    mesh.close()


def test_provisioning_example(lab: Lab) -> None:
    """examples/provision.py: an admin-API auth key, then a node up with it."""
    mesh = MeshLab(lab, relays=1)
    h = lab.add_node_host("web-1", "eim")
    script = Path(__file__).parents[2] / "examples" / "provision.py"
    cp = lab.run(h, [sys.executable, str(script), "--control", mesh.control_url,
                     "--control-ca", mesh.control_ca,
                     "--api-key-file", str(mesh.api_key_file), "--state-dir",
                     str(mesh.dir / "web"), "--hostname", "web-1", "--backend", "userspace",
                     "--once"], timeout=120)
    assert "web-1" in cp.stdout and "100.64." in cp.stdout
    nodes = mesh.admin("nodes", "list", "--json")
    assert '"web-1"' in nodes
    mesh.close()


ASYNC_SCRIPT = """
import asyncio, sys, wgmesh

async def main(url, key, state, ca):
    async with wgmesh.AsyncNode(url, authkey=key, state_dir=state, hostname="anode",
                                ifname="wganode", backend="userspace", control_ca=ca) as node:
        events = node.events.aiter()
        st = await node.status()
        print("up", st.name, st.ipv4, flush=True)
        async def first_peer():
            async for ev in events:
                if ev.name == "peer_added":
                    return ev.data["name"]
        print("peer", await asyncio.wait_for(first_peer(), 60), flush=True)
        for _ in range(100):
            r = await node.ping("bnode", timeout=1)
            if r.rtt_ms is not None:
                print("pong", r.path, flush=True)
                break

asyncio.run(main(*sys.argv[1:]))
"""


def test_async_node_with_event_iterator(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    key = mesh.authkey()
    h = lab.add_node_host("anode", "eim")
    p = lab.python(h, "-c", ASYNC_SCRIPT, mesh.control_url, key, str(mesh.dir / "anode"),
                   mesh.control_ca)
    p.wait_for_output("up anode 100.64.", timeout=60)
    mesh.add_node("bnode", "eim")
    out = p.wait_for_output("pong", timeout=90)
    assert "peer bnode" in out
    assert p.wait(30) == 0, p.stderr[-2000:]
    mesh.close()


def test_deleted_node_registers_again_with_its_auth_key(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    a = mesh.add_node("a", "none")
    a.proc.wait_for_output("wgmesh up:", timeout=60)
    key_before = a.status()["public_key"]
    a.stop()
    mesh.admin("nodes", "delete", "a")
    h = lab.hosts["a"]
    p = lab.python(h, "-m", "wgmesh", "up", "--control", mesh.control_url, "--authkey",
                   mesh.authkey(), "--control-ca", mesh.control_ca, "--state-dir", str(mesh.dir / "nodes" / "a"), "--hostname",
                   "a", "--ifname", "wga", "--backend", "userspace", "--socket",
                   str(mesh.dir / "a-again.sock"))
    p.wait_for_output("wgmesh up:", timeout=60)
    st = wgmesh.node.localapi.call("status", path=mesh.dir / "a-again.sock")
    assert st["public_key"] == key_before  # same node key, a new registration
    assert '"a"' in mesh.admin("nodes", "list", "--json")
    mesh.close()
