"""The data plane reads WireGuard stats off its loop (issue 14, Load: a node with 500 peers).

A kernel dump of 500 peers is about 0.1 s of netlink decoding on this host and seconds
under the VM's emulation. Read on the loop, it held back the disco pongs that came in
meanwhile: their RTTs grew at random, traversal switched between a peer's equally good
paths, and kernel WireGuard re-adds the peer on each switch, so its session and counters
started over (docs/reliability.md). The host has no kernel WireGuard, so a backend whose
``stats()`` blocks until it is released stands in for the slow dump; the data plane,
traversal and the UDP port are the real ones."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.traversal import PlainPort
from wgmesh.node.dataplane import DataPlane
from wgmesh.relaynet.client import RelayClient
from wgmesh.traversal import Traversal, TraversalConfig

pytestmark = pytest.mark.unit

#: How long the slow read waits to be released before giving up (the test's failure bound).
RELEASE_WAIT_S = 10.0


class SlowStats:
    """A backend whose stats read takes until the test releases it (or the bound passes)."""

    kind = "slow"

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.released: list[bool] = []

    def stats(self) -> dict[Key, Any]:
        self.reading.set()
        self.released.append(self.release.wait(RELEASE_WAIT_S))
        self.done.set()
        return {}


def test_the_loop_keeps_running_while_the_stats_are_read() -> None:
    async def run() -> list[bool]:
        backend = SlowStats()
        node = PrivateKey.generate()
        trav = Traversal(PrivateKey.generate(), node.public, TraversalConfig(),
                         wall=time.time, random_bytes=os.urandom)
        dp = DataPlane(backend, PlainPort(asyncio.get_running_loop(), 0),  # type: ignore[arg-type]
                       RelayClient(node, []), trav)
        dp.start()
        try:
            await asyncio.to_thread(backend.reading.wait, RELEASE_WAIT_S)
            # This line runs on the loop: it can release the read only if the read is not
            # holding the loop (else the read times out first and records False).
            backend.release.set()
            await asyncio.to_thread(backend.done.wait, RELEASE_WAIT_S)
        finally:
            await dp.close()
        return backend.released

    assert asyncio.run(run())[0] is True, "the stats read held the node's loop"
