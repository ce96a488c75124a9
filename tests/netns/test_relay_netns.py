"""Relays in the lab: nodes behind UDP-blocking NATs talk only through a relay.

* a 50 MB transfer and pings via one relay, captured on the relay host: the
  payload's marker never appears, while a deliberately plaintext control
  packet does (so the capture could have seen it); the relay's memory holds
  neither node's private key;
* two meshed relays of one region: nodes on different relays reach each
  other, and when one relay is killed its node moves to the other and
  traffic resumes with no restart;
* the relay's STUN responder answers a real client across a NAT;
* ``/metrics`` answers only this host unless ``--metrics-allow`` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

import pytest
from flows import transfer
from polling import wait_for
from systools import need

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Host, Lab, Process

pytestmark = pytest.mark.netns

PEER = str(Path(__file__).parents[1] / "support" / "relay_peer.py")
MARKER = b"WGMESH-PAYLOAD-MARKER-5f1d"
PORT = 3340


def start_relay(lab: Lab, host: Host, tmp: Path, *extra: str) -> Process:
    p = lab.python(host, "-m", "wgmesh", "relay", "serve", "--listen", f"{host.ip}:{PORT}",
                   "--key-file", str(tmp / f"relay-{host.name}.key"), *extra)
    p.wait_for_output('"listening"', timeout=20)
    return p


def node_key(tmp: Path, name: str) -> tuple[PrivateKey, str]:
    k = PrivateKey.generate()
    path = tmp / f"{name}.key"
    k.save(path)
    return k, str(path)


def lines(p: Process) -> list[dict[str, object]]:
    return [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]


def wait_line(p: Process, pred, timeout: float = 30.0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The first JSON line of ``p`` that ``pred`` accepts; fails at once if ``p`` exits."""
    def line() -> dict[str, object] | None:
        hit = next((d for d in lines(p) if pred(d)), None)
        assert hit is not None or p.poll() is None, f"{p} exited {p.poll()}: {p.stderr[-2000:]}"
        return hit
    return wait_for(line, timeout,
                    lambda: f"a line; stdout={p.stdout[-1500:]} stderr={p.stderr[-1500:]}")


def memory_contains(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which needles occur anywhere in the process's readable memory."""
    found = []
    blobs = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                blobs.append(mem.read(end - start))
            except (OSError, OverflowError, ValueError):
                continue
    for n in needles:
        if any(n in b for b in blobs):
            found.append(n)
    return found


def test_relayed_transfer_through_udp_blocked_nats(lab: Lab, tmp_path: Path) -> None:
    tcpdump = need("tcpdump")
    relay = lab.add_public_host("relay")
    a = lab.add_node_host("a", "udp-blocked")
    b = lab.add_node_host("b", "udp-blocked")
    # UDP between the NATed nodes is impossible: the relay is the only way
    probe = lab.run(a, [sys.executable, "-c", (
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1);"
        f"s.sendto(b'x', ('{relay.ip}', 3478))\ntry: s.recv(9); print('udp-ok')\n"
        "except OSError: print('udp-blocked')")])
    assert probe.stdout.strip() == "udp-blocked"
    srv = start_relay(lab, relay, tmp_path)
    url = f"http://{relay.ip}:{PORT}"
    ka, fa = node_key(tmp_path, "a")
    kb, fb = node_key(tmp_path, "b")
    payload = bytearray(secrets.token_bytes(50 * 1024 * 1024))
    for off in range(0, len(payload) - len(MARKER), 4096):
        payload[off:off + len(MARKER)] = MARKER
    src, dst = tmp_path / "payload.bin", tmp_path / "received.bin"
    src.write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    del payload
    pcap = tmp_path / "relay.pcap"
    cap = lab.spawn(relay, [tcpdump, "-i", "eth0", "-s", "0", "-U", "-w", str(pcap),
                            "tcp", "port", str(PORT)])
    cap.wait_for_output("listening on", stream="stderr")

    echo = lab.python(b, PEER, "echo", fb, url)
    wait_line(echo, lambda d: d.get("ready"))
    pinger = lab.python(a, PEER, "ping", fa, url, kb.public.b64(), "--count", "5")
    assert pinger.wait(30) == 0
    pongs = [d for d in lines(pinger) if "pong" in d]
    assert len(pongs) >= 4, pinger.stdout
    echo.stop()

    recv = lab.python(b, PEER, "recv", fb, url, ka.public.b64(), str(dst))
    wait_line(recv, lambda d: d.get("ready"))
    send = lab.python(a, PEER, "send", fa, url, kb.public.b64(), str(src))
    got = wait_line(recv, lambda d: "sha256" in d, timeout=240)
    sent = wait_line(send, lambda d: "sha256" in d, timeout=30)
    print("transfer", sent, got)
    assert got["sha256"] == sent["sha256"] == want
    assert got["received"] == 50 * 1024 * 1024

    # no private key anywhere in the relay's memory (raw or base64)
    needles = [k.raw() for k in (ka, kb)] + [k.b64().encode() for k in (ka, kb)]
    assert memory_contains(srv.pid, needles) == []
    assert memory_contains(srv.pid, [ka.public.raw]) == [ka.public.raw]  # the scan works
    metrics = json.loads(lab.run(relay, [sys.executable, "-c", (
        f"import urllib.request; print(urllib.request.urlopen('{url}/metrics').read().decode())"
    )]).stdout)
    assert metrics["counters"]["packets_out"] > 50 * 1024 * 1024 // 1200
    cap.stop()
    raw = pcap.read_bytes()
    assert len(raw) > 50 * 1024 * 1024  # the transfer crossed the capture
    assert b"CONTROL-PLAINTEXT-MARKER" in raw  # plaintext would be visible...
    assert MARKER not in raw  # ...and the payload never was


def test_meshed_region_and_failover(lab: Lab, tmp_path: Path) -> None:
    r1, r2 = lab.add_public_host("r1"), lab.add_public_host("r2")
    a = lab.add_node_host("a", "udp-blocked")
    b = lab.add_node_host("b", "udp-blocked")
    mesh = tmp_path / "mesh.key"
    mesh.write_text(secrets.token_hex(32))
    u1, u2 = f"http://{r1.ip}:{PORT}", f"http://{r2.ip}:{PORT}"
    k2 = PrivateKey.generate()  # r1 pins r2's key (URL#KEY); r2 knows r1 by address only
    k2.save(tmp_path / "relay-r2.key")
    p1 = start_relay(lab, r1, tmp_path, "--mesh-key-file", str(mesh),
                     "--mesh-peer", f"{u2}#{k2.public.b64()}")
    start_relay(lab, r2, tmp_path, "--mesh-key-file", str(mesh), "--mesh-peer", u1)
    _, fa = node_key(tmp_path, "a")
    kb, fb = node_key(tmp_path, "b")
    echo = lab.python(b, PEER, "echo", fb, f"{u2},{u1}")  # b homes on r2
    assert wait_line(echo, lambda d: d.get("ready"))["url"].startswith(u2)  # type: ignore[union-attr]
    pinger = lab.python(a, PEER, "ping", fa, f"{u1},{u2}", kb.public.b64(), "--forever")
    first = wait_line(pinger, lambda d: "pong" in d)
    assert str(first["url"]).startswith(u1)  # a on r1, b on r2: through the mesh
    p1.stop()  # kill a's relay
    moved = wait_line(pinger, lambda d: "pong" in d and str(d["url"]).startswith(u2),
                      timeout=30)
    assert int(moved["pong"]) > int(first["pong"])  # type: ignore[arg-type]
    assert pinger.poll() is None and echo.poll() is None  # no node restarted


def test_relay_stun_with_real_client(lab: Lab, tmp_path: Path) -> None:
    relay = lab.add_public_host("relay")
    pc = lab.add_node_host("pc", "eim")
    assert pc.nat is not None
    start_relay(lab, relay, tmp_path)
    from test_stun_netns import stun_query

    out = stun_query(lab, pc, relay.ip, 3478)
    assert out["addr"] == [pc.nat.ip, 41641]


def http_status(lab: Lab, host: Host, url: str) -> int:
    return int(lab.run(host, [sys.executable, "-c", (
        "import urllib.request, urllib.error\n"
        f"try: print(urllib.request.urlopen('{url}', timeout=5).status)\n"
        "except urllib.error.HTTPError as e: print(e.code)")]).stdout)


def test_metrics_are_for_this_host_unless_allowed(lab: Lab, tmp_path: Path) -> None:
    """Issue 14 item 13: by default only the relay's own host reads /metrics."""
    relay = lab.add_public_host("relay")
    pc = lab.add_node_host("pc", "eim")
    assert pc.nat is not None
    start_relay(lab, relay, tmp_path, "--stun-port", "-1")
    url = f"http://{relay.ip}:{PORT}"
    assert http_status(lab, pc, f"{url}/metrics") == 403
    assert http_status(lab, pc, f"{url}/health") == 200
    assert http_status(lab, relay, f"{url}/metrics") == 200  # from the relay's own address
    lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen", f"{relay.ip}:{PORT + 1}",
               "--stun-port", "-1", "--key-file", str(tmp_path / "relay2.key"),
               "--metrics-allow", f"192.0.2.0/24,{pc.nat.ip}/32"
               ).wait_for_output('"listening"', timeout=20)
    assert http_status(lab, pc, f"http://{relay.ip}:{PORT + 1}/metrics") == 200


def test_userspace_wireguard_over_the_relay(lab: Lab, tmp_path: Path) -> None:
    """Real WireGuard packets: two userspace devices whose only path is the relay."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    tcpdump = need("tcpdump")
    relay = lab.add_public_host("relay")
    a = lab.add_node_host("a", "udp-blocked")
    b = lab.add_node_host("b", "udp-blocked")
    start_relay(lab, relay, tmp_path)
    url = f"http://{relay.ip}:{PORT}"
    ka, fa = node_key(tmp_path, "a")
    kb, fb = node_key(tmp_path, "b")
    node = str(Path(__file__).parents[1] / "support" / "relay_wg_node.py")
    wa = lab.python(a, node, f"{lab.prefix}a", fa, "100.64.7.1/24", url, kb.public.b64(),
                    "100.64.7.2")
    wb = lab.python(b, node, f"{lab.prefix}b", fb, "100.64.7.2/24", url, ka.public.b64(),
                    "100.64.7.1")
    for w in (wa, wb):
        wait_line(w, lambda d: d.get("ready"))
    pcap = tmp_path / "wg.pcap"
    cap = lab.spawn(relay, [tcpdump, "-i", "eth0", "-s", "0", "-U", "-w", str(pcap),
                            "tcp", "port", str(PORT)])
    cap.wait_for_output("listening on", stream="stderr")
    ping = lab.run(a, ["ping", "-c", "3", "-i", "0.2", "-W", "5", "100.64.7.2"], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    size = 50 * 1024 * 1024
    payload = bytearray(secrets.token_bytes(size))
    for off in range(0, size - len(MARKER), 4096):
        payload[off:off + len(MARKER)] = MARKER
    src = tmp_path / "wg-payload.bin"
    src.write_bytes(payload)
    del payload
    seconds = transfer(lab, a, b, "100.64.7.2", src, port=5001)
    print(f"wireguard over relay: {size * 8 / seconds / 1e6:.1f} Mbit/s")
    cap.stop()
    raw = pcap.read_bytes()
    assert len(raw) > size and MARKER not in raw


TLS_CLIENT = """
import asyncio, ssl, sys
from wgmesh.keys import PrivateKey
from wgmesh.relaynet.connection import RelayConnection
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    c = await RelayConnection.open(sys.argv[1], PrivateKey.generate(), ssl=ctx)
    print("rtt", await c.ping(), flush=True)
asyncio.run(main())
"""


def test_cli_relay_behind_tls_on_443(lab: Lab, tmp_path: Path) -> None:
    from test_relay_server import _self_signed

    relay = lab.add_public_host("relay")
    pc = lab.add_node_host("pc", "udp-blocked")
    cert, key = _self_signed(tmp_path, ip=relay.ip)
    p = lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen", f"{relay.ip}:443",
                   "--key-file", str(tmp_path / "relay.key"), "--tls-cert", str(cert),
                   "--tls-key", str(key), "--stun-port", "-1")
    assert json.loads(p.wait_for_output('"listening"', timeout=20))["tls"] is True
    ok = lab.run(pc, [sys.executable, "-c", TLS_CLIENT, f"https://{relay.ip}", str(cert)])
    assert ok.stdout.startswith("rtt ")
    # a client that does not trust the certificate refuses the relay
    other, _ = _self_signed(tmp_path / "other", ip=relay.ip)
    bad = lab.run(pc, [sys.executable, "-c", TLS_CLIENT, f"https://{relay.ip}", str(other)],
                  check=False)
    assert bad.returncode != 0 and "RelayConnectError" in bad.stderr
