"""The one base class for expected failures.

The CLI prints these as a single line with a non-zero exit; anything else is a bug
and keeps its traceback.
"""

__all__ = ["WgmeshError"]


class WgmeshError(Exception):
    """An expected failure with a message meant for a person."""
