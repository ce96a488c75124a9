"""The connectivity grid: node pairs behind every pair of NAT kinds, measured end to end.

For each pair, two ``wgmesh up`` agents join one lab mesh (control + meshed
relays) and we measure, through their local APIs and real tunnel pings:

* ``connected`` and the settled ``path`` (direct / relay);
* ``t_first_packet_s``: from both agents up to the first tunnel ping answered;
* ``t_direct_s``: to the first ping answered on a direct path (None: never, within
  ``direct_budget``);
* ``recovered_after_flush``: after ``conntrack -F`` on the pair's NAT routers
  (every mapping forgotten; a port-mapping router reboots, losing its mapping table
  too), tunnel pings answer again within ``recover_budget``;
  ``path_after_flush`` is the path they took once the direct path (if there was
  one) is back, or the path of the last answered ping when the budget ran out;
* ``reason``: why the pair's path is what it is, as ``a`` explains it (its
  ``status`` reason) when the direct budget ended, so a relayed pair says why.

The grid measures and reports; the tests assert what each NAT pair should give.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from wgmesh.display import html_table, text_table
from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import NAT_KINDS, TIME_SCALE, Lab, parse_nat_spec

__all__ = ["GridResult", "expected_path", "grid_pairs", "measure_pair", "run_grid"]

COLUMNS = ["a", "b", "backend", "connected", "path", "t_first_packet_s", "t_direct_s",
           "recovered_after_flush", "path_after_flush", "reason"]


@attrs.frozen
class GridResult:
    a: str
    b: str
    backend: str
    connected: bool
    path: str | None
    t_first_packet_s: float | None
    t_direct_s: float | None
    recovered_after_flush: bool | None
    path_after_flush: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class Grid(list[GridResult]):
    """A list of results that renders as a table (text, or HTML in Jupyter)."""

    def __str__(self) -> str:
        return text_table([r.to_json() for r in self], COLUMNS)

    def _repr_html_(self) -> str:
        return html_table([r.to_json() for r in self], COLUMNS, caption="connectivity grid")


def expected_path(a: str, b: str, backend: str = "userspace") -> str:
    """What the NATs allow: relay with udp-blocked or symmetric on both sides, else direct.

    A port-mapping router (``symmetric+pcp``) forwards its mapped port to the node
    whatever its NAT kind, so any pair with one is direct unless UDP is blocked.
    eim x symmetric needs the port search; on the kernel backend (one port) that
    is a linear scan which may not find the port in its budget, so either path
    is acceptable there.
    """
    (a, map_a), (b, map_b) = parse_nat_spec(a), parse_nat_spec(b)
    kinds = {a, b}
    if "udp-blocked" in kinds:
        return "relay"
    if map_a or map_b:
        return "direct"
    if a == b == "symmetric":
        return "relay"
    if backend == "kernel" and kinds == {"eim", "symmetric"}:
        return "either"
    return "direct"


def grid_pairs(kinds: Sequence[str] = NAT_KINDS) -> list[tuple[str, str]]:
    return list(itertools.combinations_with_replacement(kinds, 2))


def _ping_ok(node: MeshNode, peer: str, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        r = node.ping(peer, timeout=timeout)
    except Exception:
        return None
    return r if r.get("rtt_ms") is not None else None


def measure_pair(mesh: MeshLab, index: int, ka: str, kb: str, *,
                 backend: str | None = None, direct_budget: float | None = None,
                 recover_budget: float = 10.0, first_budget: float | None = None
                 ) -> GridResult:
    """One pair; kinds as spelled (``symmetric+pcp``), and so reported. Budgets in seconds; ``None``: the defaults (25 s to direct, 15 s to the
    first packet) stretched by :data:`~wgmesh.lab.network.TIME_SCALE` for slow (emulated) hosts.
    The flush-recovery budget is the target itself and is not stretched."""
    backend = backend or mesh.backend
    direct_budget = 25.0 * TIME_SCALE if direct_budget is None else direct_budget
    first_budget = 15.0 * TIME_SCALE if first_budget is None else first_budget
    na, nb = f"g{index}a", f"g{index}b"
    a = mesh.add_node(na, ka, backend=backend)
    b = mesh.add_node(nb, kb, backend=backend)
    try:
        a.proc.wait_for_output("wgmesh up:", timeout=60)
        b.proc.wait_for_output("wgmesh up:", timeout=60)
        deadline = time.monotonic() + 30 * TIME_SCALE
        while not (a.peer(nb) and b.peer(na)):
            if time.monotonic() > deadline:
                return GridResult(ka, kb, backend, False, None, None, None, None)
            time.sleep(0.05)
        t0 = time.monotonic()
        first = direct = None
        path: str | None = None
        end_first = t0 + first_budget
        while first is None and time.monotonic() < end_first:
            if (r := _ping_ok(a, nb, 0.5)) is not None:
                first = time.monotonic() - t0
                path = r["path"]
                if path == "direct":
                    direct = first
        if first is None:
            return GridResult(ka, kb, backend, False, None, None, None, None)
        end_direct = t0 + direct_budget
        while direct is None and time.monotonic() < end_direct:
            st = a.peer(nb)
            if st and st["path"] == "direct" and (r := _ping_ok(a, nb, 0.5)) is not None \
                    and r["path"] == "direct":
                direct = time.monotonic() - t0
                path = "direct"
                break
            time.sleep(0.1)
        path = "direct" if direct is not None else "relay"
        reason = (a.peer(nb) or {}).get("reason")
        recovered, path_after = _flush_and_recover(a, b, nb, path, recover_budget)
        return GridResult(ka, kb, backend, True, path, round(first, 3),
                          None if direct is None else round(direct, 3), recovered, path_after,
                          reason)
    finally:
        for n in (a, b):
            n.stop()
            mesh.nodes.pop(n.name, None)
        for name in (na, nb):
            with contextlib.suppress(Exception):  # best effort: the lab is torn down anyway
                mesh.admin("nodes", "delete", name)


def _flush_and_recover(a: MeshNode, b: MeshNode, nb: str, path: str, budget: float
                       ) -> tuple[bool, str | None]:
    """Forget every NAT mapping (port-mapping routers reboot); wait for tunnel pings, and
    for the direct path if it had one."""
    for n in (a, b):
        if n.host.nat is not None:
            n.host.nat.reboot()
    t0 = time.monotonic()
    answered: str | None = None
    while time.monotonic() - t0 < budget:
        r = _ping_ok(a, nb, 0.5)
        if r is not None:
            answered = r["path"]
            if path == "relay" or answered == "direct":
                break
        time.sleep(0.1)
    return answered is not None, answered


def run_grid(backend: str = "userspace", pairs: Iterable[tuple[str, str]] | None = None,
             **kw: Any) -> Grid:
    """Measure every pair (default: all NAT kinds x all NAT kinds) in one lab."""
    pairs = list(pairs or grid_pairs())
    for ka, kb in pairs:  # a typo fails before the lab is built
        parse_nat_spec(ka), parse_nat_spec(kb)
    out = Grid()
    with Lab() as lab:
        mesh = MeshLab(lab, backend=backend)
        try:
            for i, (ka, kb) in enumerate(pairs):
                out.append(measure_pair(mesh, i, ka, kb, **kw))
        finally:
            mesh.close()
    return out
