"""`wgmesh ...`: a thin layer over the public API.

Each command group lives next to its domain; this module only wires argparse,
prints tables or JSON, and turns expected failures into one clear line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from wgmesh.errors import WgmeshError

__all__ = ["main", "print_table"]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Aligned, human-readable table."""
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _lab_check(a: argparse.Namespace) -> int:
    from wgmesh.natprobe import check_kinds

    results = check_kinds(hairpin=a.hairpin)
    if a.json:
        print(json.dumps(results))
    else:
        print_table(results, ["kind", "udp_ok", "mapping", "filtering", "external",
                              "external_2", "port_preserving", "hairpin", "tcp_ok"])
    return 0


def _lab_clean(a: argparse.Namespace) -> int:
    from wgmesh.lab import clean_leftovers

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
    cl = ls.add_parser("clean", help="remove namespaces left by crashed labs")
    cl.add_argument("--all", action="store_true", help="also labs whose owner still runs")
    cl.set_defaults(func=_lab_clean)


REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_lab,
    __import__("wgmesh.wireguard.daemon", fromlist=["add_parser"]).add_parser,
    __import__("wgmesh.relay_server", fromlist=["add_parser"]).add_parser,
    __import__("wgmesh.control.cli", fromlist=["add_parser"]).add_parser,
    __import__("wgmesh.netcheck", fromlist=["add_parser"]).add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="wgmesh", description="WireGuard meshes on the kernel module, Tailscale-style.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except WgmeshError as e:
        print(f"wgmesh: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wgmesh: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
