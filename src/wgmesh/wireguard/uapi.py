"""WireGuard's cross-platform userspace API (https://www.wireguard.com/xplatform/).

A ``get=1`` / ``set=1`` line protocol over ``/var/run/wireguard/<iface>.sock``, so
the stock ``wg`` and ``wg-quick`` tools manage the userspace device exactly as
they manage wireguard-go. Parsing is pure: :func:`parse_set` validates a whole
request before anything is applied, so a bad request changes nothing and gets
an ``errno`` back.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import attrs

__all__ = [
    "SOCKET_DIR",
    "DeviceSet",
    "PeerSet",
    "PeerStatus",
    "UapiError",
    "UapiServer",
    "format_get",
    "parse_endpoint",
    "parse_set",
]

SOCKET_DIR = Path("/var/run/wireguard")
MAX_REQUEST = 1 << 20
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UapiError(Exception):
    """A request that is refused; ``errno`` goes back to the client."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


@attrs.define
class PeerSet:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None  # None: unchanged; 32 zero bytes: clear
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[Network] = attrs.field(factory=list)


@attrs.define
class DeviceSet:
    private_key: bytes | None = None  # 32 zero bytes: remove the key
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerSet] = attrs.field(factory=list)


@attrs.frozen
class PeerStatus:
    public_key: bytes
    preshared_key: bytes
    endpoint: tuple[str, int] | None
    last_handshake: float | None
    tx_bytes: int
    rx_bytes: int
    persistent_keepalive: int
    allowed_ips: tuple[Network, ...]


def _key(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError as e:
        raise UapiError("key is not hex") from e
    if len(raw) != 32:
        raise UapiError("key is not 32 bytes")
    return raw


def _uint(value: str, limit: int) -> int:
    if not value.isdigit() or int(value) > limit:
        raise UapiError(f"bad number {value[:20]!r}")
    return int(value)


def _true(value: str) -> bool:
    if value != "true":
        raise UapiError(f"expected 'true', got {value[:20]!r}")
    return True


def parse_endpoint(value: str) -> tuple[str, int]:
    """``1.2.3.4:51820`` or ``[2001:db8::1]:51820`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise UapiError("endpoint has no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError as e:
        raise UapiError("endpoint host is not an IP address") from e
    p = _uint(port, 65535)
    if p == 0:
        raise UapiError("endpoint port 0")
    return str(addr), p


def format_endpoint(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def parse_set(lines: list[str]) -> DeviceSet:
    """The key=value lines after ``set=1`` (without the blank terminator)."""
    dev = DeviceSet()
    peer: PeerSet | None = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"line without '=': {line[:40]!r}")
        if key == "public_key":
            peer = PeerSet(_key(value))
            dev.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                dev.private_key = _key(value)
            elif key == "listen_port":
                dev.listen_port = _uint(value, 65535)
            elif key == "fwmark":
                dev.fwmark = _uint(value, 0xFFFFFFFF)
            elif key == "replace_peers":
                dev.replace_peers = _true(value)
            else:
                raise UapiError(f"unknown device key {key[:40]!r}")
        elif key == "remove":
            peer.remove = _true(value)
        elif key == "update_only":
            peer.update_only = _true(value)
        elif key == "preshared_key":
            peer.preshared_key = _key(value)
        elif key == "endpoint":
            peer.endpoint = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = _uint(value, 65535)
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _true(value)
        elif key == "allowed_ip":
            try:
                peer.allowed_ips.append(ipaddress.ip_network(value, strict=False))
            except ValueError as e:
                raise UapiError(f"bad allowed_ip {value[:50]!r}") from e
        elif key == "protocol_version":
            if value != "1":
                raise UapiError("only protocol_version=1 exists")
        else:
            raise UapiError(f"unknown peer key {key[:40]!r}")
    return dev


def format_get(private_key: bytes | None, listen_port: int, fwmark: int,
               peers: list[PeerStatus]) -> str:
    out = []
    if private_key is not None:
        out.append(f"private_key={private_key.hex()}")
    out.append(f"listen_port={listen_port}")
    if fwmark:
        out.append(f"fwmark={fwmark}")
    for p in peers:
        out.append(f"public_key={p.public_key.hex()}")
        out.append(f"preshared_key={p.preshared_key.hex()}")
        out.append("protocol_version=1")
        if p.endpoint is not None:
            out.append(f"endpoint={format_endpoint(p.endpoint)}")
        hs = p.last_handshake or 0.0
        sec = int(hs)
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={int((hs - sec) * 1e9)}")
        out.append(f"tx_bytes={p.tx_bytes}")
        out.append(f"rx_bytes={p.rx_bytes}")
        out.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        out += [f"allowed_ip={n}" for n in p.allowed_ips]
    return "".join(line + "\n" for line in out)


def _describe_holder(conn: socket.socket) -> str:
    """Who listens at the other end of ``conn``: its pid, and whether it is in another
    network namespace (the usual way two daemons come to want one socket path)."""
    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize("3i")))[0]
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/thread-self/ns/net")
    except OSError:
        return f"pid {pid}"
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return f"pid {pid}"
    return f"pid {pid}, in another network namespace"


class UapiServer:
    """Serves the UAPI socket from a thread; each request calls ``get()`` or ``set(DeviceSet)``.

    The socket is created 0600 in a 0755 directory, as wireguard-go does, because
    ``get`` returns the private key to whoever may connect (root).
    """

    def __init__(self, name: str, get: Callable[[], str],
                 set_: Callable[[DeviceSet], None]) -> None:
        self.path = SOCKET_DIR / f"{name}.sock"
        self._get, self._set = get, set_
        SOCKET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.path.exists() and stat.S_ISSOCK(self.path.stat().st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                probe.close()
                self.path.unlink()  # stale socket of a dead daemon
            else:
                with probe:
                    holder = _describe_holder(probe)
                raise UapiError(f"{self.path}: another daemon ({holder}) serves {name}; the"
                                f" UAPI sockets of all network namespaces share {SOCKET_DIR},"
                                " so give this interface another name", errno.EADDRINUSE)
        # Bound and listening under a private name first, then linked into place: the
        # path never exists without a listener (`wg` would fall back to netlink).
        tmp = SOCKET_DIR / f".{name}.{os.getpid()}.{threading.get_ident()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(str(tmp))
        finally:
            os.umask(old)
        try:
            self.sock.listen(16)
            os.link(tmp, self.path)  # never replaces: a daemon that just won the race keeps it
        except FileExistsError:
            self.sock.close()
            raise UapiError(f"{self.path}: another daemon serves {name}",
                            errno.EADDRINUSE) from None
        except BaseException:
            self.sock.close()
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._serve, name=f"uapi-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            while True:
                lines: list[str] = []
                size = 0
                while True:
                    raw = f.readline(MAX_REQUEST)
                    size += len(raw)
                    if not raw or size > MAX_REQUEST:
                        return
                    line = raw.decode(errors="replace").rstrip("\n")
                    if not line:
                        break
                    lines.append(line)
                if not lines:
                    continue
                f.write(self.handle(lines).encode())
                f.flush()

    def handle(self, lines: list[str]) -> str:
        """One request (its lines, without the blank terminator) -> the response text."""
        op = lines[0]
        try:
            if op == "get=1" and len(lines) == 1:
                return self._get() + "errno=0\n\n"
            if op == "set=1":
                self._set(parse_set(lines[1:]))
                return "errno=0\n\n"
            raise UapiError(f"unknown operation {op[:20]!r}")
        except UapiError as e:
            return f"errno={e.errno}\n\n"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
