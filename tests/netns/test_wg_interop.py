"""wgmesh userspace <-> wireguard-go in lab namespaces, configured with the stock `wg` tool.

Each test builds two public hosts, runs ``wgmesh userspace`` on one and
``wireguard-go`` on the other, and configures both over UAPI with ``wg set``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from polling import wait_for
from systools import need
from wgsides import PORT, WG_GO_ENV, transfer, two_sides

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns

@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", ["wgmesh", "wireguard-go"])
def test_ping_and_transfer_with_wireguard_go(lab: Lab, tmp_path: Path, payload: tuple[Path, str],
                                             initiator: str, psk: bool) -> None:
    pskfile = None
    if psk:
        pskfile = tmp_path / "psk"
        pskfile.write_text(PrivateKey.generate().b64())
        pskfile.chmod(0o600)
    with two_sides(lab, tmp_path) as (a, b):
        # Only the initiator knows where the other is, so it must start the handshake.
        a.add_peer(b, endpoint=initiator == "wgmesh", psk=pskfile)
        b.add_peer(a, endpoint=initiator == "wireguard-go", psk=pskfile)
        first, second = (a, b) if initiator == "wgmesh" else (b, a)
        first.ping(second)
        second.ping(first)
        assert second.endpoint() == f"{first.host.ip}:{PORT}"  # learned from the handshake
        transfer(first, second, payload)
        transfer(second, first, payload)
        assert ("preshared key: (hidden)" in a.wg("show", a.ifname)) == psk


def test_three_rekeys_with_shortened_clock(lab: Lab, tmp_path: Path,
                                           payload: tuple[Path, str]) -> None:
    """WGMESH_WG_TIME_SCALE=20 (test-only) makes wgmesh's REKEY_AFTER_TIME 6 s, so it
    initiates a real rekey with wireguard-go every ~6 s while traffic flows."""
    with two_sides(lab, tmp_path, env_a={"WGMESH_WG_TIME_SCALE": "20"}) as (a, b):
        a.add_peer(b, endpoint=True)
        b.add_peer(a, endpoint=False)
        a.ping(b)
        seen = {b.handshake_time()}
        pinger = lab.spawn(a.host, ["ping", "-i", "0.2", "-W", "2", a.addr.replace(".1", ".2")])
        wait_for(lambda: seen.add(b.handshake_time()) or len(seen) >= 4, 40, "3 rekeys")
        pinger.stop()
        assert len(seen - {0}) >= 4  # the first handshake plus three rekeys, seen by wireguard-go
        a.ping(b)
        transfer(a, b, payload)
        transfer(b, a, payload)


@pytest.mark.parametrize("mover", ["wireguard-go", "wgmesh"])
def test_roaming_peer_endpoint(lab: Lab, tmp_path: Path, payload: tuple[Path, str],
                               mover: str) -> None:
    """Either side moves to a new address and port (a NAT rebinding or a new network);
    its next packet moves the other's endpoint, with no reconfiguration there."""
    with two_sides(lab, tmp_path) as (a, b):
        a.add_peer(b, endpoint=True)
        b.add_peer(a, endpoint=False)
        a.ping(b)
        moving, still = (b, a) if mover == "wireguard-go" else (a, b)
        assert still.endpoint() == f"{moving.host.ip}:{PORT}"
        new_ip = moving.roam(201, 51999)
        moving.ping(still)  # its next packet, from the new endpoint, moves the endpoint
        assert still.endpoint() == f"{new_ip}:51999"
        still.ping(moving)
        assert moving.endpoint() == f"{still.host.ip}:{PORT}"
        transfer(a, b, payload)


def test_wg_tool_manages_wgmesh(lab: Lab, tmp_path: Path) -> None:
    """`wg show/set/showconf` over UAPI; the daemon detaches and exits when its link goes."""
    need("wg")
    ha, hb = lab.add_public_host("a"), lab.add_public_host("b")
    ia, ib = f"{lab.prefix}a", f"{lab.prefix}b"
    for h, i in ((ha, ia), (hb, ib)):
        r = lab.run(h, [sys.executable, "-m", "wgmesh", "userspace", i], timeout=30)
        assert r.returncode == 0  # returned once the detached daemon was serving
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    conf_a = (f"[Interface]\nPrivateKey = {ka.b64()}\nListenPort = {PORT}\n\n[Peer]\n"
              f"PublicKey = {kb.public.b64()}\nAllowedIPs = 10.78.0.2/32, fd78::2/128\n"
              f"Endpoint = {hb.ip}:{PORT}\nPersistentKeepalive = 25\n")
    conf_b = (f"[Interface]\nPrivateKey = {kb.b64()}\nListenPort = {PORT}\n\n[Peer]\n"
              f"PublicKey = {ka.public.b64()}\nAllowedIPs = 10.78.0.1/32\n")
    # b first: a's keepalive starts a handshake the moment a is configured.
    for h, i, conf, addr in ((hb, ib, conf_b, "10.78.0.2/24"), (ha, ia, conf_a, "10.78.0.1/24")):
        f = tmp_path / f"{i}.conf"
        f.write_text(conf)
        f.chmod(0o600)
        lab.run(h, ["wg", "setconf", i, str(f)])
        lab.run(h, ["ip", "addr", "add", addr, "dev", i])
        lab.run(h, ["ip", "link", "set", i, "up"])
    r = lab.run(ha, ["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.78.0.2"], check=False)
    assert r.returncode == 0, r.stdout
    show = lab.run(ha, ["wg", "show", ia]).stdout
    assert f"public key: {ka.public.b64()}" in show and "latest handshake" in show
    assert "persistent keepalive: every 25 seconds" in show
    conf = lab.run(ha, ["wg", "showconf", ia]).stdout
    assert f"PrivateKey = {ka.b64()}" in conf and "AllowedIPs = 10.78.0.2/32, fd78::2/128" in conf
    dump = lab.run(hb, ["wg", "show", ib, "dump"]).stdout.splitlines()
    assert dump[1].split("\t")[2] == f"{ha.ip}:{PORT}"  # b learned a's endpoint
    lab.run(ha, ["wg", "set", ia, "peer", kb.public.b64(), "remove"])
    assert kb.public.b64() not in lab.run(ha, ["wg", "show", ia]).stdout
    lab.run(ha, ["ip", "link", "del", ia])  # as `wg-quick down` does
    wait_for(lambda: not Path(f"/var/run/wireguard/{ia}.sock").exists(), 10, "daemon exit")
    lab.run(hb, ["ip", "link", "del", ib])


FLOOD = """
import socket, sys, time
from wgmesh.wireguard.crypto import dh_generate
from wgmesh.wireguard.noise import CookieGenerator, Handshake, LocalIdentity
target, port, pub = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
srcs = sys.argv[4].split(",")
msgs = []
for _ in range(64):
    hs = Handshake(LocalIdentity(dh_generate()), pub)
    msgs.append(CookieGenerator(pub, 115).add_macs(hs.create_initiation(1, bytes(12)), 0))
socks = []
for s in srcs:
    k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); k.bind((s, 0)); k.setblocking(False)
    socks.append(k)
cookies, sent, end = 0, 0, time.monotonic() + float(sys.argv[5])
while time.monotonic() < end:
    for k in socks:
        k.sendto(msgs[sent % len(msgs)], (target, port)); sent += 1
        while True:
            try:
                d = k.recv(100)
            except BlockingIOError:
                break
            cookies += d[0] == 3 and len(d) == 64
    time.sleep(0.001)
time.sleep(0.5)
for k in socks:
    while True:
        try:
            d = k.recv(100)
        except BlockingIOError:
            break
        cookies += d[0] == 3 and len(d) == 64
print(sent, cookies, flush=True)
"""


def test_handshake_flood_gets_cookies_and_session_survives(lab: Lab, tmp_path: Path) -> None:
    with two_sides(lab, tmp_path) as (a, b):
        a.add_peer(b, endpoint=True)
        b.add_peer(a, endpoint=False)
        a.ping(b)
        attacker = lab.add_public_host("x")
        srcs = [re.sub(r"\.\d+$", f".{200 + i}", attacker.ip) for i in range(16)]
        for s in srcs:
            lab.run(attacker, ["ip", "addr", "add", f"{s}/24", "dev", "eth0"])
        flood = lab.python(attacker, "-c", FLOOD, a.host.ip,
                           str(PORT), a.key.public.hex(), ",".join(srcs), "6")
        r = lab.run(a.host, ["ping", "-c", "20", "-i", "0.2", "-W", "2", b.addr],
                    check=False, timeout=30)
        assert flood.wait(30) == 0, flood.stderr
        sent, cookies = map(int, flood.stdout.split())
        assert sent > 1000 and cookies > 0
        received = int(re.search(r"(\d+) received", r.stdout).group(1))
        assert received >= 18, r.stdout  # the established session kept working
        a.ping(b)


def test_wg_quick_brings_up_wgmesh(lab: Lab, tmp_path: Path) -> None:
    """wg-quick falls back to a userspace implementation when the module is missing;
    WG_QUICK_USERSPACE_IMPLEMENTATION names one command, hence the two-line wrapper."""
    need("wg-quick")
    with two_sides(lab, tmp_path) as (_, b):
        ifq = f"{lab.prefix}q"
        wrapper = tmp_path / "wgmesh-userspace"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m wgmesh userspace "$@"\n')
        wrapper.chmod(0o755)
        key = PrivateKey.generate()
        conf = tmp_path / f"{ifq}.conf"
        conf.write_text(f"[Interface]\nPrivateKey = {key.b64()}\nAddress = 10.77.0.3/24\n\n"
                        f"[Peer]\nPublicKey = {b.key.public.b64()}\nAllowedIPs = 10.77.0.2/32\n"
                        f"Endpoint = {b.host.ip}:{PORT}\n")
        conf.chmod(0o600)
        b.wg("set", b.ifname, "peer", key.public.b64(), "allowed-ips", "10.77.0.3/32")
        env = ["env", f"WG_QUICK_USERSPACE_IMPLEMENTATION={wrapper}", *[
            f"{k}={v}" for k, v in WG_GO_ENV.items()]]
        qa = lab.add_public_host("q")
        lab.run(qa, [*env, "wg-quick", "up", str(conf)], timeout=60)
        try:
            r = lab.run(qa, ["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.77.0.2"], check=False)
            assert r.returncode == 0, r.stdout + lab.run(qa, ["wg"]).stdout
        finally:
            lab.run(qa, [*env, "wg-quick", "down", str(conf)], timeout=60)
        wait_for(lambda: not Path(f"/var/run/wireguard/{ifq}.sock").exists(), 10, "daemon exit")


def test_ipv6_endpoint(lab: Lab, tmp_path: Path) -> None:
    with two_sides(lab, tmp_path) as (a, b):
        assert b.host.ip6 is not None
        a.wg("set", a.ifname, "peer", b.key.public.b64(), "allowed-ips", f"{b.addr}/32",
             "endpoint", f"[{b.host.ip6}]:{PORT}")
        b.add_peer(a, endpoint=False)
        a.ping(b)
        b.ping(a)
        assert b.endpoint() == f"[{a.host.ip6}]:{PORT}"
