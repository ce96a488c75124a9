"""Relay with 1,000 clients, some of them slow readers: the others keep their throughput.

One ``wgmesh relay serve`` in a lab host. A crowd host holds ``--clients``
connected clients (default 1,000); ``--slow`` of them (default 100) are slow
readers: half never read (a 4 KiB receive buffer, reading paused), half read for
10 ms once a second; another ``--slow`` read normally (the control group); the
rest are idle. A flooder host sends 1400-byte packets round-robin at ``--flood-pps``
(default 4,000 a second) to one of the two groups, and the pump pair of
``relay_throughput.py`` (src -> relay -> dst, as fast as it goes) is measured
meanwhile. Rounds run ABBA: flood to the slow readers (A), flood to the same number
of normal readers (B), so both sides put the same load on the relay and only the
readers differ: ``same_load_ratio`` is the median of per-round pump throughput A / B
(1.0: the slow readers cost the others nothing beyond the load itself). ``ratio`` is
the same with B a quiet relay (the crowd connected, nobody flooded): what the pump keeps
of its throughput while the slow readers are flooded, the flood's own cost included.
The JSON also has the relay's drops by reason, its queued bytes during a slow round
(the backlogs' cap at work), its RSS, how many clients were still connected at the end
(the crowd: ``--clients``) and how often the relay cut a never-reader (it came back).

    sudo .venv/bin/python benchmarks/relay_slow_readers.py [--rounds 4] [--seconds 5]

The roles below run inside the lab hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _bench import Report, proc_rss_mb, round_ratios, run_abba
from relay_throughput import PACKET, _raise_nofile, emit, relay_lab, run_pump
from wgmesh.keys import Key, PrivateKey
from wgmesh.relaynet.connection import RelayConnection


# ---- roles (run inside lab hosts) ------------------------------------------------------
async def crowd(url: str, n: int, slow: int) -> None:
    """``n`` clients: ``slow`` slow readers (half never read, half trickle), ``slow``
    normal readers, the rest idle; prints their keys and stays. The relay cuts a reader
    that stays unwritable for its write timeout; a cut never-reader comes back (as a
    node would), so every round has its slow readers."""
    keys = [PrivateKey.generate() for _ in range(n)]

    async def connect(k: PrivateKey, stall: bool) -> RelayConnection:
        c = await RelayConnection.open(url, k, keepalive=5.0, idle_timeout=3600.0)
        if stall:
            assert c.transport is not None
            c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                            socket.SO_RCVBUF, 4096)
            c.transport.pause_reading()
        return c

    conns = [await connect(k, i < slow) for i, k in enumerate(keys)]
    emit(connected=len(conns), slow=[k.public.b64() for k in keys[:slow]],
         normal=[k.public.b64() for k in keys[slow:2 * slow]])
    never, trickle = range(slow // 2), range(slow // 2, slow)
    reconnects = 0
    while True:  # the trickle: 10 ms of reading a second
        await asyncio.sleep(0.99)
        for i in trickle:
            if conns[i].transport is not None:
                conns[i].transport.resume_reading()
        await asyncio.sleep(0.01)
        for i in trickle:
            if conns[i].transport is not None:
                conns[i].transport.pause_reading()
        for i in (*never, *trickle):
            if conns[i].closed:
                conns[i] = await connect(keys[i], True)
                reconnects += 1
                emit(reconnects=reconnects)


async def flood(url: str, targets: list[str], pps: int) -> None:
    """Packets to ``targets`` in turn at ``pps`` a second, from 4 clients, until killed."""
    senders = [await RelayConnection.open(url, PrivateKey.generate(), queue_frames=4096)
               for _ in range(4)]
    dsts = [Key(t) for t in targets]
    packet = bytes(PACKET)
    emit(flooding=len(dsts))
    sent, start, i = 0, time.monotonic(), 0
    while True:
        due = int((time.monotonic() - start) * pps) - sent
        for _ in range(due):
            senders[i % len(senders)].send(dsts[i % len(dsts)], packet)
            i += 1
        sent += max(due, 0)
        for s in senders:
            await s.drain()
        await asyncio.sleep(0.005)


def role(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["crowd", "flood"])
    ap.add_argument("url")
    ap.add_argument("targets", nargs="?")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=100)
    ap.add_argument("--pps", type=int, default=4000)
    a = ap.parse_args(argv)
    _raise_nofile()
    if a.role == "crowd":
        asyncio.run(crowd(a.url, a.n, a.slow))
    else:
        asyncio.run(flood(a.url, a.targets.split(","), a.pps))


# ---- orchestration -----------------------------------------------------------------------
def _reconnects(stdout: str) -> int:
    """How often the crowd brought back a slow reader the relay had cut."""
    counts = [json.loads(ln)["reconnects"] for ln in stdout.splitlines() if "reconnects" in ln]
    return counts[-1] if counts else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=100)
    ap.add_argument("--flood-pps", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    with Lab() as lab:
        (relay, src, dst), srv, url = relay_lab(lab)
        crowd_host, flood_host = lab.add_public_host("crowd"), lab.add_public_host("flood")

        def metrics() -> dict[str, Any]:
            m: dict[str, Any] = json.loads(lab.run(relay, [sys.executable, "-c", (
                "import urllib.request;"
                f"print(urllib.request.urlopen('{url}/metrics').read().decode())")]).stdout)
            return m

        crowd_proc = lab.python(crowd_host, __file__, "crowd", url, "--n", str(a.clients),
                                "--slow", str(a.slow))
        groups = json.loads(crowd_proc.wait_for_output('"connected"', timeout=600)
                            .splitlines()[0])
        queued: list[int] = []

        def pump_during_flood(group: str) -> dict[str, Any]:
            """A pump run while ``group`` (slow, normal, or none: quiet) is flooded."""
            flooder = None
            if group != "quiet":
                flooder = lab.python(flood_host, __file__, "flood", url,
                                     ",".join(groups[group]), "--pps", str(a.flood_pps))
                flooder.wait_for_output('"flooding"', timeout=60)
                time.sleep(1.0)  # the slow readers' backlogs fill up to their cap
            run = run_pump(lab, src, dst, "relay", url, a.seconds)
            if group == "slow":
                queued.append(int(metrics()["queued_bytes"]))
            if flooder is not None:
                flooder.stop()
            return run

        def side(group: str) -> Callable[[], dict[str, Any]]:
            return lambda: pump_during_flood(group)

        slow, quiet = run_abba(a.rounds, side("slow"), side("quiet"))
        slow2, normal = run_abba(a.rounds, side("slow"), side("normal"))
        m = metrics()

        def mbps(runs: list[dict[str, Any]]) -> list[float]:
            return [round(r["mbps"], 1) for r in runs]

        out = {"bench": "relay_slow_readers", "clients": a.clients, "slow_readers": a.slow,
               "flood_pps": a.flood_pps, "rounds": a.rounds, "seconds": a.seconds,
               "reference": "ratio: the pump with no flood (the crowd connected, nobody sent "
                            "to); same_load_ratio: the same flood sent to as many normal "
                            "readers; both in ABBA rounds",
               **round_ratios(mbps(slow), mbps(quiet)),
               **round_ratios(mbps(slow2), mbps(normal), "same_load_ratio"),
               "slow_mbps_runs": mbps(slow + slow2), "quiet_mbps_runs": mbps(quiet),
               "normal_mbps_runs": mbps(normal),
               "slow_mbps": round(statistics.median(mbps(slow + slow2)), 1),
               "quiet_mbps": round(statistics.median(mbps(quiet)), 1),
               "normal_mbps": round(statistics.median(mbps(normal)), 1),
               "slow_delivered": round(statistics.median(r["packets"] / r["sent"]
                                                         for r in slow + slow2), 3),
               "queued_bytes_slow_rounds": queued, "relay_drops": m["drops"],
               "relay_rss_mb": proc_rss_mb(srv.pid), "relay_clients_at_end": m["clients"],
               "slow_reader_reconnects": _reconnects(crowd_proc.stdout)}
    report.emit(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        role(sys.argv[1:])
    else:
        main()
