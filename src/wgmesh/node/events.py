"""Node events: callbacks (``node.on(name, cb)``) or iteration, sync or async.

Callbacks run on the node's loop thread and must not block; a failing callback
is logged and never breaks the node.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs

log = logging.getLogger(__name__)

__all__ = ["EVENT_NAMES", "Event", "EventBus"]

EVENT_NAMES = ("peer_added", "peer_removed", "peer_path_changed", "netmap", "state",
               "key_expiring", "pin_failed", "lock_updated", "lock_rejected",
               "control_rejected")


@attrs.frozen
class Event:
    name: str
    data: dict[str, Any]
    at: float


class EventBus:
    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[Event], None]]] = defaultdict(list)
        self._sync_queues: list[queue.SimpleQueue[Event]] = []
        self._async_queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = []
        self._lock = threading.Lock()

    def on(self, name: str, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe; returns a function that unsubscribes."""
        if name not in EVENT_NAMES and name != "*":
            raise ValueError(f"unknown event {name!r}; one of {', '.join(EVENT_NAMES)} or '*'")
        with self._lock:
            self._callbacks[name].append(callback)
        return lambda: self._callbacks[name].remove(callback)

    def emit(self, event: Event) -> None:
        with self._lock:
            cbs = [*self._callbacks.get(event.name, ()), *self._callbacks.get("*", ())]
            sync_qs = list(self._sync_queues)
            async_qs = list(self._async_queues)
        for cb in cbs:
            try:
                cb(event)
            except Exception:
                log.exception("event callback for %s failed", event.name)
        for q in sync_qs:
            q.put(event)
        for loop, aq in async_qs:
            loop.call_soon_threadsafe(aq.put_nowait, event)

    def iter(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator of events from now on; stops after ``timeout`` s of silence."""
        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._lock:
            self._sync_queues.append(q)
        try:
            while True:
                try:
                    yield q.get(timeout=timeout)
                except queue.Empty:
                    return
        finally:
            with self._lock:
                self._sync_queues.remove(q)

    async def aiter(self) -> AsyncIterator[Event]:
        aq: asyncio.Queue[Event] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), aq)
        with self._lock:
            self._async_queues.append(entry)
        try:
            while True:
                yield await aq.get()
        finally:
            with self._lock:
                self._async_queues.remove(entry)
