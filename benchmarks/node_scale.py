"""A node with 500 peers: each netmap change applied as a diff, and the agent's memory in a soak.

A real ``wgmesh up`` (userspace backend, a lab host on the public side) registers
with a real ``wgmesh control serve`` that already holds ``--peers`` nodes (seeded
straight into its store, as ``control_scale.py`` does: registering them through the
API would take minutes), so its first netmap has them all. Then, for ``--minutes``
(default 10, the issue's soak), one change every ``--interval`` s through control's
API, in turn: a peer's endpoints change (node update with its token), a peer is
deleted (admin API), a node registers (auth key). The peer count stays where it
started.

Per change: ``apply_*`` is the agent's own time to fold the netmap into the backend
and traversal (the ``netmap`` event's ``apply_s``), ``e2e_*`` the time from just
before the request to the event (the request's TLS set-up, control's fan-out and
the stream included: an upper bound). ``diffs`` counts the changes by how many peers
the backend touched (``"1"``: one added, removed or updated; ``"0"``: an endpoint,
which only traversal takes). Reference in the same run: the apply of the agent's
first netmap, every peer at once (``full_apply_s``); ``ratio_full_vs_diff`` is it
over the median diff apply. Memory: the agent's RSS once the first map is applied
(``rss_start_mb``), once a minute (``rss_mb``) and at the end (``rss_end_mb``).

``--backend kernel``: the same on kernel WireGuard. The host kernel has no WireGuard,
so it boots one virtme-ng VM (qemu without KVM, as the kernel tests and
``kernel_overhead.py`` do) and runs there; the lab's timeouts stretch by the VM's time
scale, and the changes come as fast as the emulated agent takes them, at most one per
``--interval``. Its figures are the VM's, not comparable with the host's.

    sudo .venv/bin/python benchmarks/node_scale.py [--minutes 10] [--peers 500] \
        [--backend kernel]
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _bench import Report, proc_cpu_s, proc_rss_mb, run_in_vm, tail
from wgmesh.control.client import ControlClient
from wgmesh.keys import PrivateKey
from wgmesh.lab import Lab, LabError
from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import TIME_SCALE
from wgmesh.wireguard.backend import kernel_wireguard_available


def _netmaps(node: MeshNode) -> list[dict[str, Any]]:
    return [{**e["data"], "at": e["at"]}
            for e in node.call("events", {"name": "netmap"}, timeout=30 * TIME_SCALE)]


def _peers(node: MeshNode) -> list[dict[str, Any]]:
    """The agent's status peers (500 of them take a while under the VM's emulation)."""
    peers: list[dict[str, Any]] = node.call("status", timeout=30 * TIME_SCALE)["peers"]
    return peers


def _wait_netmap(node: MeshNode, after_seq: int, timeout: float = 30) -> dict[str, Any]:
    """The first netmap event past ``after_seq``."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = next((e for e in _netmaps(node) if e["seq"] > after_seq), None)
        if ev is not None:
            return ev
        time.sleep(0.01)
    raise LabError(f"no netmap after seq {after_seq} within {timeout} s")


def _change(n: int, mover: str, names: collections.deque[str], authkey: str
            ) -> tuple[Callable[[ControlClient], object], str | None]:
    """Change ``n`` of the soak (the call to make, with the node token it needs): in turn
    the mover's endpoints, deleting the oldest peer in ``names``, registering a new one."""
    kind = n % 3
    if kind == 0:
        endpoint = f"198.51.100.{1 + n % 250}:{1024 + n % 60000}"
        return (lambda c: c.update(endpoints=[endpoint])), mover
    if kind == 1:
        gone = names.popleft()
        return (lambda c: c.delete_node(f"name:{gone}")), None
    name = f"new{n}"
    names.append(name)
    return (lambda c: c.register(PrivateKey.generate(), PrivateKey.generate().public, name,
                                 auth_key=authkey)), None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    ap.add_argument("--peers", type=int, default=500)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between changes")
    ap.add_argument("--backend", choices=("userspace", "kernel"), default="userspace")
    ap.add_argument("--inside", action="store_true", help="measure here (used inside the VM)")
    a = ap.parse_args()
    report = Report()
    if a.backend == "kernel" and not a.inside and not kernel_wireguard_available()[0]:
        return run_in_vm(__file__, ["--inside", "--backend", "kernel", "--minutes",
                                    str(a.minutes), "--peers", str(a.peers), "--interval",
                                    str(a.interval)], report, "node_scale",
                         timeout=a.minutes * 60 + 1800)
    with Lab() as lab:
        mesh = MeshLab(lab, relays=0, backend=a.backend)
        mesh.seed_nodes(a.peers)
        node = mesh.add_node(f"big{secrets.token_hex(2)}", "none")
        node.proc.wait_for_output("wgmesh up:", timeout=120 * TIME_SCALE)
        deadline = time.monotonic() + 120 * TIME_SCALE
        while len(_peers(node)) < a.peers:
            if time.monotonic() > deadline:
                raise LabError(f"the agent never saw {a.peers} peers")
            time.sleep(0.2)
        first = max(_netmaps(node), key=lambda e: e["added"])
        pid = node.proc.pid
        rss_start, cpu0 = proc_rss_mb(pid), proc_cpu_s(pid)
        authkey = mesh.authkey()
        # Who may be deleted next: seeded peers first, then the ones registered here.
        names = collections.deque(p["name"] for p in _peers(node))
        tokens = mesh.seed_nodes(1, prefix="mover")  # the peer whose endpoints move
        seq = _wait_netmap(node, _netmaps(node)[-1]["seq"])["seq"]
        apply_s: list[float] = []
        e2e_s: list[float] = []
        diffs: collections.Counter[str] = collections.Counter()
        rss: list[float] = []
        t_end = time.monotonic() + a.minutes * 60
        next_rss = time.monotonic() + 60
        n = 0
        while time.monotonic() < t_end:
            t_next = time.monotonic() + a.interval
            do, token = _change(n, tokens[0], names, authkey)
            t0 = time.time()
            mesh.control_call(do, node_token=token)
            ev = _wait_netmap(node, seq)
            seq = ev["seq"]
            apply_s.append(ev["apply_s"])
            e2e_s.append(ev["at"] - t0)
            diffs[str(ev["added"] + ev["updated"] + ev["removed"])] += 1
            n += 1
            if time.monotonic() >= next_rss:
                rss.append(proc_rss_mb(pid))
                next_rss += 60
            time.sleep(max(0.0, t_next - time.monotonic()))
        peers = len(_peers(node))
        out = {"backend": a.backend, "peers": peers, "minutes": a.minutes, "changes": n,
               "diffs": dict(diffs), **tail(apply_s, "apply_"), **tail(e2e_s, "e2e_"),
               "full_apply_s": first["apply_s"], "full_apply_peers": first["added"],
               "ratio_full_vs_diff": round(first["apply_s"] / statistics.median(apply_s), 1),
               "rss_start_mb": rss_start, "rss_mb": rss, "rss_end_mb": proc_rss_mb(pid),
               "agent_cpu_s": round(proc_cpu_s(pid) - cpu0, 1),
               "where": "virtme-ng VM, qemu TCG (no KVM)" if os.environ.get("WGMESH_IN_VM")
               else "this host"}
    report.emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
