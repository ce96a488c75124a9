"""The asyncio transport under every relay connection, server side and client side.

Why ``asyncio.Protocol`` rather than streams or aiohttp: a relay moves tens of
thousands of small frames a second on one core. A protocol gets each TCP read
as one chunk and decodes every frame in it in a loop, with no ``await`` per
frame; output frames produced in one loop iteration go out in one ``write``.
Websocket framing (aiohttp) would add a mask/unmask pass and per-message
task switches for no gain, since the bytes are already end-to-end encrypted.

Output is bounded: while the kernel buffer is full (``pause_writing``) frames
wait in a queue capped in frames and in bytes that drops the *oldest* (fresh
packets matter more to WireGuard than stale ones), and a connection that
stays unwritable past ``write_timeout`` is aborted, so a slow reader costs
only itself, and at most ``queue_bytes`` of memory; a :class:`QueueBudget`
shared by a server's connections caps what all of them hold together.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from wgmesh.relay import FrameDecoder, FrameError

__all__ = ["MAX_PREAMBLE", "QUEUE_BYTES", "FrameStream", "QueueBudget"]

MAX_PREAMBLE = 8192  # bytes of HTTP head we accept before frames
WRITE_HIGH_WATER = 256 * 1024
QUEUE_BYTES = 1024 * 1024  # default cap of the backlog of a connection that is not read
log = logging.getLogger("wgmesh.relay")


class QueueBudget:
    """Bytes that the backlogs of many connections may hold together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class FrameStream(asyncio.Protocol):
    """A framed connection. Subclasses implement :meth:`on_preamble` and :meth:`on_frames`.

    The stream starts in *preamble* mode (HTTP head up to a blank line), then
    switches to frames. ``on_drop(reason, n)`` is called for every ``n`` frames dropped
    together and for every forced close (``n`` 1), so owners can count them.
    """

    def __init__(self, *, queue_frames: int = 256, queue_bytes: int = QUEUE_BYTES,
                 budget: QueueBudget | None = None, write_timeout: float = 5.0,
                 on_drop: Callable[[str, int], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0  # in the backlog
        self.queued_frames = 0
        self.budget = budget or QueueBudget(queue_bytes)
        self.write_timeout = write_timeout
        self.on_drop = on_drop or (lambda reason, n: None)
        self.closed = False
        self.last_rx = time.monotonic()
        self.created = self.last_rx
        self.paused = False
        self._preamble: bytearray | None = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._backlog: collections.deque[tuple[bytes, int]] = collections.deque()  # (frames, n)
        self._write_timer: asyncio.TimerHandle | None = None
        self._resumed: asyncio.Event | None = None
        self._held: set[FrameStream] = set()  # connections not read until we can write
        self._loop = asyncio.get_running_loop()

    # ---- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = time.monotonic()
        if self._preamble is not None:
            self._preamble += data
            end = self._preamble.find(b"\r\n\r\n")
            if end < 0:
                if len(self._preamble) > MAX_PREAMBLE:
                    self.abort("bad_http")
                return
            head, data = bytes(self._preamble[:end]), bytes(self._preamble[end + 4:])
            self._preamble = None
            if not self.on_preamble(head) or not data or self.closed:
                return
        try:
            self.on_bytes(data)
        except FrameError:
            self.abort("bad_frame")
        except Exception:  # a bug must cost one connection, never the process
            log.exception("relay connection failed on input")
            self.abort("internal_error")

    def pause_writing(self) -> None:
        self.paused = True
        self._write_timer = self._loop.call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        self.paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._backlog:
            self._out.extend(frames for frames, _ in self._backlog)
            self._release_backlog()
            self._schedule_flush()
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None
        self._release_held()

    def hold(self, upstream: FrameStream) -> None:
        """Stop reading ``upstream`` until this connection can take more: backpressure,
        for a link inside one relay (between its workers), where dropping would only
        waste the work already done on the frames."""
        if self.paused and upstream.transport is not None and upstream not in self._held:
            upstream.transport.pause_reading()
            self._held.add(upstream)

    def _release_held(self) -> None:
        held, self._held = self._held, set()
        for s in held:
            if not s.closed and s.transport is not None:
                s.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._out.clear()
        self._release_backlog()
        if self._resumed is not None:
            self._resumed.set()
        self._release_held()
        self.on_closed()

    # ---- hooks -----------------------------------------------------------------------
    def on_preamble(self, head: bytes) -> bool:
        """The HTTP head (without the blank line). Return True to continue with frames."""
        raise NotImplementedError

    def on_bytes(self, data: bytes) -> None:
        """Bytes after the preamble: decoded into frames for :meth:`on_frames` (a
        :class:`FrameError` closes the connection as ``bad_frame``)."""
        frames = self.decoder.feed(data)
        if frames:
            self.on_frames(frames)

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        raise NotImplementedError

    def on_closed(self) -> None:
        """The connection is gone (either side closed it)."""

    # ---- output ----------------------------------------------------------------------
    def write_raw(self, data: bytes) -> None:
        """Unframed bytes (the HTTP head), written at once."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_frame(self, frame: bytes) -> None:
        """Queue one encoded frame; batched with the others of this loop iteration."""
        if self.closed:
            return
        if self.paused:
            self._enqueue(frame)
            return
        self._out.append(frame)
        self._schedule_flush()

    def write_frames(self, frames: bytes, count: int) -> None:
        """``count`` encoded frames laid end to end (a run for one destination): one
        write, or while the socket is backed up one backlog entry, kept or dropped whole."""
        if self.closed:
            return
        if self.paused:
            self._enqueue(frames, count)
            return
        self._out.append(frames)
        self._schedule_flush()

    def _enqueue(self, frames: bytes, count: int = 1) -> None:
        """Backlog ``count`` frames, dropping our oldest to stay within our caps (in frames
        and bytes) and the budget."""
        backlog, budget, n = self._backlog, self.budget, len(frames)
        while backlog and (self.queued_frames + count > self.queue_frames
                           or self.queued_bytes + n > self.queue_bytes):
            self._drop_oldest("queue_full")
        while backlog and budget.used + n > budget.limit:
            self._drop_oldest("queue_budget")
        if budget.used + n > budget.limit:  # the others hold it all: these frames go
            self.on_drop("queue_budget", count)
            return
        backlog.append((frames, count))
        self.queued_bytes += n
        self.queued_frames += count
        budget.used += n

    def _drop_oldest(self, reason: str) -> None:
        frames, count = self._backlog.popleft()
        self.queued_bytes -= len(frames)
        self.queued_frames -= count
        self.budget.used -= len(frames)
        self.on_drop(reason, count)

    def _release_backlog(self) -> None:
        self._backlog.clear()
        self.budget.used -= self.queued_bytes
        self.queued_bytes = self.queued_frames = 0

    def skip_preamble(self) -> None:
        """Frames from the first byte: a connection another process already upgraded."""
        self._preamble = None

    def flush_output(self) -> bool:
        """Hand what is queued to the transport now; True if nothing is left unwritten
        (queued here, backlogged, or in the transport's buffer)."""
        self._flush()
        return not (self._out or self._backlog or self.paused or self.transport is None
                    or self.transport.get_write_buffer_size())

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            out, self._out = self._out, []
            self.transport.write(b"".join(out))

    async def drain(self) -> None:
        """Wait until the connection can take more (for senders that want backpressure)."""
        while self.paused and not self.closed:
            if self._resumed is None:
                self._resumed = asyncio.Event()
            await self._resumed.wait()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.abort("write_timeout")

    def close(self) -> None:
        """Flush what is queued, then close."""
        if self.closed or self.transport is None:
            return
        self._flush()
        self.closed = True
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection now, counting ``reason``."""
        if self.closed:
            return
        self.on_drop(reason, 1)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
