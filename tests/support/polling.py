"""Polling with a deadline: the one way tests here wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 30.0,
             what: str | Callable[[], str] = "condition", interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy (returned); fail after ``timeout`` s.

    ``what`` names the awaited thing in the failure; a callable is asked only then, so the
    message can carry what a process printed up to the timeout. ``cond`` may itself
    assert (e.g. that a process has not exited) to fail before the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            desc = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {desc}")
        time.sleep(interval)
