"""An asyncio loop on a background thread, so sync code and Jupyter can drive async code.

Jupyter already runs a loop on the main thread, so ``asyncio.run`` fails there;
running our own loop on a private thread works the same everywhere, and
``call`` is safe from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["LoopThread"]


class LoopThread:
    def __init__(self, name: str = "wgmesh-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Drain what is left so nothing is reported as "never awaited".
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from this (other) thread."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.call from its own loop would deadlock; await instead")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"timed out after {timeout}s") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def start_with(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """:meth:`call` that stops the thread if ``coro`` fails: start a service on this loop.

        A service that failed to start leaves no loop thread behind.
        """
        try:
            return self.call(coro, timeout)
        except BaseException:
            self.stop()
            raise

    def stop_with(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """:meth:`call`, then stop the thread whatever happened: stop a service on this loop."""
        try:
            return self.call(coro, timeout)
        finally:
            self.stop()
