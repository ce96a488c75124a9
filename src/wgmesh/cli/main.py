"""`wgmesh ...`: a thin layer over the public API.

Each command group lives next to its domain; this module only wires argparse,
prints tables or JSON, and turns expected failures into one clear line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from wgmesh.cli.output import run_command

__all__ = ["main"]


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Each domain adds its own command group; imported here so ``--help`` lists them all."""
    from wgmesh.cli import agent, netcheck, userspace
    from wgmesh.cli import control as control_cli
    from wgmesh.cli import file as file_cli
    from wgmesh.cli import lab as lab_cli
    from wgmesh.cli import lock as lock_cli
    from wgmesh.cli import relay as relay_cli

    def files(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        file_cli.add_parser(sub, resolve_peer=agent.resolve_peer)

    return [agent.add_parser, files, lab_cli.add_parser, control_cli.add_parser,
            relay_cli.add_parser, netcheck.add_parser, userspace.add_parser,
            lock_cli.add_parser]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="wgmesh", description="WireGuard meshes on the kernel module, Tailscale-style.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
