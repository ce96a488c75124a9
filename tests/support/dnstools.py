"""Mesh DNS test helpers: a netmap with named nodes, and lab processes. Modes::

    dnstools.py upstream ADDR                 a stub upstream resolver on ADDR:53
    dnstools.py hold ADDR                     an upstream that never answers
    dnstools.py responder ADDR UPSTREAM [MAX_INFLIGHT TIMEOUT]
                                              wgmesh's responder on ADDR:53 for NETMAP;
                                              SIGUSR1 swaps in RENAMED
    dnstools.py burst ADDR SOURCE COUNT       COUNT queries to forward and one mesh name
    dnstools.py flood ADDR COUNT              hostile datagrams in batches, each followed
                                              by a good query; prints replies' (id, rcode)
    dnstools.py blast ADDR COUNT SOURCE       hostile datagrams as fast as they go

The stub upstream knows ``www.example.test`` (A ``WWW_IP``) and ``big.example.test``
(TXT too large for UDP: truncated there, whole over TCP); anything else is NXDOMAIN.
It never asks anyone, so no test reaches a real DNS server.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from wgmesh.keys import Key
from wgmesh.netmap import Netmap, NodeInfo, Peer

DOMAIN = "mesh.internal"
WWW_IP = "192.0.2.80"
BIG_TXT = [f"record {i:02d} " + "x" * 90 for i in range(20)]
ULA = "fd7a:115c:a1e0::"


def netmap(self_name: str = "me", peers: tuple[str, ...] = ("peer", "db")) -> Netmap:
    """This node (index 1) and ``peers`` (index 2, 3, ...): 100.64.0.N and ULA::N."""
    def key(n: int) -> Key:
        return Key.from_raw(bytes([n]) * 32)
    me = NodeInfo(id=1, name=self_name, node_key=key(1), disco_key=key(101),
                  ipv4="100.64.0.1", ipv6=f"{ULA}1")
    return Netmap(seq=1, self_node=me, peers={
        n: Peer(id=n, name=name, node_key=key(n), disco_key=key(100 + n),
                ipv4=f"100.64.0.{n}", ipv6=f"{ULA}{n:x}")
        for n, name in enumerate(peers, start=2)})


NETMAP = netmap()
#: ``peer`` renamed, ``db`` removed.
RENAMED = netmap(peers=("peer-renamed",))


def _stub_answer(wire: bytes, limit: int) -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query, recursion_available=True)
    question = query.question[0]
    name = question.name.to_text().lower()
    if name == "www.example.test." and question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", WWW_IP))
    elif name == "big.example.test." and question.rdtype == dns.rdatatype.TXT:
        response.answer.append(dns.rrset.from_text_list(
            question.name, 60, "IN", "TXT", [f'"{t}"' for t in BIG_TXT]))
    elif name not in ("www.example.test.", "big.example.test."):
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire(max_size=limit, prefer_truncation=True)


class _StubUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(_stub_answer(data, 512), addr)  # type: ignore[attr-defined]


async def _stub_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    size = int.from_bytes(await reader.readexactly(2), "big")
    reply = _stub_answer(await reader.readexactly(size), 65535)
    writer.write(len(reply).to_bytes(2, "big") + reply)
    await writer.drain()
    writer.close()


async def upstream(addr: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(_StubUdp, local_addr=(addr, 53))
    await asyncio.start_server(_stub_tcp, addr, 53)
    print("ready", flush=True)
    await asyncio.Event().wait()


class _Hold(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        print("query", flush=True)


async def hold(addr: str) -> None:
    """An upstream that takes every query and answers none."""
    await asyncio.get_running_loop().create_datagram_endpoint(_Hold, local_addr=(addr, 53))
    print("ready", flush=True)
    await asyncio.Event().wait()


async def responder(addr: str, upstream_addr: str, max_inflight: int = 256,
                    timeout: float = 2.0) -> None:
    from wgmesh.node.dns import DnsResponder

    async with DnsResponder(NETMAP, DOMAIN, addr, upstreams=[(upstream_addr, 53)],
                            max_inflight=max_inflight, timeout=timeout) as r:
        def rename() -> None:
            r.update(RENAMED)
            print("updated", flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, rename)
        print("ready", flush=True)
        await asyncio.Event().wait()


def hostile_datagrams(count: int, seed: int = 0) -> list[bytes]:
    """Garbage that looks enough like a query to reach the parser, and worse."""
    rng = random.Random(seed)
    good = dns.message.make_query("peer." + DOMAIN, "A").to_wire()
    two = bytearray(good)
    two[5] = 2  # QDCOUNT 2, one question present
    kinds = [
        lambda: bytes([rng.randrange(256), rng.randrange(256), rng.randrange(128)])
        + rng.randbytes(rng.randrange(0, 300)),
        lambda: bytes(b ^ (rng.randrange(256) if rng.random() < 0.1 else 0) for b in good),
        lambda: good[:rng.randrange(len(good))],
        lambda: good[:2] + b"\x28\x00" + good[4:],  # opcode UPDATE
        lambda: bytes(two),
        lambda: good + rng.randbytes(5000),  # oversize
    ]
    return [rng.choice(kinds)() for _ in range(count)]


def flood(addr: str, count: int, batch: int = 50) -> None:
    """``count`` hostile datagrams in batches, each followed by a good query (id 4242 + n)
    whose reply is awaited: replies arrive in order, so any reply to the garbage would
    come before it, and the wait keeps the responder's socket buffer from overflowing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    packets = hostile_datagrams(count)
    replies: list[tuple[int, int]] = []
    for n in range(0, count, batch):
        for packet in packets[n:n + batch]:
            sock.sendto(packet, (addr, 53))
        marker = dns.message.make_query("www.example.test", "A")
        marker.id = 4242 + n // batch
        sock.sendto(marker.to_wire(), (addr, 53))
        while not replies or replies[-1][0] != marker.id:
            reply = sock.recv(65535)
            replies.append((int.from_bytes(reply[:2], "big"), reply[3] & 0x0F))
    print(json.dumps(replies), flush=True)


def burst(addr: str, source: str, count: int) -> None:
    """``count`` queries to forward (ids 1..count), then one for a mesh name (id 1000);
    prints each reply's [id, rcode] as a JSON line, for ever."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    for qid, name in [*((i, f"q{i}.example.test") for i in range(1, count + 1)),
                      (1000, f"me.{DOMAIN}")]:
        query = dns.message.make_query(name, "A")
        query.id = qid
        sock.sendto(query.to_wire(), (addr, 53))
    while True:
        reply = sock.recv(65535)
        print(json.dumps([int.from_bytes(reply[:2], "big"), reply[3] & 0x0F]), flush=True)


def blast(addr: str, count: int, source: str) -> None:
    """``count`` hostile datagrams from ``source`` as fast as they go; no replies read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    for packet in hostile_datagrams(count, seed=1):
        sock.sendto(packet, (addr, 53))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "upstream":
        asyncio.run(upstream(args[0]))
    elif mode == "hold":
        asyncio.run(hold(args[0]))
    elif mode == "responder":
        limits = (int(args[2]), float(args[3])) if len(args) > 2 else ()
        asyncio.run(responder(args[0], args[1], *limits))
    elif mode == "burst":
        burst(args[0], args[1], int(args[2]))
    elif mode == "flood":
        flood(args[0], int(args[1]))
    elif mode == "blast":
        blast(args[0], int(args[1]), args[2])
    else:
        sys.exit(f"unknown mode {mode!r}")
