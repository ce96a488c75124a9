"""Two WireGuard implementations on two lab hosts, configured over UAPI with ``wg``.

Shared by the userspace/wireguard-go interop tests and the kernel interop tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import flows
from polling import wait_for
from systools import need

from wgmesh.keys import PrivateKey
from wgmesh.lab import Host, Lab, Process

WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
PORT = 51820
STARTUP_S = float(os.environ.get("WGMESH_WG_STARTUP_S", "20"))  # the VM is slow



class Side:
    """One WireGuard implementation on one lab host, with tunnel address 10.77.0.<n>."""

    def __init__(self, lab: Lab, host: Host, ifname: str, impl: str, n: int, tmp: Path,
                 env: dict[str, str] | None = None) -> None:
        self.lab, self.host, self.ifname, self.impl = lab, host, ifname, impl
        self.addr = f"10.77.0.{n}"
        self.key = PrivateKey.generate()
        self.keyfile = tmp / f"{ifname}.key"
        self.keyfile.write_text(self.key.b64())
        self.keyfile.chmod(0o600)
        self.proc: Process | None = None
        if impl == "kernel":
            lab.run(host, ["ip", "link", "add", ifname, "type", "wireguard"])
        else:
            argv = ([sys.executable, "-m", "wgmesh", "userspace", "--foreground", ifname]
                    if impl == "wgmesh" else ["wireguard-go", "-f", ifname])
            proc = self.proc = lab.spawn(host, argv, env={**WG_GO_ENV, **(env or {})})
            sock = Path(f"/var/run/wireguard/{ifname}.sock")
            wait_for(lambda: sock.exists() or proc.poll() is not None, STARTUP_S, f"{ifname} UAPI")
            assert proc.poll() is None, proc.stderr
        self.wg("set", ifname, "listen-port", str(PORT), "private-key", str(self.keyfile))
        lab.run(host, ["ip", "addr", "add", f"{self.addr}/24", "dev", ifname])
        lab.run(host, ["ip", "link", "set", ifname, "up"])

    def wg(self, *args: str) -> str:
        return self.lab.run(self.host, ["wg", *args]).stdout

    def add_peer(self, other: Side, *, endpoint: bool, psk: Path | None = None) -> None:
        args = ["set", self.ifname, "peer", other.key.public.b64(),
                "allowed-ips", f"{other.addr}/32"]
        if endpoint:
            args += ["endpoint", f"{other.host.ip}:{PORT}"]
        if psk is not None:
            args += ["preshared-key", str(psk)]
        self.wg(*args)

    def ping(self, other: Side, count: int = 3) -> str:
        r = self.lab.run(self.host, ["ping", "-c", str(count), "-i", "0.2", "-W", "3",
                                     other.addr], check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def handshake_time(self) -> int:
        out = self.wg("show", self.ifname, "latest-handshakes").split()
        return int(out[1]) if len(out) == 2 else 0

    def endpoint(self) -> str:
        out = self.wg("show", self.ifname, "endpoints").split()
        return out[1] if len(out) == 2 else ""

    def roam(self, last_octet: int, port: int) -> str:
        """Move to a new address in the host's subnet (it becomes the routing source) and
        a new listen port, as a NAT rebinding or a new network would; returns the address."""
        new_ip = re.sub(r"\.\d+$", f".{last_octet}", self.host.ip)
        self.lab.run(self.host, ["ip", "addr", "add", f"{new_ip}/24", "dev", "eth0"])
        subnet = re.sub(r"\.\d+$", ".0/24", self.host.ip)
        self.lab.run(self.host, ["ip", "route", "replace", subnet, "dev", "eth0", "src", new_ip])
        self.wg("set", self.ifname, "listen-port", str(port))
        return new_ip


def transfer(src: Side, dst: Side, payload: tuple[Path, str]) -> float:
    """Send the payload over TCP through the tunnel; check size and sha256 at the far end."""
    return flows.transfer(src.lab, src.host, dst.host, dst.addr, payload[0], port=5001,
                          startup=STARTUP_S)


@contextlib.contextmanager
def two_sides(lab: Lab, tmp: Path, impl_b: str = "wireguard-go",
              env_a: dict[str, str] | None = None) -> Iterator[tuple[Side, Side]]:
    need("wg")
    need("wireguard-go")
    ha, hb = lab.add_public_host("a"), lab.add_public_host("b")
    a = Side(lab, ha, f"{lab.prefix}a", "wgmesh", 1, tmp, env_a)
    b = Side(lab, hb, f"{lab.prefix}b", impl_b, 2, tmp)
    yield a, b
