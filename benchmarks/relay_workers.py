"""Relay workers: the same relay load through ``--workers 1`` and ``--workers 2``.

One invocation (root, one lab host) runs, for each of ``--rounds`` ABBA rounds, a fresh
``wgmesh relay serve --workers 1`` and a fresh ``--workers 2`` on the host's address,
and the same load through each: ``--pairs`` source/sink pairs of relay clients, the
sources spread over ``--procs`` processes and the sinks over as many others, every
source pumping ``--packet``-byte packets to its sink as fast as the relay takes them.
``ratio`` is the median over rounds of (2 workers / 1 worker) packets delivered per
second, counted at the sinks over the same ``--seconds`` window of each run.

The load generators are built not to be the bottleneck: a source writes one pre-built
~64 KiB blob of SEND frames per call (no per-packet Python), a sink only adds up the
byte counts of what it reads after the handshake (no decoding), and both are spread
over processes. To show it, the JSON gives the CPU each side used during the window
(``*_cores``: CPU seconds per second, from /proc): the relay's workers near one core
each, the clients well below what the machine has left.

Prints one JSON line. Usage: ``sudo .venv/bin/python benchmarks/relay_workers.py
[--rounds 4] [--seconds 4] [--pairs 8] [--procs 2] [--packet 1400]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

from _bench import Report, machine_busy_s, proc_cpu_user_sys, round_ratios, run_abba
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import HEADER_LEN, KEY_LEN, frame_send
from wgmesh.relaynet.connection import RelayConnection

if TYPE_CHECKING:
    from wgmesh.lab.network import Host, Lab

PORT = 3340
BLOB = 64 * 1024  # bytes of SEND frames per write
SETUP = 4.0  # seconds from the orchestrator's start signal to the counted window


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


# ---- roles (run inside the lab host) -------------------------------------------------------
class CountingSink(RelayConnection):
    """A relay client that, once connected, only adds up how many bytes it reads inside
    the window: the cheapest sink there is."""

    window = (0.0, 0.0)
    counted = 0

    def on_bytes(self, data: bytes) -> None:
        if not self._ready.done():
            super().on_bytes(data)
            return
        if self.window[0] <= time.monotonic() < self.window[1]:
            CountingSink.counted += len(data)


async def sink(url: str, n: int, start: float, seconds: float) -> None:
    CountingSink.window = (start, start + seconds)
    keys = [PrivateKey.generate() for _ in range(n)]
    conns = [await CountingSink.open(url, k) for k in keys]
    emit(ready=True, keys=[k.public.b64() for k in keys])
    await asyncio.sleep(max(0.0, start + seconds + 0.3 - time.monotonic()))
    emit(bytes=CountingSink.counted)
    for c in conns:
        c.close()


async def source(url: str, dsts: list[str], packet: int, end: float) -> None:
    """One connection per destination, each writing the same pre-built blob of SEND
    frames while its socket takes them."""
    conns = [await RelayConnection.open(url, PrivateKey.generate()) for _ in dsts]
    sent = 0

    async def pump(conn: RelayConnection, dst: Key) -> None:
        nonlocal sent
        frame = frame_send(dst, bytes(packet))
        blob = frame * max(1, BLOB // len(frame))
        assert conn.transport is not None
        while time.monotonic() < end and not conn.closed:
            conn.transport.write(blob)
            sent += len(blob)
            await conn.drain()  # waits while the socket is backed up
            await asyncio.sleep(0)

    await asyncio.gather(*(pump(c, Key(d)) for c, d in zip(conns, dsts, strict=True)))
    emit(sent_bytes=sent)
    for c in conns:
        c.close()


def role(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["sink", "source"])
    ap.add_argument("url")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--dsts", default="")
    ap.add_argument("--packet", type=int, default=1400)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    if a.role == "sink":
        asyncio.run(sink(a.url, a.n, a.start, a.seconds))
    else:
        asyncio.run(source(a.url, a.dsts.split(","), a.packet, a.start + a.seconds))


# ---- orchestration -------------------------------------------------------------------------
def _cpu(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids`` together."""
    user = sys_ = 0.0
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone: not counted
            u, s = proc_cpu_user_sys(p)
            user, sys_ = user + u, sys_ + s
    return user, sys_


def _cores(before: tuple[float, float], after: tuple[float, float], seconds: float,
           side: str) -> dict[str, float]:
    """CPU seconds per second of one side in the window: in all, in user and in system."""
    user, sys_ = ((b - a) / seconds for a, b in zip(before, after, strict=True))
    return {f"{side}_cores": user + sys_, f"{side}_user": user, f"{side}_sys": sys_}


def one_run(lab: Lab, host: Host, workers: int, a: argparse.Namespace) -> dict[str, Any]:
    """A fresh relay of ``workers`` and the load through it: the sinks' packets/s in the
    window and the CPU each side used in it."""
    me = __file__
    relay = lab.python(host, "-m", "wgmesh", "relay", "serve", "--workers", str(workers),
                       "--listen", f"{host.ip}:{PORT}", "--stun-port", "-1",
                       "--key-file", f"/tmp/{lab.prefix}-relay.key")
    try:
        line = json.loads(relay.wait_for_output('"listening"', timeout=30).splitlines()[0])
        relay_pids = [relay.pid, *line.get("pids", [])]
        url = f"http://{host.ip}:{PORT}"
        start = time.monotonic() + SETUP
        window = ["--start", str(start), "--seconds", str(a.seconds)]
        per = [a.pairs // a.procs + (i < a.pairs % a.procs) for i in range(a.procs)]
        sinks = [lab.python(host, me, "sink", url, "--n", str(n), *window) for n in per]
        keys = [json.loads(s.wait_for_output('"ready"', timeout=30).splitlines()[0])["keys"]
                for s in sinks]
        sources = [lab.python(host, me, "source", url, "--dsts", ",".join(k),
                              "--packet", str(a.packet), *window) for k in keys]
        clients = [p.pid for p in (*sinks, *sources)]
        if time.monotonic() > start:
            raise RuntimeError(f"setup took longer than {SETUP} s: raise SETUP")
        time.sleep(start - time.monotonic())
        cpu0 = _cpu(relay_pids), _cpu(clients), machine_busy_s()
        time.sleep(a.seconds)
        cpu1 = _cpu(relay_pids), _cpu(clients), machine_busy_s()
        for p in sinks:
            p.wait(30)
        for p in sources:
            p.wait(30)
        got = sum(json.loads(p.stdout.strip().splitlines()[-1])["bytes"] for p in sinks)
        m = json.loads(lab.run(host, [sys.executable, "-c", (
            "import urllib.request;"
            f"print(urllib.request.urlopen('{url}/metrics').read().decode())")]).stdout)
    finally:
        relay.stop()
    frame = HEADER_LEN + KEY_LEN + a.packet
    return {"pps": got / frame / a.seconds, "mbps": got / frame * a.packet * 8 / a.seconds / 1e6,
            **_cores(cpu0[0], cpu1[0], a.seconds, "relay"),
            **_cores(cpu0[1], cpu1[1], a.seconds, "client"),
            "machine_cores": (cpu1[2] - cpu0[2]) / a.seconds,
            "relay_counters": {k: v for k, v in m["counters"].items() if k.startswith("packets")},
            "relay_drops": m["drops"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--procs", type=int, default=2, help="processes of sources (and of sinks)")
    ap.add_argument("--packet", type=int, default=1400)
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    with Lab() as lab:
        host = lab.add_public_host("relay")
        one, two = run_abba(a.rounds, lambda: one_run(lab, host, 1, a),
                            lambda: one_run(lab, host, 2, a))

    def col(runs: list[dict[str, Any]], key: str, digits: int = 2) -> list[float]:
        return [round(r[key], digits) for r in runs]

    report.emit({
        "bench": "relay_workers", "rounds": a.rounds, "seconds": a.seconds, "pairs": a.pairs,
        "client_procs": 2 * a.procs, "packet_bytes": a.packet,
        "reference": "the same load through the same relay with --workers 1, ABBA",
        **round_ratios(col(two, "pps"), col(one, "pps")),
        "pps_1": round(statistics.median(col(one, "pps"))),
        "pps_2": round(statistics.median(col(two, "pps"))),
        "mbps_1": round(statistics.median(col(one, "mbps")), 1),
        "mbps_2": round(statistics.median(col(two, "mbps")), 1),
        "pps_1_runs": col(one, "pps", 0), "pps_2_runs": col(two, "pps", 0),
        "relay_cores_1": col(one, "relay_cores"), "relay_cores_2": col(two, "relay_cores"),
        "client_cores_1": col(one, "client_cores"), "client_cores_2": col(two, "client_cores"),
        **{f"{k}_{n}": col(runs, k) for k in ("relay_sys", "client_sys", "machine_cores")
           for n, runs in ((1, one), (2, two))},
        "relay_1": [{**r["relay_counters"], **r["relay_drops"]} for r in one],
        "relay_2": [{**r["relay_counters"], **r["relay_drops"]} for r in two]})


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        role(sys.argv[1:])
    else:
        main()
