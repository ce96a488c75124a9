"""A real ``wgmesh relay serve`` process on loopback for tests, and what they ask of it:
its ``/metrics``, its worker processes, which worker holds a connection."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for


def bound_to(ip: str) -> Callable[[int], socket.socket]:
    """A ``make_socket`` for RelayConnection: TCP from ``ip`` (any 127/8 address works)."""
    def make(family: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((ip, 0))
        return s
    return make


@contextlib.contextmanager
def relay_process(tmp_path: Path, *args: str) -> Iterator[tuple[int, int]]:
    """``wgmesh relay serve`` on 127.0.0.1 with ``args``: (its pid, its port); its output
    must hold no traceback when it stops."""
    out = tmp_path / "relay.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wgmesh", "relay", "serve", "--listen", "127.0.0.1:0",
             "--stun-port", "-1", "--key-file", str(tmp_path / "relay.key"), *args],
            stdout=f, stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: out.read_text().partition("\n")[0] if proc.poll() is None
                        else pytest.fail(out.read_text()), 20, "the relay listening")
        yield proc.pid, int(json.loads(line)["listening"].rpartition(":")[2])
        assert "Traceback" not in out.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def metrics_from(port: int, source: str, accept: str = "",
                 tls: ssl.SSLContext | None = None) -> Any:
    """The relay's ``/metrics``, asked from ``source`` (over ``tls`` if given): JSON, or
    the text ``accept`` asks for (Prometheus')."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls,
                                        source_address=(source, 0)) if tls else
            http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0)))
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        body = conn.getresponse().read()
        return body.decode() if accept else json.loads(body)
    finally:
        conn.close()


def workers_of(pid: int) -> list[int]:
    """The relay's worker processes (its children), in no particular order."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    return inodes


def worker_holding(pid: int, port: int, client_port: int) -> int | None:
    """The worker whose socket is the relay's end (IPv4, ``port``) of the connection from
    local port ``client_port``, from /proc/net/tcp and the workers' file descriptors; None
    if none is, or two are (for a moment while it moves from one worker to another)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    inodes = {f[9] for f in map(str.split, rows)
              if int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == client_port}
    held = {w for w in workers_of(pid) if _socket_inodes(w) & inodes}
    return held.pop() if len(held) == 1 else None
