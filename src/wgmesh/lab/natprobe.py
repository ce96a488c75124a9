"""Measure a lab NAT from outside: mapping, filtering, hairpinning, UDP/TCP reachability.

``python -m wgmesh.lab.natprobe serve`` runs a reflector on a public lab host; ``probe``
runs on the host under test and prints one JSON object; ``portmap`` asks the host's
gateway for a mapping with each protocol (:func:`wgmesh.node.portmapper.probe`, the
node's own code) and prints which answered. :func:`check_kinds` builds a lab with one
host per NAT kind (port-mapping routers spelled ``symmetric+pcp``) and returns one
result per kind (what ``wgmesh lab check`` prints).

Reflector protocol (UDP, text): ``echo`` -> the observed ``ip:port`` from the same
socket; ``altport`` -> the same, but from another port; ``altip`` -> from the
server's second address. Which of those get through tells the filtering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import sys
import time
from typing import Any

PORT = 3500

__all__ = ["check_kinds", "classify"]


def serve(ip: str, alt_ip: str, port: int = PORT) -> None:
    main = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    main.bind((ip, port))
    other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_port.bind((ip, port + 1))
    other_ip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_ip.bind((alt_ip, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((ip, port))
    tcp.listen(16)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([main, tcp], [], [])
        if tcp in ready:
            conn, addr = tcp.accept()
            with conn:
                conn.sendall(f"{addr[0]}:{addr[1]}".encode())
        if main in ready:
            data, addr = main.recvfrom(512)
            seen = f"{addr[0]}:{addr[1]}".encode()
            out = {b"echo": main, b"altport": other_port, b"altip": other_ip}.get(data.strip())
            if out is not None:
                out.sendto(seen, addr)


def _ask(sock: socket.socket, dst: tuple[str, int], msg: bytes, timeout: float) -> str | None:
    """Send ``msg`` (3 tries) and wait for any reply; None if nothing came back."""
    for _ in range(3):
        sock.sendto(msg, dst)
        deadline = time.monotonic() + timeout / 3
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([sock], [], [], left)
            if r:
                data, _src = sock.recvfrom(512)
                return data.decode()
    return None


def probe(srv1: str, srv2: str, port: int = PORT, timeout: float = 1.5) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    local_port = s.getsockname()[1]
    ext1 = _ask(s, (srv1, port), b"echo", timeout)
    ext2 = _ask(s, (srv2, port), b"echo", timeout) if ext1 else None
    filtering = None
    hairpin = None
    if ext1:
        if _ask(s, (srv1, port), b"altip", timeout):
            filtering = "endpoint-independent"
        elif _ask(s, (srv1, port), b"altport", timeout):
            filtering = "address-dependent"
        else:
            filtering = "address-and-port-dependent"
        h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        h.bind(("0.0.0.0", 0))
        eip, eport = ext1.rsplit(":", 1)
        h.sendto(b"hairpin", (eip, int(eport)))
        r, _, _ = select.select([s], [], [], timeout)
        hairpin = bool(r) and s.recvfrom(512)[0] == b"hairpin"
    tcp_ok = False
    try:
        with socket.create_connection((srv1, port), timeout=timeout) as c:
            tcp_ok = bool(c.recv(64))
    except OSError:
        tcp_ok = False
    return {"local_port": local_port, "udp_ok": ext1 is not None, "external": ext1,
            "external_2": ext2, "filtering": filtering, "hairpin": hairpin, "tcp_ok": tcp_ok}


def classify(kind: str, host_ip: str, raw: dict[str, Any],
             portmap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn a probe's observations into the mapping behaviour the NAT actually has.

    ``portmap`` is :func:`wgmesh.node.portmapper.probe`'s answer: ``portmap`` lists the
    protocols that mapped, ``portmap_detail`` says what each gave or why not."""
    ext1, ext2 = raw["external"], raw["external_2"]
    if not raw["udp_ok"]:
        mapping = None
    elif ext1.split(":")[0] == host_ip:
        mapping = "none"
    elif ext1 == ext2:
        mapping = "endpoint-independent"
    else:
        mapping = "endpoint-dependent"
    port_preserved = bool(ext1) and ext1.rsplit(":", 1)[1] == str(raw["local_port"])
    return {"kind": kind, "udp_ok": raw["udp_ok"], "mapping": mapping, "external": ext1,
            "external_2": ext2, "filtering": raw["filtering"], "port_preserving": port_preserved,
            "hairpin": raw["hairpin"], "tcp_ok": raw["tcp_ok"],
            "portmap": [m for m, r in (portmap or {}).items() if r["ok"]],
            "portmap_detail": portmap or {}}


def check_kinds(kinds: tuple[str, ...] | None = None, hairpin: bool = False
                ) -> list[dict[str, Any]]:
    """Build a lab with one host per NAT kind and measure each from two public servers,
    and its gateway's port mapping from the host. Kinds as spelled: ``symmetric+pcp``."""
    from wgmesh.lab.network import NAT_KINDS, Lab, parse_nat_spec

    kinds = kinds or NAT_KINDS
    for kind in kinds:
        parse_nat_spec(kind)  # a typo fails before the lab is built
    with Lab() as lab:
        servers = [lab.add_public_host(f"stun{i}") for i in (1, 2)]
        procs = [lab.python(s, "-m", "wgmesh.lab.natprobe", "serve", s.ip, s.alt_ip or s.ip)
                 for s in servers]
        for p in procs:
            p.wait_for_output("ready", timeout=30)
        results = []
        for kind in kinds:
            host = lab.add_node_host(f"h-{kind.replace('+', '-')}", kind, hairpin=hairpin)
            out = lab.run(host, [sys.executable, "-m", "wgmesh.lab.natprobe", "probe",
                                 servers[0].ip, servers[1].ip], timeout=60).stdout
            pm = lab.run(host, [sys.executable, "-m", "wgmesh.lab.natprobe", "portmap"],
                         timeout=60).stdout
            results.append(classify(kind, host.ip, json.loads(out),
                                    json.loads(pm)["protocols"]))
        return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wgmesh.lab.natprobe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ip")
    s.add_argument("alt_ip")
    p = sub.add_parser("probe")
    p.add_argument("srv1")
    p.add_argument("srv2")
    sub.add_parser("portmap", help="which port-mapping protocols the gateway answers")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.ip, a.alt_ip)
    elif a.cmd == "portmap":
        from wgmesh.node.portmapper import probe as portmap_probe

        print(json.dumps(asyncio.run(portmap_probe())))
    else:
        print(json.dumps(probe(a.srv1, a.srv2)))


if __name__ == "__main__":
    main(sys.argv[1:])
