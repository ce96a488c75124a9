"""What a person sees from a command: aligned tables, and failures as one line;
and the ``--socket`` option every command that talks to the node agent shares."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any

from wgmesh.display import text_table
from wgmesh.errors import WgmeshError

__all__ = ["print_table", "run_command", "socket_option"]


def socket_option(p: argparse.ArgumentParser, help_: str | None = None) -> None:
    """``--socket``: the agent's local API socket; ``$WGMESH_SOCKET``, else the default."""
    from wgmesh.node.localapi import DEFAULT_SOCKET

    default = os.environ.get("WGMESH_SOCKET") or DEFAULT_SOCKET
    p.add_argument("--socket", default=default,
                   help=help_ or f"the agent's local API socket (env WGMESH_SOCKET; "
                                 f"default {DEFAULT_SOCKET})")


def print_table(rows: Iterable[dict[str, Any]], columns: Iterable[str]) -> None:
    """Aligned, human-readable table."""
    print(text_table(list(rows), list(columns)))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``) and return its exit code.

    An expected failure (:class:`~wgmesh.errors.WgmeshError`, or an
    :class:`OSError` such as a missing file) is one line on stderr and exit 1,
    unless ``WGMESH_DEBUG`` asks for the traceback; Ctrl-C is exit 130.
    Anything else is a bug and keeps its traceback.
    """
    try:
        rc = args.func(args)
    except (WgmeshError, OSError) as e:
        if os.environ.get("WGMESH_DEBUG"):
            raise
        print(f"wgmesh: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wgmesh: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
