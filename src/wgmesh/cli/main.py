"""`wgmesh ...`: a thin layer over the public API.

Each command group lives next to its domain; this module only wires argparse,
prints tables or JSON, and turns expected failures into one clear line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from wgmesh.display import text_table
from wgmesh.errors import WgmeshError

__all__ = ["main", "print_table"]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Aligned, human-readable table."""
    print(text_table(list(rows), list(columns)))


def _lab_check(a: argparse.Namespace) -> int:
    from wgmesh.lab.natprobe import check_kinds

    results = check_kinds(hairpin=a.hairpin)
    if a.json:
        print(json.dumps(results))
    else:
        print_table(results, ["kind", "udp_ok", "mapping", "filtering", "external",
                              "external_2", "port_preserving", "hairpin", "tcp_ok"])
    return 0


def _lab_grid(a: argparse.Namespace) -> int:
    from wgmesh.lab.grid import run_grid

    if a.backend == "kernel":
        from wgmesh.wireguard.backend import kernel_wireguard_available

        ok, why = kernel_wireguard_available()
        if not ok:
            raise WgmeshError(f"--backend kernel: {why}; run it in the VM (see README)")
    pairs = [tuple(p.split(":", 1)) for p in a.pairs] if a.pairs else None
    grid = run_grid(a.backend, pairs)  # type: ignore[arg-type]
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


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="network-namespace lab: NAT checks, clean-up")
    ls = lab.add_subparsers(dest="lab_cmd", required=True)
    c = ls.add_parser("check", help="measure each NAT kind's mapping and filtering")
    c.add_argument("--json", action="store_true", help="one JSON list, an object per kind")
    c.add_argument("--hairpin", action="store_true", help="build the NATs with hairpinning")
    c.set_defaults(func=_lab_check)
    g = ls.add_parser("grid", help="connectivity grid: node pairs behind every pair of NATs")
    g.add_argument("--backend", default="userspace", choices=["userspace", "kernel"],
                   help="kernel needs the WireGuard module (run it in the VM tier)")
    g.add_argument("--pairs", nargs="*", metavar="A:B", help="only these pairs, e.g. eim:eim")
    g.add_argument("--json", action="store_true", help="a JSON list, one object per pair")
    g.set_defaults(func=_lab_grid)
    cl = ls.add_parser("clean", help="remove namespaces left by crashed labs")
    cl.add_argument("--all", action="store_true", help="also labs whose owner still runs")
    cl.set_defaults(func=_lab_clean)


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Each domain adds its own command group; imported here so ``--help`` lists them all."""
    from wgmesh.cli import control as control_cli
    from wgmesh.drop import peerapi as drop
    from wgmesh.lab import demo
    from wgmesh.node import agent, netcheck
    from wgmesh.relaynet import server as relay_server
    from wgmesh.wireguard import daemon

    def files(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        drop.add_parser(sub, resolve_peer=agent.resolve_peer)

    return [agent.add_parser, files, demo.add_parser, _add_lab, control_cli.add_parser,
            relay_server.add_parser, netcheck.add_parser, daemon.add_parser]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="wgmesh", description="WireGuard meshes on the kernel module, Tailscale-style.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except WgmeshError as e:
        if os.environ.get("WGMESH_DEBUG"):
            raise
        print(f"wgmesh: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wgmesh: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
