"""ICMP echo through the tunnel (``wgmesh ping``): a raw socket, no ``ping`` binary needed."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

__all__ = ["echo"]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo(ip: str, *, timeout: float = 5.0, count: int = 1) -> float | None:
    """Best round-trip time (seconds) of ``count`` IPv4 echoes, or None if none came back."""
    ident = os.getpid() & 0xFFFF
    best: float | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        # poll, not select: an agent with many hard-NAT search ports has fds past 1023.
        poller = select.poll()
        poller.register(s, select.POLLIN)
        for seq in range(1, count + 1):
            payload = struct.pack("!d", time.monotonic()) + b"wgmesh-ping"
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload
            sent = time.monotonic()
            s.sendto(pkt, (ip, 0))
            deadline = sent + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not poller.poll(left * 1000):
                    break
                data, addr = s.recvfrom(2048)
                ihl = (data[0] & 0x0F) * 4
                icmp = data[ihl:ihl + 8]
                if len(icmp) < 8 or addr[0] != ip:
                    continue
                typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", icmp)
                if typ == 0 and rid == ident and rseq == seq:
                    rtt = time.monotonic() - sent
                    best = rtt if best is None else min(best, rtt)
                    break
    return best
