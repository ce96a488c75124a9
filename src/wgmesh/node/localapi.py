"""The running agent's local API: JSON lines over a 0600 Unix socket.

``wgmesh status|ping|down|file ...`` talk to the ``wgmesh up`` agent here. A Unix
socket (not TCP) means no DNS rebinding and no remote callers; the peer's
credentials (SO_PEERCRED) must be root or the agent's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wgmesh.errors import WgmeshError

__all__ = ["DEFAULT_SOCKET", "Handler", "LocalAPIError", "LocalAPIServer", "call"]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/wgmesh/wgmesh.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class LocalAPIError(WgmeshError):
    pass


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class LocalAPIServer:
    def __init__(self, path: str | os.PathLike[str], methods: dict[str, Handler]) -> None:
        self.path = Path(path)
        self.methods = methods
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists():
            if await _answers(self.path):
                raise LocalAPIError(f"another agent is already running on {self.path}")
            self.path.unlink()
        old = os.umask(0o177)  # the socket is born 0600; no window with wider rights
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if _peer_uid(sock) not in (0, os.getuid()):
                await _reply(writer, {"error": "permission denied"})
                return
            try:
                line = await reader.readline()
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                    raise ValueError("request must be an object with a method")
            except (ValueError, asyncio.LimitOverrunError) as e:
                await _reply(writer, {"error": f"bad request: {e}"})
                return
            except RecursionError:  # "[[[[..." deeper than the parser's stack
                await _reply(writer, {"error": "bad request: nested too deeply"})
                return
            handler = self.methods.get(req["method"])
            if handler is None:
                await _reply(writer, {"error": f"unknown method {req['method']!r}"})
                return
            params = req.get("params") or {}
            if not isinstance(params, dict):
                await _reply(writer, {"error": "bad request: params must be an object"})
                return
            try:
                result = await handler(params)
            except WgmeshError as e:
                await _reply(writer, {"error": str(e)})
            except KeyError as e:
                await _reply(writer, {"error": f"{req['method']}: missing parameter {e}"})
            except (TypeError, ValueError) as e:
                await _reply(writer, {"error": f"{req['method']}: bad parameter: {e}"})
            except Exception as e:
                # Whatever went wrong, the caller gets an answer rather than a closed socket.
                log.exception("local API method %s failed", req["method"])
                await _reply(writer, {"error": f"{req['method']} failed: "
                                               f"{type(e).__name__}: {e}"})
            else:
                await _reply(writer, {"result": result})
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


async def _answers(path: Path) -> bool:
    try:
        _r, w = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    w.close()
    return True


def call(method: str, params: dict[str, Any] | None = None, *,
         path: str | os.PathLike[str] = DEFAULT_SOCKET, timeout: float = 60) -> Any:
    """Blocking call to the agent (what the CLI uses)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise LocalAPIError(f"no wgmesh agent running ({path}); start one with `wgmesh up`"
                            ) from None
    except PermissionError:
        raise LocalAPIError(f"{path}: permission denied (run as root)") from None
    with s:
        s.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    try:
        resp = json.loads(buf)
    except ValueError:
        raise LocalAPIError("the agent closed the connection without an answer") from None
    if "error" in resp:
        raise LocalAPIError(resp["error"])
    return resp.get("result")
