"""Issue 13 §1 in the lab: a machine in the middle of the control channel, and an impostor.

The MITM is a process on the node's NAT router (the path every packet of the node
takes), fed by an iptables REDIRECT: it terminates the node's TLS connection to
control and relays it over its own. With a certificate the node's CA trusts it can
read and rewrite the HTTP stream, yet the node refuses the rewritten delta, keeps
its last good netmap, reports it and keeps its tunnel to the real peer. Without
such a certificate the node does not talk to it at all. A capture on the router
shows neither the node token, the auth key nor any netmap in the clear.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from polling import wait_for

import wgmesh
from wgmesh.keys import PrivateKey
from wgmesh.lab.mesh import CONTROL_PORT, MeshLab
from wgmesh.lab.network import Host, Lab, Process
from wgmesh.lab.tls import LabCA

pytestmark = pytest.mark.netns

MITM_PORT = 8443
MITM = r"""
import asyncio, os, ssl, sys

port, up_ip, up_port, cert, key, ca, swap_file = sys.argv[1:]
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain(cert, key)
client = ssl.create_default_context(cafile=ca)

def swap(data):
    try:
        pairs = [line.split() for line in open(swap_file).read().splitlines() if line]
    except FileNotFoundError:
        return data
    for old, new in pairs:
        if old.encode() in data:
            data = data.replace(old.encode(), new.encode())  # same length: chunk sizes hold
            print("rewrote", old, flush=True)
    return data

async def pump(r, w, rewrite):
    buf = b""  # a partial line held back, so a key never straddles two reads
    try:
        while True:
            try:
                data = await asyncio.wait_for(r.read(65536), 0.1 if buf else None)
            except TimeoutError:  # nothing more is coming for now: let the rest go
                data, buf = swap(buf), b""
                w.write(data)
                continue
            if not data:
                break
            if rewrite:
                buf += data
                cut = buf.rfind(b"\n") + 1
                data, buf = swap(buf[:cut]), buf[cut:]
            if data:
                w.write(data)
                await w.drain()
        w.write(buf)
    except (OSError, ssl.SSLError):
        pass
    finally:
        w.close()

async def handle(r, w):
    try:
        ur, uw = await asyncio.open_connection(up_ip, int(up_port), ssl=client)
    except OSError:
        w.close()
        return
    await asyncio.gather(pump(r, uw, False), pump(ur, w, True))

async def main():
    srv = await asyncio.start_server(handle, "0.0.0.0", int(port), ssl=server)
    print("mitm listening", flush=True)
    await srv.serve_forever()

asyncio.run(main())
"""


def machine_in_the_middle(lab: Lab, mesh: MeshLab, nat: Host, cert: Path, key: Path,
                          swap_file: Path) -> Process:
    """The MITM on ``nat``, with every LAN connection to control redirected into it."""
    p = lab.python(nat, "-c", MITM, str(MITM_PORT), mesh.control.ip, str(CONTROL_PORT),
                   str(cert), str(key), mesh.control_ca, str(swap_file))
    p.wait_for_output("mitm listening", timeout=30)
    lab.run(nat, ["iptables", "-w", "-t", "nat", "-I", "PREROUTING", "-i", "lan0", "-p", "tcp",
                  "-d", mesh.control.ip, "--dport", str(CONTROL_PORT), "-j", "REDIRECT",
                  "--to-ports", str(MITM_PORT)])
    return p


def capture(lab: Lab, nat: Host, path: Path) -> Process:
    """tcpdump on the router: both legs of the MITM (the node's and its own to control)."""
    p = lab.spawn(nat, ["tcpdump", "-i", "any", "-U", "-n", "-w", str(path),
                        f"tcp port {CONTROL_PORT} or tcp port {MITM_PORT}"])
    p.wait_for_output("listening on", timeout=30, stream="stderr")
    return p


def test_a_machine_in_the_middle_cannot_change_the_netmap(lab: Lab, tmp_path: Path) -> None:
    if subprocess.run(["which", "tcpdump"], capture_output=True).returncode:
        pytest.skip("tcpdump not installed")
    mesh = MeshLab(lab, relays=1)
    ha = lab.add_node_host("a", "eim")
    assert ha.nat is not None
    swap_file = tmp_path / "swap"
    cap = capture(lab, ha.nat, tmp_path / "a.pcap")
    cert, key = mesh.ca.issue("mitm", mesh.control.ip)  # a certificate the node trusts
    mitm = machine_in_the_middle(lab, mesh, ha.nat, cert, key, swap_file)
    mesh.add_node("b", "eim")
    authkey = mesh.authkey()
    rejected: list[wgmesh.Event] = []
    got_rejected = threading.Event()

    def on_rejected(ev: wgmesh.Event) -> None:
        rejected.append(ev)
        got_rejected.set()

    na = wgmesh.Node(mesh.control_url, authkey=authkey, state_dir=tmp_path / "a", netns=ha.ns,
                     hostname="a", ifname="wgta", backend="userspace",
                     control_ca=mesh.control_ca)
    na.on("control_rejected", on_rejected)
    try:
        na.up()
        peer = na.wait_for(lambda s: s.peer("b") is not None, timeout=60).peer("b")
        assert peer is not None
        real_key = peer.key
        wait_for(lambda: na.ping("b", timeout=1).rtt_ms is not None, 60, "a ping to b")

        # The MITM rewrites b's key in whatever control sends next: b's rename upserts b.
        attacker = PrivateKey.generate().public.b64()
        swap_file.write_text(f"{real_key} {attacker}\n")
        mesh.admin("nodes", "rename", "b", "bee")
        assert got_rejected.wait(60), mitm.stdout
        assert "rewrote" in mitm.stdout
        assert "failed authentication" in rejected[0].data["error"]
        st = na.status()
        assert st.control_rejected and "failed authentication" in st.control_rejected
        assert na.netmap is not None
        peers = {p.name: p.node_key.b64() for p in na.netmap.peers.values()}
        assert peers == {"b": real_key}  # the last good map, not the rewritten one
        r = wait_for(lambda: (r := na.ping("b", timeout=1)).rtt_ms is not None and r, 30,
                     "a ping to b after the rejection")
        assert r.peer == "b"

        # The MITM steps aside: the node resumes and catches up with the real change.
        swap_file.unlink()
        wait_for(lambda: na.netmap is not None and {
            p.name: p.node_key.b64() for p in na.netmap.peers.values()} == {"bee": real_key},
            60, "the genuine rename")
    finally:
        na.down()
        cap.stop()
    token = (tmp_path / "a" / "node.token").read_text().strip()
    wire = (tmp_path / "a.pcap").read_bytes()
    assert len(wire) > 10_000  # it did see the traffic
    secrets_ = {"node token": token, "auth key": authkey.partition("#")[0],
                "peer key": real_key, "netmap": '"peers"', "new name": '"bee"'}
    leaked = [what for what, s in secrets_.items() if s.encode() in wire]
    assert not leaked, f"in the clear on the router: {leaked}"
    mesh.close()


def test_a_machine_in_the_middle_without_a_trusted_certificate_is_refused(
        lab: Lab, tmp_path: Path) -> None:
    mesh = MeshLab(lab, relays=1)
    hc = lab.add_node_host("c", "eim")
    assert hc.nat is not None
    cert, key = LabCA(tmp_path / "rogue", "rogue CA").issue("mitm", mesh.control.ip)
    mitm = machine_in_the_middle(lab, mesh, hc.nat, cert, key, tmp_path / "swap")
    nc = wgmesh.Node(mesh.control_url, authkey=mesh.authkey(), state_dir=tmp_path / "c",
                     netns=hc.ns, hostname="c", ifname="wgtc", backend="userspace",
                     control_ca=mesh.control_ca)
    try:
        with pytest.raises(wgmesh.WgmeshError, match="CERTIFICATE_VERIFY_FAILED"):
            nc.up()
    finally:
        nc.down()
    assert not (tmp_path / "c" / "node.token").exists()
    assert "rewrote" not in mitm.stdout
    mesh.close()


def test_a_control_service_with_another_key_is_refused_in_one_line(lab: Lab,
                                                                   tmp_path: Path) -> None:
    """An impostor at its own address, with a certificate the node trusts (the lab CA),
    but not the control key the node's auth key string pins."""
    mesh = MeshLab(lab, relays=1)
    authkey = mesh.authkey()
    real_key = authkey.partition("#")[2]
    imp = lab.add_public_host("impostor")
    cert, key = mesh.ca.issue("impostor", imp.ip)
    p = lab.python(imp, "-m", "wgmesh", "control", "serve", "--listen",
                   f"{imp.ip}:{CONTROL_PORT}", "--state-dir", str(tmp_path / "imp"),
                   "--tls-cert", str(cert), "--tls-key", str(key))
    p.wait_for_output("listening", timeout=60)
    h = lab.add_node_host("d", "eim")
    cp = lab.run(h, [sys.executable, "-m", "wgmesh", "up", "--control",
                     f"https://{imp.ip}:{CONTROL_PORT}", "--authkey", authkey,
                     "--control-ca", mesh.control_ca, "--state-dir", str(tmp_path / "d"),
                     "--socket", str(tmp_path / "d.sock"), "--backend", "userspace"],
                 check=False, timeout=60)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert cp.stderr.strip().count("\n") == 0, cp.stderr
    assert f"not the pinned key {real_key}: refusing it" in cp.stderr
    assert not (tmp_path / "d" / "node.token").exists()
    mesh.close()
