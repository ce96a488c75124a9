"""What a person sees from a command: aligned tables, and failures as one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any

from wgmesh.display import text_table
from wgmesh.errors import WgmeshError

__all__ = ["print_table", "run_command"]


def print_table(rows: Iterable[dict[str, Any]], columns: Iterable[str]) -> None:
    """Aligned, human-readable table."""
    print(text_table(list(rows), list(columns)))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``) and return its exit code.

    An expected failure (:class:`~wgmesh.errors.WgmeshError`) is one line on
    stderr and exit 1, unless ``WGMESH_DEBUG`` asks for the traceback; Ctrl-C
    is exit 130. Anything else is a bug and keeps its traceback.
    """
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
