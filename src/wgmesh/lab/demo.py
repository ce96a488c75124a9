"""A whole mesh on one machine, in about a minute (``wgmesh demo``).

Builds a lab (control with SQLite and two meshed relays on the "internet"; four
nodes behind ``none``, ``eim``, ``symmetric`` and ``udp-blocked`` NATs), brings
the mesh up, shows the peers' paths live as they upgrade from relay to direct,
runs a ping matrix, sends a file through the tunnel, prints a summary and tears
everything down. The summary (what ``wgmesh demo --json`` prints): ``peers``
(``a``, ``b``, ``path``, ``rtt_ms`` per pair) and ``file`` (``bytes``, ``sha256_ok``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import time
from typing import Any

from wgmesh.display import text_table
from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import Lab

__all__ = ["DEMO_NODES", "run_demo"]

#: node name -> NAT kind in front of it
DEMO_NODES = {"pub": "none", "home": "eim", "cafe": "symmetric", "office": "udp-blocked"}
FILE_BYTES = 4 * 1024 * 1024


def _say(quiet: bool, *args: Any) -> None:
    if not quiet:
        print(*args, flush=True)


def _path_rows(nodes: dict[str, MeshNode]) -> list[dict[str, Any]]:
    rows = []
    for a, b in itertools.combinations(nodes, 2):
        p = nodes[a].peer(b)
        rows.append({"a": a, "b": b, "path": p["path"] if p else "-",
                     "via": (p["endpoint"] if p and p["path"] == "direct"
                             else f"relay region {p['relay_region']}" if p else "-"),
                     "latency_ms": p["rtt_ms"] if p else None})
    return rows


def _live_paths(nodes: dict[str, MeshNode], seconds: float, quiet: bool) -> None:
    """Redraw the path table while traversal upgrades relayed pairs to direct."""
    tty = sys.stdout.isatty() and not quiet
    shown = ""
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        rows = _path_rows(nodes)
        table = text_table(rows, ["a", "b", "path", "via", "latency_ms"])
        if table != shown:
            if tty:
                print("\x1b[H\x1b[2J", end="")
            _say(quiet, f"--- paths after {time.monotonic() - t0:4.1f}s ---\n{table}")
            shown = table
        time.sleep(0.5)


def _ping_matrix(nodes: dict[str, MeshNode]) -> list[dict[str, Any]]:
    out = []
    for a, b in itertools.combinations(nodes, 2):
        r = None
        for _ in range(3):
            r = nodes[a].ping(b, timeout=2.0)
            if r["rtt_ms"] is not None:
                break
        assert r is not None
        out.append({"a": a, "b": b, "path": r["path"],
                    "rtt_ms": None if r["rtt_ms"] is None else round(r["rtt_ms"], 2)})
    return out


def _send_file(mesh: MeshLab, src: MeshNode, dst: MeshNode) -> dict[str, Any]:
    """A generated file from ``src`` to ``dst`` through the tunnel; digest checked at both ends."""
    data = os.urandom(FILE_BYTES)
    path = mesh.dir / "demo-file.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    res = src.call("file_send", {"peer": dst.name, "paths": [str(path)]}, timeout=120)
    got = dst.call("file_list")
    ok = any(f.get("sha256") == want and f.get("size") == FILE_BYTES for f in got)
    return {"bytes": FILE_BYTES, "sha256_ok": bool(ok and res), "from": src.name,
            "to": dst.name}


def run_demo(*, quiet: bool = False, settle: float = 15.0, backend: str = "userspace"
             ) -> dict[str, Any]:
    """Build, show and tear down the demo mesh; returns the summary (``quiet``: print nothing)."""
    t0 = time.monotonic()
    with Lab() as lab:
        _say(quiet, f"lab {lab.prefix}: control + 2 relays on the internet, "
             f"{len(DEMO_NODES)} nodes behind NATs")
        mesh = MeshLab(lab, backend=backend)
        try:
            nodes = {name: mesh.add_node(name, kind) for name, kind in DEMO_NODES.items()}
            mesh.wait_connected(60)
            _say(quiet, f"mesh up in {time.monotonic() - t0:.1f}s: " + ", ".join(
                f"{n} ({k}) {nodes[n].ipv4}" for n, k in DEMO_NODES.items()))
            _live_paths(nodes, settle, quiet)
            matrix = _ping_matrix(nodes)
            _say(quiet, "--- ping matrix (through the tunnel) ---")
            _say(quiet, text_table(matrix, ["a", "b", "path", "rtt_ms"]))
            file = _send_file(mesh, nodes["home"], nodes["office"])
            _say(quiet, f"--- file: {file['bytes']} bytes {file['from']} -> {file['to']}, "
                 f"sha256 {'matches' if file['sha256_ok'] else 'MISMATCH'} ---")
        finally:
            mesh.close()
    summary = {"peers": matrix, "file": {"bytes": file["bytes"],
                                         "sha256_ok": file["sha256_ok"]},
               "seconds": round(time.monotonic() - t0, 1)}
    direct = sum(p["path"] == "direct" for p in matrix)
    _say(quiet, f"summary: {len(matrix)} pairs, {direct} direct, "
         f"{len(matrix) - direct} relayed, all answered: "
         f"{all(p['rtt_ms'] is not None for p in matrix)}; took {summary['seconds']}s")
    return summary
