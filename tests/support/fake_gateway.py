"""A hostile PCP / NAT-PMP gateway on UDP 5351: ``python fake_gateway.py MODE LAN_IP WAN_IP``.

Runs in a lab router's namespace instead of miniupnpd. Every request is answered
(PCP, NAT-PMP mapping and address requests) the way MODE says:

* ``malformed``: garbage, truncated messages, a wrong nonce, requests echoed back;
* ``wrongport``: a well-formed success, but for another internal port;
* ``lease0``: a well-formed success with a lifetime of 0;
* ``flood``: an honest mapping to WAN_IP at the internal port, and then, every
  50 ms, a burst of multicast announcements to 224.0.0.1:5350: PCP ANNOUNCEs with
  epoch 0 (the gateway "rebooted") and NAT-PMP address announcements naming a
  different external address (``203.0.113.66``), which a client must never publish.

Prints ``ready``, then ``map N`` with the running count of MAP requests seen.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import sys
import time
from typing import Any

LIE = "203.0.113.66"
BURST = 50  # announcements per 50 ms


def pcp_reply(req: bytes, *, epoch: int, result: int = 0, lifetime: int | None = None,
              internal: int | None = None, ext: tuple[str, int] | None = None,
              nonce: bytes | None = None) -> bytes:
    asked_lifetime = struct.unpack_from("!I", req, 4)[0]
    header = struct.pack("!BBxBII12x", 2, 0x80 | req[1], result,
                         asked_lifetime if lifetime is None else lifetime, epoch)
    if req[1] != 1:  # ANNOUNCE
        return header
    req_nonce, proto, req_internal = req[24:36], req[36], struct.unpack_from("!H", req, 40)[0]
    ip, port = ext or ("0.0.0.0", 0)
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}").packed
    return header + (nonce or req_nonce) + struct.pack(
        "!B3xHH", proto, req_internal if internal is None else internal, port) + mapped


def natpmp_reply(req: bytes, wan: str, *, epoch: int, lifetime: int | None = None,
                 internal: int | None = None, external: int | None = None) -> bytes:
    if req[1] == 0:  # external address
        return struct.pack("!BBHI4s", 0, 128, 0, epoch, socket.inet_aton(wan))
    req_internal, _, req_lifetime = struct.unpack_from("!HHI", req, 4)
    return struct.pack("!BBHIHHI", 0, 128 + req[1], 0, epoch,
                       req_internal if internal is None else internal,
                       req_internal if external is None else external,
                       req_lifetime if lifetime is None else lifetime)


class Gateway(asyncio.DatagramProtocol):
    def __init__(self, mode: str, wan: str) -> None:
        self.mode, self.wan, self.maps = mode, wan, 0
        self.t0 = time.monotonic()
        self.flooding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def epoch(self) -> int:
        return 1000 + int(time.monotonic() - self.t0)

    def datagram_received(self, req: bytes, addr: tuple[Any, ...]) -> None:
        if len(req) < 2 or req[1] & 0x80:
            return
        if req[1] in (1, 2) and (req[0] == 2 or len(req) == 12):
            self.maps += 1
            print("map", self.maps, flush=True)
        for reply in self.replies(req):
            self.transport.sendto(reply, addr)

    def replies(self, req: bytes) -> list[bytes]:
        e, pcp = self.epoch(), req[0] == 2
        if self.mode == "malformed":
            if pcp:
                good = pcp_reply(req, epoch=e, ext=(self.wan, 40000))
                return [b"\x02\x81" + bytes(5), good[:59], good[:24] + bytes(12) + good[36:],
                        req, good + b"\x00"]
            good = natpmp_reply(req, self.wan, epoch=e)
            return [good[:7], good + b"\x00" * 3, b"\x01" + good[1:], req]
        if self.mode == "wrongport":
            if pcp:
                internal = struct.unpack_from("!H", req, 40)[0] + 1 if req[1] == 1 else None
                return [pcp_reply(req, epoch=e, internal=internal, ext=(self.wan, 40000))]
            if req[1] == 0:
                return [natpmp_reply(req, self.wan, epoch=e)]
            internal = struct.unpack_from("!H", req, 4)[0] + 1
            return [natpmp_reply(req, self.wan, epoch=e, internal=internal)]
        if self.mode == "lease0":
            if pcp:
                return [pcp_reply(req, epoch=e, lifetime=0, ext=(self.wan, 40000))]
            return [natpmp_reply(req, self.wan, epoch=e, lifetime=0)]
        # flood: honest, then announcements
        self.flooding = True
        if pcp:
            internal = struct.unpack_from("!H", req, 40)[0] if req[1] == 1 else 0
            return [pcp_reply(req, epoch=e, ext=(self.wan, internal))]
        return [natpmp_reply(req, self.wan, epoch=e)]


async def flood(gw: Gateway) -> None:
    announce = struct.pack("!BBxBII12x", 2, 0x80, 0, 0, 0)
    moved = struct.pack("!BBHI4s", 0, 128, 0, 0, socket.inet_aton(LIE))
    while True:
        await asyncio.sleep(0.05)
        if gw.flooding:
            for i in range(BURST):
                gw.transport.sendto(announce if i % 2 else moved, ("224.0.0.1", 5350))


async def main(mode: str, lan_ip: str, wan: str) -> None:
    loop = asyncio.get_running_loop()
    gw = Gateway(mode, wan)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(lan_ip))
    sock.bind(("0.0.0.0", 5351))  # announcements, too, come from the gateway's port
    await loop.create_datagram_endpoint(lambda: gw, sock=sock)
    print("ready", flush=True)
    await flood(gw)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
