"""The in-process ``UserspaceBackend`` through the Backend protocol, and its hooks for
NAT traversal and the relay, with two backends in two lab namespaces of one process."""

from __future__ import annotations

import json
import sys

import pytest

from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns

SCRIPT = r"""
import ctypes, json, os, queue, socket, subprocess, sys, threading, time
from wgmesh.keys import PrivateKey
from wgmesh.wireguard.backend import Backend, InterfaceConfig, PeerConfig
from wgmesh.wireguard.userspace import UserspaceBackend

ns_a, ns_b, ip_a, ip_b, prefix = sys.argv[1:6]
libc = ctypes.CDLL(None, use_errno=True)

def enter(ns):  # sockets and TUN fds stay in the namespace they were made in
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
    os.close(fd)

def ping(addr):
    return subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", addr],
                          capture_output=True).returncode == 0

ka, kb = PrivateKey.generate(), PrivateKey.generate()
out = {}
enter(ns_a)
A = UserspaceBackend(prefix + "a")
A.up(InterfaceConfig(prefix + "a", ka, listen_port=0, addresses=["10.80.0.1/24"]))
enter(ns_b)
B = UserspaceBackend(prefix + "b")
B.up(InterfaceConfig(prefix + "b", kb, listen_port=51820, addresses=["10.80.0.2/24"]))
out["is_backend"] = isinstance(A, Backend) and A.kind == "userspace"
out["ports"] = [A.listen_port > 0, B.listen_port]

# 1. Relay only: no endpoints at all; each side's packets go through a queue "relay".
qa, qb = queue.Queue(), queue.Queue()
relayed = {"a": 0, "b": 0}
def forward(q, dst, src_key, tag):
    while True:
        d = q.get()
        if d is None:
            return
        relayed[tag] += 1
        dst.inject_from_relay(src_key, d)
threading.Thread(target=forward, args=(qa, B, ka.public, "a"), daemon=True).start()
threading.Thread(target=forward, args=(qb, A, kb.public, "b"), daemon=True).start()
d1 = A.set_peers([PeerConfig(kb.public, allowed_ips=["10.80.0.2/32"])])
B.set_peers([PeerConfig(ka.public, allowed_ips=["10.80.0.1/32"])])
out["diff_add"] = len(d1.add)
A.set_peer_relay(kb.public, qa.put)
B.set_peer_relay(ka.public, qb.put)
enter(ns_a)
out["relay_ping"] = ping("10.80.0.2")
out["relayed"] = dict(relayed)
out["endpoint_while_relayed"] = A.stats()[kb.public].endpoint

# 2. Direct: set_endpoint clears the relay; the relay sees no more traffic.
A.set_endpoint(kb.public, (ip_b, 51820))
before = dict(relayed)
out["direct_ping"] = ping("10.80.0.2")
out["relay_after_direct"] = relayed["a"] - before["a"]
st = A.stats()[kb.public]
out["stats"] = [st.endpoint, st.last_handshake is not None, st.rx_bytes > 0, st.tx_bytes > 0,
                [str(n) for n in st.allowed_ips]]

# 3. Unchanged desired state is a no-op diff; a changed keepalive is one update.
same = A.set_peers([PeerConfig(kb.public, allowed_ips=["10.80.0.2/32"])])
upd = A.set_peers([PeerConfig(kb.public, allowed_ips=["10.80.0.2/32"], persistent_keepalive=5)])
out["diffs"] = [bool(same), len(upd.update)]

# 4. on_other / send_other share the WireGuard port with STUN and disco.
got = queue.Queue()
A.on_other = lambda data, addr: (got.put((data, addr)), A.send_other(b"pong:" + data, addr))
enter(ns_b)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"\x00\x01hello-stun", (ip_a, A.listen_port))
reply, _ = s.recvfrom(100)
data, addr = got.get(timeout=5)
out["other"] = [data.decode(errors="replace"), addr[0], reply.decode(errors="replace")]

# 5. The stock wg tool sees the in-process device too.
enter(ns_a)
out["wg_show"] = subprocess.run(["wg", "show", prefix + "a", "peers"], capture_output=True,
                                text=True).stdout.strip() == kb.public.b64()
out["counters"] = sorted(A.counters())
rm = A.set_peers([])
out["removed"] = len(rm.remove)
qa.put(None); qb.put(None)
A.down(); B.down()
out["down"] = not os.path.exists(f"/var/run/wireguard/{prefix}a.sock")
print(json.dumps(out), flush=True)
"""


def test_backend_protocol_relay_and_shared_port_hooks(lab: Lab) -> None:
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    p = lab.spawn(a, [sys.executable, "-c", SCRIPT, a.ns, b.ns, a.ip, b.ip, lab.prefix])
    assert p.wait(120) == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["is_backend"] and out["ports"] == [True, 51820]
    assert out["diff_add"] == 1
    assert out["relay_ping"] and out["relayed"]["a"] >= 4 and out["relayed"]["b"] >= 4
    assert out["endpoint_while_relayed"] is None  # relayed packets never set an endpoint
    assert out["direct_ping"] and out["relay_after_direct"] == 0
    assert out["stats"] == [[b.ip, 51820], True, True, True, ["10.80.0.2/32"]]
    assert out["diffs"] == [False, 1]
    assert out["other"] == ["\x00\x01hello-stun", b.ip, "pong:\x00\x01hello-stun"]
    assert out["wg_show"] and out["removed"] == 1 and out["down"]
    assert "io_errors" in out["counters"]
