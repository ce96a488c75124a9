"""The node's netmap cache is written off its loop, newest first (node/state.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from wgmesh.node.state import LatestSaver

pytestmark = pytest.mark.unit


def test_saves_run_off_the_loop_and_a_superseded_netmap_is_skipped() -> None:
    """While netmap 1 is being written (the write blocks until the loop lets it go, which
    it can only do if the write is not on the loop), netmaps 2 and 3 come in: 3 is written
    next, 2 never; ``flush`` returns once 3 is on disk."""
    started, release = threading.Event(), threading.Event()
    saved: list[int] = []

    def save(n: int) -> None:
        if n == 1:
            started.set()
            assert release.wait(10), "the loop never got to release the first write"
        saved.append(n)

    async def run() -> None:
        saver = LatestSaver(save)
        saver.submit(1)
        # the first write is under way, blocked (waited for off the loop, which must stay free)
        assert await asyncio.to_thread(started.wait, 10), "the first write never started"
        saver.submit(2)
        saver.submit(3)
        release.set()
        await asyncio.wait_for(saver.flush(), 10)

    asyncio.run(run())
    assert saved == [1, 3]


def test_a_failed_save_is_logged_and_the_next_one_still_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    saved: list[int] = []

    def save(n: int) -> None:
        if n == 1:
            raise OSError(28, "No space left on device")
        saved.append(n)

    async def run() -> None:
        saver = LatestSaver(save, "netmap cache")
        saver.submit(1)
        await saver.flush()
        saver.submit(2)
        await saver.flush()

    asyncio.run(run())
    assert saved == [2]
    assert "saving the netmap cache failed: [Errno 28] No space left on device" in caplog.text
    assert "Traceback" not in caplog.text
