"""A Linux TUN interface: ``/dev/net/tun`` + TUNSETIFF, and link setup via ``ip``.

Plain IFF_TUN|IFF_NO_PI: each read is one IP packet, each write injects one. The
fd is non-blocking so the device loop can drain it in batches after ``poll``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
from collections.abc import Iterable

from wgmesh.wireguard.backend import BackendError

__all__ = ["Tun", "link_exists"]

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
SIOCSIFTXQLEN = 0x8943
TX_QUEUE_LEN = 4096


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True)
    if cp.returncode != 0:
        raise BackendError(f"ip {' '.join(args)}: {cp.stderr.strip()}")


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


class Tun:
    """An open TUN interface. Closing the fd removes the (non-persistent) interface.

    With ``vnet`` every read and write carries a virtio-net header, so writes may be
    TCP super-packets that the kernel takes in one piece (see ``offload.py``). No
    offloads are offered for reads: the kernel checksums in C, which measured
    cheaper than TSO plus checksums in Python (benchmarks/README.md).
    """

    def __init__(self, name: str, vnet: bool = True) -> None:
        if not name or len(name) >= IFNAMSIZ or "/" in name:
            raise BackendError(f"bad interface name {name!r}")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"cannot open /dev/net/tun: {e.strerror} (modprobe tun?)") from e
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except OSError as e:
            os.close(self.fd)
            raise BackendError(f"TUNSETIFF {name}: {e.strerror}") from e
        self.name = name
        self.vnet = vnet
        self.routes: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self._set_txqueuelen(TX_QUEUE_LEN)

    def _set_txqueuelen(self, qlen: int) -> None:
        """A deep queue: TUN drops (rather than pushes back) when the reader falls behind,
        and a Python reader on a shared CPU does, in bursts; drops cost TCP retransmits."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCSIFTXQLEN, struct.pack("16si12x", self.name.encode(), qlen))

    def configure(self, mtu: int, addresses: Iterable[ipaddress.IPv4Interface
                                                     | ipaddress.IPv6Interface] = ()) -> None:
        """Set MTU and addresses, and bring the link up."""
        self.set_mtu(mtu)
        for a in addresses:
            _ip("addr", "replace", str(a), "dev", self.name)
        _ip("link", "set", "dev", self.name, "up")

    def set_mtu(self, mtu: int) -> None:
        _ip("link", "set", "dev", self.name, "mtu", str(mtu))

    def sync_routes(self, want: set[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        """Route exactly ``want`` (subnet routes of peers) into this interface; they go
        with the interface when it closes, so a crash leaves none behind."""
        for net in sorted(want - self.routes, key=str):
            _ip("route", "replace", str(net), "dev", self.name)
        for net in sorted(self.routes - want, key=str):
            _ip("route", "del", str(net), "dev", self.name)
        self.routes = set(want)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
