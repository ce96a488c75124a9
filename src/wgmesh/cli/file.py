"""``wgmesh file send|receive``: send files to peers, collect dropped files.

Sending happens in the CLI process itself, straight through the tunnel, so the
progress bar is local; receiving reads ``STATE_DIR/inbox``. The node agent
turns peer names into tunnel addresses (``resolve_peer``).

``python -m wgmesh.cli.file send|receive`` runs the same commands with no node
agent, peers given by tunnel address: for a peer API on a plain WireGuard
interface (``python -m wgmesh.lab.dropd serve``), as the lab tests and the
benchmarks use it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import attrs

from wgmesh.cli.output import print_table, run_command, socket_option
from wgmesh.display import human_bytes
from wgmesh.drop.inbox import Inbox
from wgmesh.drop.protocol import DEFAULT_PORT, DropError
from wgmesh.drop.sender import Progress, send_file

__all__ = ["add_parser", "main", "progress_bar"]

DEFAULT_STATE_DIR = "/var/lib/wgmesh"

#: PEER (a name or an address) and the agent's socket (None: no agent) -> its tunnel address.
ResolvePeer = Callable[[str, str | None], str]


def progress_bar(name: str, stream: TextIO | None = None) -> Progress:
    """A one-line progress bar on a terminal (stderr by default)."""
    out = sys.stderr if stream is None else stream
    t0 = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        rate = done / max(now - t0, 1e-6)
        bar = "#" * int(frac * 30)
        out.write(f"\r{name[:30]:<30} [{bar:<30}] {frac:4.0%} {human_bytes(rate)}/s ")
        if done >= total:
            out.write("\n")
        out.flush()

    return show


def _literal_peer(peer: str, _socket: str | None = None) -> str:
    try:
        return str(ipaddress.ip_address(peer.strip("[]")))
    except ValueError:
        raise DropError(f"{peer}: give the peer's tunnel address (peer names need the"
                        " running node agent)") from None


def cmd_send(a: argparse.Namespace, resolve_peer: ResolvePeer) -> int:
    """``wgmesh file send PEER PATH...``: each file in turn; stops at the first refusal."""
    addr = resolve_peer(a.peer, a.socket)
    for p in a.paths:
        bar = progress_bar(Path(p).name) if sys.stderr.isatty() and not a.json else None
        r = send_file(addr, p, port=a.port, progress=bar)
        if a.json:
            print(json.dumps({"peer": a.peer, **attrs.asdict(r)}), flush=True)
        else:
            resumed = f", resumed at {human_bytes(r.resumed_from)}" if r.resumed_from else ""
            print(f"sent {p} to {a.peer} as {r.name} ({human_bytes(r.size)},"
                  f" sha256 ok{resumed})", flush=True)
    return 0


def cmd_receive(a: argparse.Namespace) -> int:
    """``wgmesh file receive [DIR]``: list the inbox, or (with DIR) move everything there."""
    inbox = Inbox(Path(a.state_dir) / "inbox")
    files = inbox.wait(a.timeout) if a.wait else inbox.list()
    if a.wait and not files:
        raise DropError(f"no file arrived within {a.timeout:g} s")
    if a.dir is None:
        if a.json:
            print(json.dumps([{"name": f.name, "size": f.size, "mtime": f.mtime}
                              for f in files]))
        else:
            print_table([{"name": f.name, "size": human_bytes(f.size),
                          "received": time.strftime("%Y-%m-%d %H:%M:%S",
                                                    time.localtime(f.mtime))}
                         for f in files], ["name", "size", "received"])
        return 0
    dest = Path(a.dir)
    if dest.exists() and not dest.is_dir():
        raise DropError(f"{dest}: not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    moved = inbox.move_to(dest, files)
    if a.json:
        print(json.dumps([str(p) for p in moved]))
    else:
        for p in moved:
            print(f"{p}")
        if not moved:
            print("inbox is empty", file=sys.stderr)
    return 0


def _add_commands(fs: argparse._SubParsersAction[argparse.ArgumentParser],
                  resolve_peer: ResolvePeer, state_dir: str, agent: bool) -> None:
    s = fs.add_parser("send", help="send files to a peer through the tunnel")
    s.add_argument("peer", metavar="PEER", help="peer name or tunnel address")
    s.add_argument("paths", metavar="PATH", nargs="+", help="files to send")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="the peer's peer API port")
    s.add_argument("--json", action="store_true", help="one JSON object per file")
    if agent:
        socket_option(s, "the agent's local API socket, to look PEER up (env WGMESH_SOCKET)")
    else:
        s.set_defaults(socket=None)
    s.set_defaults(func=lambda a: cmd_send(a, resolve_peer))
    r = fs.add_parser("receive", help="list the inbox, or move its files to DIR")
    r.add_argument("dir", metavar="DIR", nargs="?",
                   help="move received files here (created if missing)")
    r.add_argument("--wait", action="store_true", help="wait until a file has arrived")
    r.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    r.add_argument("--state-dir", default=state_dir, help=f"node state (default {state_dir})")
    r.add_argument("--json", action="store_true", help="machine output")
    r.set_defaults(func=cmd_receive)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               resolve_peer: ResolvePeer, state_dir: str = DEFAULT_STATE_DIR) -> None:
    """Register ``file send`` / ``file receive``; ``resolve_peer`` names PEER's address."""
    f = sub.add_parser("file", help="send files to peers, receive dropped files")
    _add_commands(f.add_subparsers(dest="file_cmd", required=True), resolve_peer, state_dir,
                  agent=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wgmesh.cli.file send|receive``: the file commands without a node agent."""
    ap = argparse.ArgumentParser(
        prog="python -m wgmesh.cli.file",
        description="wgmesh file send|receive without a node agent: peers by tunnel address")
    _add_commands(ap.add_subparsers(dest="file_cmd", required=True), _literal_peer,
                  DEFAULT_STATE_DIR, agent=False)
    return run_command(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
