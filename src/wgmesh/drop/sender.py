"""The sending side of a file drop: one file, streamed and resumable, to a peer's peer API.

Blocking (``http.client`` and ``sendfile(2)``), so the CLI and threads use it
as is and async callers through ``asyncio.to_thread``. What is said on the
wire is :mod:`wgmesh.drop.protocol`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs

from wgmesh.drop.protocol import (
    CHUNK,
    DEFAULT_PORT,
    DropError,
    DropRefused,
    check_name,
    refusal_text,
)

__all__ = ["Connection", "Progress", "SendResult", "file_digest", "read_response",
           "request", "send_file"]


@attrs.frozen
class SendResult:
    """What a finished drop reports: the name the receiver kept it under, and the bytes.
    ``seconds`` is the whole send; ``hash_seconds`` the part of it spent hashing before
    the first byte went out: a resumed prefix, or the whole file for a receiver that
    wants the digest first (the file is otherwise hashed as it streams)."""

    name: str
    size: int
    sha256: str
    resumed_from: int
    sent: int
    seconds: float
    hash_seconds: float = 0.0


#: ``progress(done, total)``, called as bytes go out.
Progress = Callable[[int, int], None]


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) a drop announces and checks for the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _target(dest: str, port: int) -> tuple[str, int]:
    """``100.64.0.2``, ``fd7a::2``, ``[fd7a::2]:4173``, ``host:port`` or ``http://...``."""
    if "://" in dest:
        u = urlsplit(dest)
        if u.scheme != "http" or not u.hostname:
            raise DropError(f"{dest}: the peer API speaks plain http inside the tunnel")
        return u.hostname, u.port or port
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(dest)
        return dest, port
    host, sep, p = dest.rpartition(":")
    if sep and p.isdigit():
        return host.strip("[]"), int(p)
    return dest, port


class Connection(http.client.HTTPConnection):
    """An HTTP connection to a peer API whose socket is made inside ``netns`` (``None``: ours)."""

    def __init__(self, host: str, port: int, timeout: float, netns: str | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        from wgmesh.wireguard.netns import socket_in

        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket_in(self.netns, fam, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect((self.host, self.port))
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s


def request(conn: http.client.HTTPConnection, method: str, path: str,
            q: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """A body-less request with query ``q``; returns (status, JSON body)."""
    conn.request(method, f"{path}?{urlencode(q)}")
    return read_response(conn)


def read_response(conn: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); a body that is not JSON becomes ``{"error": its start}``."""
    r = conn.getresponse()
    raw = r.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"error": raw[:200].decode(errors="replace")}
    return r.status, body if isinstance(body, dict) else {}


def send_file(dest: str, path: str | os.PathLike[str], *, port: int = DEFAULT_PORT,
              name: str | None = None, progress: Progress | None = None,
              retries: int = 5, timeout: float = 30.0,
              netns: str | None = None) -> SendResult:
    """Send one file to a peer's peer API at ``dest`` (its tunnel address). Blocking.

    The file streams from disk in chunks (never read whole into memory), each
    hashed as it goes out, and the SHA-256 of the whole is named in the commit
    that makes the file appear at the receiver. If the connection breaks, it
    asks the receiver how much it kept and sends the rest, up to ``retries``
    times; a later call with the same file resumes the same way, as after a
    killed process. A file that changes while it is sent is not committed.
    ``progress(done, total)`` is called as bytes go out. ``netns``: connect
    from that network namespace (a Node living in one). Async callers:
    ``await asyncio.to_thread(send_file, ...)``. Raises
    :class:`~wgmesh.drop.protocol.DropRefused` with the receiver's reason, or
    :class:`~wgmesh.drop.protocol.DropError`.
    """
    path = Path(path)
    name = path.name if name is None else name
    check_name(name)
    host, port = _target(dest, port)
    t0 = time.monotonic()
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below, used across retries
    except OSError as e:
        raise DropError(f"{path}: {e.strerror}") from e
    with f:
        stream = _Stream(f, path)
        q: dict[str, Any] = {"name": name, "size": stream.size}
        first_offset: int | None = None
        sent = 0
        fresh_start = False  # a commit refused a resumed partial: begin again, once
        for attempt in range(retries + 1):
            conn = Connection(host, port, timeout, netns)
            try:
                status, body = request(conn, "GET", "/v1/offset", q)
                if status == 400 and "sha256" not in q:
                    # A receiver from before /v1/commit wants the digest in the offer.
                    q["sha256"] = stream.digest_first()
                    status, body = request(conn, "GET", "/v1/offset", q)
                if status != 200:
                    raise DropRefused(status, refusal_text(status, body, host))
                offset = int(body.get("offset", 0))
                first_offset = offset if first_offset is None else first_offset
                if progress:
                    progress(offset, stream.size)
                n, status, body = _put(conn, stream, q, offset, progress)
                sent += n
                if status == 200 and "sha256" not in q:
                    stream.check_unchanged()
                    status, body = request(conn, "POST", "/v1/commit",
                                           {**q, "sha256": stream.sha256})
                    if status == 422 and offset and not fresh_start:
                        fresh_start, first_offset = True, None  # it held another file's bytes
                        continue
                if status == 201:
                    return SendResult(str(body.get("name", name)), stream.size,
                                      q.get("sha256") or stream.sha256, first_offset, sent,
                                      time.monotonic() - t0, stream.hash_seconds)
                if status not in (200, 409):  # the receiver holds less than it said
                    raise DropRefused(status, refusal_text(status, body, host))
            except (OSError, http.client.HTTPException) as e:
                if attempt == retries:
                    raise DropError(f"sending {name} to {host} failed: {e}") from e
                time.sleep(min(2.0, 0.1 * 2 ** attempt))  # back off before reconnecting
            finally:
                conn.close()
        raise DropError(f"sending {name} to {host}: gave up after {retries + 1} attempts")


class _Stream:
    """The file being sent: its ranges from any offset, and the SHA-256 of the whole.

    Each range is hashed just before ``sendfile(2)`` sends it from the page cache (one
    read of the disk, no copy of the bytes into the socket). ``size`` and modification
    time are taken at the start and checked before the commit, so a file written to
    meanwhile is refused by the sender rather than delivered torn; a change between a
    range's hash and its send is caught by the receiver's digest check.
    """

    def __init__(self, f: io.BufferedReader, path: Path) -> None:
        self.f, self.path = f, path
        st = os.fstat(f.fileno())
        self.size, self._stamp = st.st_size, (st.st_size, st.st_mtime_ns)
        self._buf = bytearray(CHUNK)
        self.sha256 = ""
        self.hash_seconds = 0.0

    def digest_first(self) -> str:
        """The whole file's digest before sending (for a receiver that wants it first)."""
        t = time.monotonic()
        self.f.seek(0)
        self.sha256 = hashlib.file_digest(self.f, "sha256").hexdigest()
        self.hash_seconds += time.monotonic() - t
        return self.sha256

    def ranges(self, offset: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` ranges from ``offset`` to the end, to send in order.

        Until the digest is known it is taken on the way, from the start: what lies
        before ``offset`` is read for the digest alone, and that time is counted in
        ``hash_seconds``.
        """
        if self.sha256:
            for pos in range(offset, self.size, 8 * CHUNK):
                yield pos, min(pos + 8 * CHUNK, self.size)
            return
        h, t = hashlib.sha256(), time.monotonic()
        pos, view, fd = 0, memoryview(self._buf), self.f.fileno()
        while pos < self.size:
            n = os.preadv(fd, [view[:min(CHUNK, self.size - pos)]], pos)
            if not n:
                raise DropError(f"{self.path} shrank while it was being sent")
            h.update(view[:n])
            if pos + n > offset:
                if pos <= offset and offset:
                    self.hash_seconds += time.monotonic() - t
                yield max(pos, offset), pos + n
            pos += n
        self.sha256 = h.hexdigest()

    def check_unchanged(self) -> None:
        st = os.fstat(self.f.fileno())
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise DropError(f"{self.path} changed while it was being sent; not delivered")


def _put(conn: http.client.HTTPConnection, stream: _Stream, q: Mapping[str, Any], offset: int,
         progress: Progress | None) -> tuple[int, int, dict[str, Any]]:
    """Stream bytes ``offset..size``; returns (bytes sent, status, body)."""
    conn.putrequest("PUT", f"/v1/files?{urlencode({**q, 'offset': offset})}")
    conn.putheader("Content-Length", str(stream.size - offset))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    sock = conn.sock
    assert sock is not None
    pos = offset
    try:
        for start, end in stream.ranges(offset):
            n = sock.sendfile(stream.f, start, end - start)
            pos += n
            if n < end - start:
                raise ConnectionError("the receiver closed the connection")
            if progress:
                progress(pos, stream.size)
    except OSError:
        # The receiver may have refused mid-stream (quota, disk full) and closed;
        # its answer is still readable. If not, it is a real interruption.
        status, body = read_response(conn)
        return pos - offset, status, body
    status, body = read_response(conn)
    return pos - offset, status, body
