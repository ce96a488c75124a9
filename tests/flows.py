"""TCP servers and clients inside lab hosts, for tests of what the packet filter lets through."""

from __future__ import annotations

import sys

from wgmesh.lab import Host, Lab

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
