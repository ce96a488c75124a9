"""The ``wgmesh`` command: argparse parsers and table/JSON printers, nothing else.

No other package imports this one.
"""

from wgmesh.cli.main import main

__all__ = ["main"]
