"""The relay's memory stays bounded under abuse (issue 14 item 1), on loopback with real
connections to a real ``wgmesh relay serve`` process (so its RSS is its own).

Abusers from one source open connections past the per-source cap, from more sources
past the total cap, register thousands of destinations, and stop reading while others
send them 64 KiB packets. The caps refuse and drop (counted by reason), an honest pair
keeps exchanging frames, and once the abusers leave the relay holds nothing of theirs.
RSS bounds are generous; the figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from relayproc import bound_to, metrics_from, relay_process

from wgmesh.keys import Key, PrivateKey
from wgmesh.relaynet.connection import RelayConnectError, RelayConnection

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
PER_SOURCE, TOTAL = 8, 24
QUEUE_BYTES = 1 * MiB  # the server's default cap per connection (relaynet.stream)
HONEST, METRICS = "127.0.0.5", "127.0.0.9"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    return await asyncio.to_thread(wait_for, pred, timeout, what or str(pred), 0.05)


async def honest_exchange(a: RelayConnection, b: Key, got: list[bytes], n: int) -> float:
    """``n`` 1200-byte frames a -> b, all of them delivered in order; returns frames/s."""
    got.clear()
    start = time.monotonic()
    for i in range(n):
        a.send(b, i.to_bytes(4, "big") + bytes(1196))
        if i % 64 == 0:
            await a.drain()
    await until(lambda: len(got) == n, 60, "the honest pair's frames")
    assert [int.from_bytes(d[:4], "big") for d in got] == list(range(n))
    return n / (time.monotonic() - start)


def test_abusers_are_capped_and_leave_nothing_behind(tmp_path: Path) -> None:
    with relay_process(tmp_path, "--max-per-source", str(PER_SOURCE),
                       "--max-connections", str(TOTAL)) as (pid, port):
        asyncio.run(asyncio.wait_for(abuse(pid, port), 240))


async def abuse(pid: int, port: int) -> None:
    url = f"http://127.0.0.1:{port}"

    def metrics() -> dict[str, Any]:
        """From a source of its own (127.0.0.1 is at its cap)."""
        return metrics_from(port, METRICS)

    def metrics_when_admitted() -> dict[str, Any] | None:
        try:
            return metrics()
        except OSError:  # refused while the relay is at its connection cap
            return None

    keys: dict[RelayConnection, Key] = {}

    async def connect(ip: str, **kw: Any) -> RelayConnection:
        key = PrivateKey.generate()
        conn = await RelayConnection.open(url, key, make_socket=bound_to(ip), **kw)
        keys[conn] = key.public
        return conn

    got: list[bytes] = []
    a = await connect(HONEST, queue_frames=100_000)
    b = await connect(HONEST, on_recv=lambda s, d: got.append(d))
    base_rate = await honest_exchange(a, keys[b], got, 3000)
    rss_before = rss(pid)

    # per source: PER_SOURCE connections from 127.0.0.1, the next one refused
    abusers = [await connect("127.0.0.1", queue_frames=100_000) for _ in range(PER_SOURCE)]
    with pytest.raises(RelayConnectError):
        await connect("127.0.0.1")
    # in total: two more sources fill the relay to TOTAL; the rest is refused
    abusers += [await connect("127.0.0.2") for _ in range(PER_SOURCE)]
    extra: list[RelayConnection] = []
    for _ in range(PER_SOURCE):
        with contextlib.suppress(RelayConnectError):
            extra.append(await connect("127.0.0.3"))
    assert len(extra) == TOTAL - 2 - 2 * PER_SOURCE
    for c in extra:  # make room for the /metrics requests below
        c.close()
    m = await until(lambda: (d := metrics_when_admitted()) and d["connections"] < TOTAL and d,
                    what="room for /metrics")
    assert m["drops"]["too_many_from_source"] == 1
    # (and any /metrics request that came while the relay was full)
    assert m["drops"]["too_many_connections"] >= PER_SOURCE - len(extra)

    # half of them stop reading; the other half register thousands of destinations and
    # send the stalled ones 64 KiB packets
    senders, stalled = abusers[:PER_SOURCE // 2], abusers[PER_SOURCE // 2:PER_SOURCE]
    for c in stalled:
        assert c.transport is not None
        c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                        4096)
        c.transport.pause_reading()
    for c in senders:
        for _ in range(3000):
            c.send(PrivateKey.generate().public, b"?")
        await c.drain()

    async def blast() -> None:
        for _ in range(100):
            for s in senders:
                for t in stalled:
                    s.send(keys[t], bytes(64 * 1024 - 100))
                await s.drain()

    samples: list[dict[str, Any]] = []

    def sample() -> int:
        samples.append(metrics())
        return int(samples[-1]["drops"].get("queue_full", 0))

    await blast()
    await until(sample, what="queue_full drops at the stalled readers")
    rss_during = rss(pid)
    # the honest pair while every abuser is still connected and the stalled queues are full
    rate_during = await honest_exchange(a, keys[b], got, 3000)
    m = metrics()
    assert m["clients"] == 2 + len(abusers), "abusers cut off before the honest exchange"
    queued = max(s["queued_bytes"] for s in samples)
    assert queued <= len(stalled) * QUEUE_BYTES, queued
    # a connection remembers at most max_destinations (1024) keys it sent to; the stalled
    # ones heard from the senders, the honest pair from each other
    assert m["destinations"] <= len(senders) * 1024 + len(stalled) * len(senders) + 2, m

    for c in abusers:
        c.close()
    m = await until(lambda: (d := metrics())["clients"] == 2 and d["connections"] == 3 and d,
                    what="the abusers gone")
    assert m["sources"] == 2  # HONEST, and this /metrics request from METRICS
    assert m["pending_connections"] == 1 and m["queued_bytes"] == 0
    assert m["destinations"] == 2  # a sent to b, b heard from a
    rate_after = await honest_exchange(a, keys[b], got, 3000)
    rss_after = rss(pid)
    figures = {"rss_before_mib": rss_before / MiB, "rss_during_mib": rss_during / MiB,
               "rss_after_mib": rss_after / MiB, "queued_bytes_max": queued,
               "honest_frames_per_s": {"before": base_rate, "during": rate_during,
                                        "after": rate_after},
               "drops": m["drops"]}
    print("relay abuse figures", json.dumps(figures, default=round))
    assert rss_during - rss_before < 64 * MiB  # was ~100 MiB for a handful of connections
    assert rss_after - rss_before < 32 * MiB
    assert rate_during > base_rate / 10  # honest traffic keeps flowing meanwhile
    a.close()
    b.close()


# ---- Load: 1,000 clients, some of them slow readers ---------------------------------------
CROWD, SLOW, SAMPLE = 1000, 50, 100
CROWD_SOURCE, FLOOD_SOURCE = "127.0.1.1", "127.0.1.2"


def test_a_thousand_clients_with_slow_readers_keep_the_others_served(tmp_path: Path) -> None:
    """Issue 14, Load: the relay with 1,000 connected clients, 50 of them slow readers (25
    never read, 25 read 10 ms in 200) being flooded with 64 KiB packets. The others keep
    their throughput: an honest pair's rate stays above a quarter of its rate before the
    flood (generous: ``benchmarks/relay_slow_readers.py`` has the figure), and 100 idle
    clients each get the packet sent to them meanwhile. The backlogs stay within their
    caps and no normal reader is cut."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * CROWD:  # the crowd's sockets, here
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * CROWD), hard))
    try:
        with relay_process(tmp_path) as (_pid, port):
            asyncio.run(asyncio.wait_for(crowd_with_slow_readers(port), 300))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def crowd_with_slow_readers(port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    heard: dict[int, int] = {}

    async def connect(ip: str, i: int = -1, **kw: Any) -> tuple[RelayConnection, Key]:
        key = PrivateKey.generate()
        conn = await RelayConnection.open(
            url, key, make_socket=bound_to(ip), idle_timeout=3600.0,
            on_recv=lambda _s, _d: heard.__setitem__(i, heard.get(i, 0) + 1), **kw)
        return conn, key.public

    crowd = [await connect(CROWD_SOURCE, i) for i in range(CROWD)]
    slow, normal = crowd[:SLOW], crowd[SLOW:]
    for c, _ in slow:
        assert c.transport is not None
        c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                        4096)
        c.transport.pause_reading()
    got: list[bytes] = []
    a, _ = await connect(HONEST, queue_frames=100_000)
    b, b_key = await connect(HONEST)
    b.on_recv = lambda _s, d: got.append(d)
    base_rate = await honest_exchange(a, b_key, got, 3000)

    flooders = [(await connect(FLOOD_SOURCE, queue_frames=100_000))[0] for _ in range(2)]
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            for f in flooders:
                for _, k in slow:
                    f.send(k, bytes(64 * 1024 - 100))
                await f.drain()
            await asyncio.sleep(0.01)

    async def trickle() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.19)
            for c, _ in slow[SLOW // 2:]:
                if c.transport is not None:
                    c.transport.resume_reading()
            await asyncio.sleep(0.01)
            for c, _ in slow[SLOW // 2:]:
                if c.transport is not None:
                    c.transport.pause_reading()

    tasks = [asyncio.create_task(flood()), asyncio.create_task(trickle())]
    try:
        await until(lambda: metrics_from(port, METRICS)["drops"].get("queue_full", 0) > 0,
                    what="the slow readers' backlogs full")
        rate_during = await honest_exchange(a, b_key, got, 3000)
        sample = range(SLOW, SLOW + SAMPLE)
        before = {i: heard.get(i, 0) for i in sample}
        for i in sample:
            flooders[0].send(crowd[i][1], b"for an idle client")
        await flooders[0].drain()
        await until(lambda: all(heard.get(i, 0) > before[i] for i in sample), 30,
                    "every sampled idle client served")
        m = metrics_from(port, METRICS)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    print("relay slow readers", json.dumps({"before": base_rate, "during": rate_during,
                                            "drops": m["drops"]}, default=round))
    assert rate_during > base_rate / 4, (rate_during, base_rate)
    assert m["queued_bytes"] <= SLOW * QUEUE_BYTES, m["queued_bytes"]
    assert not any(c.closed for c, _ in normal), "a normal reader was cut"
    assert m["clients"] >= len(normal) + 2 + len(flooders), m["clients"]
    for c, _ in [*crowd, *((f, None) for f in flooders), (a, None), (b, None)]:
        c.close()
