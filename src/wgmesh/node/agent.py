"""The long-lived node agent behind ``wgmesh up``: an AsyncNode and its local API.

The agent is an :class:`~wgmesh.node.api.AsyncNode` plus the local API
(:mod:`wgmesh.node.localapi`), whose 0600 Unix socket ``wgmesh status``, ``ping``,
``netcheck``, ``file`` and ``down`` talk to (their client side is
:mod:`wgmesh.cli.agent`). It runs until ``down`` is called on that socket, or
SIGTERM or SIGINT (systemd's ``Type=simple``; see ``examples/wgmesh.service``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from wgmesh import netmap as nm
from wgmesh.node.api import DEFAULT_IFNAME, AsyncNode
from wgmesh.node.events import Event
from wgmesh.node.localapi import DEFAULT_SOCKET, Handler, LocalAPIServer
from wgmesh.node.metrics import MetricsExporter
from wgmesh.node.status import Status

__all__ = ["local_methods", "run_agent"]

#: How many of the latest events the ``events`` method can show.
RECENT_EVENTS = 256


async def run_agent(control_url: str, *, authkey: str | None = None,
                    state_dir: str | os.PathLike[str] = "/var/lib/wgmesh",
                    backend: str = "auto", hostname: str | None = None,
                    ifname: str = DEFAULT_IFNAME, listen_port: int = 0,
                    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
                    on_up: Callable[[Status], None] | None = None,
                    metrics_listen: str | None = None, metrics_any: bool = False,
                    control_key: str | None = None, control_ca: str | None = None,
                    node_options: Mapping[str, Any] | None = None) -> None:
    """Run a node and serve its local API on ``socket_path`` until told to stop; the node
    goes down on the way out. ``on_up(status)`` runs once the node is up.
    ``metrics_listen``: ``IP:PORT`` for Prometheus (:mod:`wgmesh.node.metrics`; an
    unspecified address only with ``metrics_any``). ``control_key``/``control_ca``: as
    for :class:`~wgmesh.node.api.AsyncNode`; ``node_options``: more of its keyword
    arguments (routes, exit node, MTU)."""
    node = AsyncNode(control_url, authkey=authkey, state_dir=state_dir, backend=backend,
                     hostname=hostname, ifname=ifname, listen_port=listen_port,
                     control_key=control_key, control_ca=control_ca, **(node_options or {}))
    metrics = (MetricsExporter(node, metrics_listen, allow_any=metrics_any)
               if metrics_listen else None)
    stopped = asyncio.Event()

    async def down(_p: dict[str, Any]) -> Any:
        stopped.set()
        return {"stopping": True}

    api = LocalAPIServer(socket_path, {**local_methods(node), "down": down})
    await api.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        st = await node.up()
        if metrics is not None:
            metrics.start()
        if on_up is not None:
            on_up(st)
        await stopped.wait()
    finally:
        if metrics is not None:
            metrics.close()
        await node.down()
        await api.close()


def local_methods(node: AsyncNode) -> dict[str, Handler]:
    """The local API's methods on ``node`` (JSON params in, JSON-able results out)."""
    from wgmesh.drop.sender import file_digest

    # Kept from the start, so a CLI that asks later still sees e.g. a pin_failed.
    recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
    node.on("*", recent.append)

    async def events(p: dict[str, Any]) -> Any:
        name = p.get("name")
        return [{"name": e.name, "at": e.at, "data": e.data} for e in list(recent)
                if name is None or e.name == name]

    async def status(_p: dict[str, Any]) -> Any:
        return (await node.status()).to_json()

    async def ping(p: dict[str, Any]) -> Any:
        return (await node.ping(str(p["peer"]), count=int(p.get("count", 1)),
                                timeout=float(p.get("timeout", 5)))).to_json()

    async def netcheck(_p: dict[str, Any]) -> Any:
        return (await node.netcheck()).to_json()

    async def file_send(p: dict[str, Any]) -> Any:
        paths = p["paths"]
        if not isinstance(paths, list):
            raise TypeError("paths must be a list of file names")
        out = []
        for path in paths:
            r = await node.send_file(str(p["peer"]), path)
            out.append(attrs.asdict(r))
        return out

    async def file_list(p: dict[str, Any]) -> Any:
        files = await asyncio.to_thread(node.state_inbox().list)
        return [{"name": f.name, "size": f.size, "mtime": f.mtime,
                 "sha256": await asyncio.to_thread(file_digest, f.path)
                 if p.get("sha256", True) else None} for f in files]

    async def file_receive(p: dict[str, Any]) -> Any:
        inbox = node.state_inbox()
        if p.get("wait"):
            await asyncio.to_thread(inbox.wait, float(p.get("timeout", 0)) or None)
        moved = await asyncio.to_thread(inbox.move_to, p["dest"])
        return [str(m) for m in moved]

    async def pin(p: dict[str, Any]) -> Any:
        mode = str(p["mode"])
        await node.pin(str(p["peer"]), int(mode) if mode.isascii() and mode.isdigit() else mode)
        return {"pinned": mode}

    async def unpin(p: dict[str, Any]) -> Any:
        await node.unpin(str(p["peer"]))
        return {"pinned": None}

    async def reauthenticate(p: dict[str, Any]) -> Any:
        authkey = p.get("authkey")
        return nm.to_json(await node.reauthenticate(None if authkey is None else str(authkey)))

    return {"status": status, "ping": ping, "netcheck": netcheck, "file_send": file_send,
            "file_list": file_list, "file_receive": file_receive, "pin": pin, "unpin": unpin,
            "reauthenticate": reauthenticate, "events": events}
