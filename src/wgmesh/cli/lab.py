"""``wgmesh demo`` and ``wgmesh lab check|grid|clean``: the commands that build labs.

The labs themselves live in :mod:`wgmesh.lab`, imported only when a command
runs, so ``wgmesh --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json

from wgmesh.cli.output import print_table
from wgmesh.errors import WgmeshError

__all__ = ["add_parser"]


def _demo(a: argparse.Namespace) -> int:
    from wgmesh.lab.demo import run_demo

    summary = run_demo(quiet=a.json, backend=a.backend)
    if a.json:
        print(json.dumps(summary))
    ok = all(p["rtt_ms"] is not None for p in summary["peers"]) and summary["file"]["sha256_ok"]
    return 0 if ok else 1


def _lab_check(a: argparse.Namespace) -> int:
    from wgmesh.lab.natprobe import check_kinds

    results = check_kinds(tuple(a.kinds) if a.kinds else None, hairpin=a.hairpin)
    if a.json:
        print(json.dumps(results))
    else:
        rows = [{**r, "portmap": ",".join(r["portmap"]) or "-"} for r in results]
        print_table(rows, ["kind", "udp_ok", "mapping", "filtering", "external",
                           "external_2", "port_preserving", "hairpin", "tcp_ok", "portmap"])
    return 0


def _lab_grid(a: argparse.Namespace) -> int:
    from wgmesh.lab.grid import run_grid

    if a.backend == "kernel":
        from wgmesh.wireguard.backend import kernel_wireguard_available

        ok, why = kernel_wireguard_available()
        if not ok:
            raise WgmeshError(f"--backend kernel: {why}; run it in the VM (see README)")
    pairs = [tuple(p.split(":", 1)) for p in a.pairs] if a.pairs else None
    grid = run_grid(a.backend, pairs)
    if a.json:
        print(json.dumps([r.to_json() for r in grid]))
    else:
        print(grid)
    return 0


def _lab_clean(a: argparse.Namespace) -> int:
    from wgmesh.lab.network import clean_leftovers

    removed = clean_leftovers(all_labs=a.all)
    for ns in removed:
        print(f"removed {ns}")
    print(f"{len(removed)} namespace(s) removed")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo`` and ``lab``."""
    d = sub.add_parser("demo", help="a whole mesh in a lab on this machine (about a minute)")
    d.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    d.add_argument("--backend", default="userspace", choices=["userspace", "kernel"])
    d.set_defaults(func=_demo)

    lab = sub.add_parser("lab", help="network-namespace lab: NAT checks, clean-up")
    ls = lab.add_subparsers(dest="lab_cmd", required=True)
    c = ls.add_parser("check", help="measure each NAT kind's mapping and filtering")
    c.add_argument("--json", action="store_true", help="one JSON list, an object per kind")
    c.add_argument("--hairpin", action="store_true", help="build the NATs with hairpinning")
    c.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="only these, e.g. symmetric eim+upnp (default: every plain kind); "
                        "a port-mapping router is eim or symmetric + upnp, natpmp or pcp")
    c.set_defaults(func=_lab_check)
    g = ls.add_parser("grid", help="connectivity grid: node pairs behind every pair of NATs")
    g.add_argument("--backend", default="userspace", choices=["userspace", "kernel"],
                   help="kernel needs the WireGuard module (run it in the VM tier)")
    g.add_argument("--pairs", nargs="*", metavar="A:B",
                   help="only these pairs, e.g. eim:eim symmetric+pcp:symmetric")
    g.add_argument("--json", action="store_true", help="a JSON list, one object per pair")
    g.set_defaults(func=_lab_grid)
    cl = ls.add_parser("clean", help="remove namespaces left by crashed labs")
    cl.add_argument("--all", action="store_true", help="also labs whose owner still runs")
    cl.set_defaults(func=_lab_clean)
