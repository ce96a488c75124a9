"""TCP flows inside lab hosts: what the packet filter lets through, and checked transfers."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from wgmesh.lab.network import Host, Lab

SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8)
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
for p in map(int, sys.argv[1:]):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        print(c.recv(5).decode())
except OSError as e:
    print("refused:", type(e).__name__)
"""


def connect(lab: Lab, host: Host, ip: str, port: int) -> str:
    return lab.run(host, [sys.executable, "-c", CLIENT, ip, str(port)], timeout=30
                   ).stdout.strip()


SINK = """
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2]))); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (d := c.recv(1 << 16)):
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""
SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
with open(sys.argv[3], "rb") as f:
    c.sendfile(f)
c.close()
"""


def transfer(lab: Lab, src: Host, dst: Host, ip: str, path: Path, *, port: int = 9000,
             startup: float = 60, timeout: float = 300) -> float:
    """TCP from ``src`` to ``ip:port`` on ``dst`` (through the tunnel); the receiver's byte
    count and SHA-256 must match the file's. Returns the seconds the bytes took."""
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    sink = lab.python(dst, "-c", SINK, ip, str(port))
    sink.wait_for_output("listening", timeout=startup)
    t0 = time.monotonic()
    lab.run(src, [sys.executable, "-c", SOURCE, ip, str(port), str(path)], timeout=timeout)
    assert sink.wait(timeout) == 0, sink.stderr
    seconds = time.monotonic() - t0
    n, digest = sink.stdout.split()[-2:]
    assert (int(n), digest) == (path.stat().st_size, want)
    return seconds
