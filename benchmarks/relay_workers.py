"""Relay workers: the same relay load through ``--workers 1`` and ``--workers 2``.

One invocation (root, one lab host) runs, for each of ``--rounds`` ABBA rounds, a fresh
``wgmesh relay serve --workers 1`` and a fresh ``--workers 2`` on the host's address,
and the same load through each: ``--pairs`` source/sink pairs of relay clients, the
sources spread over ``--procs`` processes and the sinks over as many others, every
source pumping ``--packet``-byte packets to its sink as fast as the relay takes them.
``ratio`` is the median over rounds of (2 workers / 1 worker) packets delivered per
second, counted at the sinks over the same ``--seconds`` window of each run.

The load generators are built to cost the machine as little as the field's tools make
theirs, so that the figure is the relay's: after the relay handshake (done as a node does
it) a source ``sendfile()``s a pre-built file of SEND frames, looping, and a sink reads
with ``MSG_TRUNC`` (the kernel discards the bytes and returns their count), so neither
copies packet bytes between user space and the kernel, and they are only ``--procs``
processes of each kind. Both arms use this same generator, so the ratio is fair. To show
what each side used, the JSON gives CPU seconds per second in the window, from /proc: the
relay's workers (``relay_cores_*``; ``relay_sys_*`` the kernel's share) and the clients
(``client_cores_*``, ``client_sys_*``), and ``machine_cores_*``, everything the machine
did (the clients' and relay's work plus any other job's): near 2.0 means the machine, not
the relay, was the limit. ``relay_us_*`` and ``client_us_*`` are those CPU figures per
packet delivered (microseconds); ``crossed_2`` the share of the packets that went from one
worker to the other over their link (the relay's own counters).

``--split`` adds a third arm to every round (order a b c, c b a, ...): two separate
``--workers 1`` relays on two ports, each pair's two ends on the same one, the same
clients. No packet crosses between relay processes there, so ``split_ratio`` (over the
one-worker arm) is the most two relay processes deliver on this machine: the ceiling
``ratio`` is read against.

Prints one JSON line. Usage: ``sudo .venv/bin/python benchmarks/relay_workers.py
[--rounds 4] [--seconds 4] [--pairs 8] [--procs 1] [--packet 1400] [--split]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _bench import Report, last_json, machine_busy_s, proc_cpu_user_sys, round_ratios, run_abba
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import HEADER_LEN, KEY_LEN, frame_send
from wgmesh.relaynet.connection import RelayConnection

if TYPE_CHECKING:
    from wgmesh.lab.network import Host, Lab

PORT = 3340
FILE_BYTES = 1 << 20  # bytes of SEND frames in a source's file
READ = 4 << 20  # the most a sink's read takes
SETUP = 4.0  # seconds from the orchestrator's start signal to the counted window


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


# ---- roles (run inside the lab host) -------------------------------------------------------
# Each client does the relay's upgrade and handshake as a node does (RelayConnection), then
# takes its socket over from asyncio and moves bytes with no copy between user space and the
# kernel: a source sendfile()s a file of SEND frames, looping; a sink reads with MSG_TRUNC
# (tcp(7): the kernel discards the bytes and says how many). That leaves the clients the
# kernel's TCP work only, so the relay gets as much of the machine as it can use.


async def _handshaken(urls: list[str], keys: list[PrivateKey]) -> list[socket.socket]:
    """Relay connections of ``keys`` (the i-th to ``urls[i % len(urls)]``), past the
    handshake, as plain non-blocking sockets (the asyncio transports are dropped; their
    sockets were duplicated first, so the TCP connections stay)."""
    out = []
    for i, k in enumerate(keys):
        conn = await RelayConnection.open(urls[i % len(urls)], k)
        assert conn.transport is not None
        fd = os.dup(conn.transport.get_extra_info("socket").fileno())
        conn.abort("handed_over")
        out.append(socket.socket(fileno=fd))
        out[-1].setblocking(False)
    return out


def _ready(socks: list[socket.socket], event: int, until: float) -> Iterator[socket.socket]:
    """The sockets ready for ``event`` (level-triggered), until ``until`` (monotonic)."""
    by_fd = {s.fileno(): s for s in socks}
    with select.epoll() as ep:
        for fd in by_fd:
            ep.register(fd, event)
        while time.monotonic() < until:
            for fd, _ in ep.poll(0.05):
                yield by_fd[fd]


def sink(urls: list[str], n: int, start: float, seconds: float) -> None:
    keys = [PrivateKey.generate() for _ in range(n)]
    socks = asyncio.run(_handshaken(urls, keys))
    emit(ready=True, keys=[k.public.b64() for k in keys])
    counted, buf = 0, bytearray(READ)
    for s in _ready(socks, select.EPOLLIN, start + seconds + 0.3):
        with contextlib.suppress(BlockingIOError):
            got = s.recv_into(buf, READ, socket.MSG_TRUNC)
            if start <= time.monotonic() < start + seconds:
                counted += got
    emit(bytes=counted)
    for s in socks:
        s.close()


def source(urls: list[str], dsts: list[str], packet: int, end: float) -> None:
    """One connection per destination, to the relay its sink is on (the sinks' rule), each
    sending its own file of SEND frames for that destination (whole frames, so it can
    loop) while its socket takes them."""
    socks = asyncio.run(_handshaken(urls, [PrivateKey.generate() for _ in dsts]))
    files, offset, sent = {}, dict.fromkeys(socks, 0), 0
    for s, d in zip(socks, dsts, strict=True):
        frame = frame_send(Key(d), bytes(packet))
        files[s] = os.memfd_create("wgrw-frames")
        os.write(files[s], frame * max(1, FILE_BYTES // len(frame)))
    size = os.fstat(files[socks[0]]).st_size
    for s in _ready(socks, select.EPOLLOUT, end):
        with contextlib.suppress(BlockingIOError):
            n = os.sendfile(s.fileno(), files[s], offset[s], size - offset[s])
            offset[s] = (offset[s] + n) % size
            sent += n
    emit(sent_bytes=sent)
    for s in socks:
        s.close()
        os.close(files[s])


def role(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["sink", "source"])
    ap.add_argument("urls", help="the relays, comma-separated")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--dsts", default="")
    ap.add_argument("--packet", type=int, default=1400)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    if a.role == "sink":
        sink(a.urls.split(","), a.n, a.start, a.seconds)
    else:
        source(a.urls.split(","), a.dsts.split(","), a.packet, a.start + a.seconds)


# ---- orchestration -------------------------------------------------------------------------
def _cpu(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids`` together."""
    user = sys_ = 0.0
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone: not counted
            u, s = proc_cpu_user_sys(p)
            user, sys_ = user + u, sys_ + s
    return user, sys_


def _children(pid: int) -> list[int]:
    """The relay's worker processes: the children of its supervisor (none with one)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _cores(before: tuple[float, float], after: tuple[float, float], seconds: float,
           side: str) -> dict[str, float]:
    """CPU seconds per second of one side in the window: in all, in user and in system."""
    user, sys_ = ((b - a) / seconds for a, b in zip(before, after, strict=True))
    return {f"{side}_cores": user + sys_, f"{side}_user": user, f"{side}_sys": sys_}


def _counters(lab: Lab, host: Host, url: str) -> dict[str, Any]:
    """One relay's ``/metrics`` JSON (counters and drops)."""
    out: dict[str, Any] = json.loads(lab.run(host, [sys.executable, "-c", (
        "import urllib.request;"
        f"print(urllib.request.urlopen('{url}/metrics').read().decode())")]).stdout)
    return out


def one_run(lab: Lab, host: Host, workers: int, a: argparse.Namespace,
            relays: int = 1) -> dict[str, Any]:
    """``relays`` fresh relays of ``workers`` each (on ports from ``PORT``; with several,
    pair *i* has both ends on relay *i mod relays*) and the load through them: the sinks'
    packets/s in the window and the CPU each side used in it."""
    me = __file__
    procs = [lab.python(host, "-m", "wgmesh", "relay", "serve", "--workers", str(workers),
                        "--listen", f"{host.ip}:{PORT + i}", "--stun-port", "-1",
                        "--key-file", f"/tmp/{lab.prefix}-relay{i}.key")
             for i in range(relays)]
    try:
        relay_pids = []
        for p in procs:
            p.wait_for_output('"listening"', timeout=30)
            relay_pids += [p.pid, *_children(p.pid)]  # (its line's "pids" can come torn)
        urls = [f"http://{host.ip}:{PORT + i}" for i in range(relays)]
        start = time.monotonic() + SETUP
        window = ["--start", str(start), "--seconds", str(a.seconds)]
        per = [a.pairs // a.procs + (i < a.pairs % a.procs) for i in range(a.procs)]
        sinks = [lab.python(host, me, "sink", ",".join(urls), "--n", str(n), *window)
                 for n in per]
        keys = [json.loads(s.wait_for_output('"ready"', timeout=30).splitlines()[0])["keys"]
                for s in sinks]
        sources = [lab.python(host, me, "source", ",".join(urls), "--dsts", ",".join(k),
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
        got = sum(last_json(p)["bytes"] for p in sinks)
        metrics = [_counters(lab, host, u) for u in urls]
    finally:
        for p in procs:
            p.stop()
    counters = sum((Counter(m["counters"]) for m in metrics), Counter[str]())
    drops = sum((Counter(m["drops"]) for m in metrics), Counter[str]())
    frame = HEADER_LEN + KEY_LEN + a.packet
    pps = got / frame / a.seconds
    relay = _cores(cpu0[0], cpu1[0], a.seconds, "relay")
    clients = _cores(cpu0[1], cpu1[1], a.seconds, "client")
    return {"pps": pps, "mbps": got / frame * a.packet * 8 / a.seconds / 1e6,
            **relay, **clients,
            "relay_us": relay["relay_cores"] / pps * 1e6 if pps else 0.0,
            "client_us": clients["client_cores"] / pps * 1e6 if pps else 0.0,
            "crossed": counters.get("packets_sibling_out", 0) / max(1, counters["packets_in"]),
            "machine_cores": (cpu1[2] - cpu0[2]) / a.seconds,
            "relay_counters": {k: v for k, v in counters.items() if k.startswith("packets")},
            "relay_drops": drops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--procs", type=int, default=1, help="processes of sources (and of sinks)")
    ap.add_argument("--packet", type=int, default=1400)
    ap.add_argument("--split", action="store_true",
                    help="a third arm: two separate one-worker relays, each pair on one")
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    with Lab() as lab:
        host = lab.add_public_host("relay")
        arms = [lambda: one_run(lab, host, 1, a), lambda: one_run(lab, host, 2, a)]
        if a.split:
            arms.append(lambda: one_run(lab, host, 1, a, relays=2))
        one, two, *split = run_abba(a.rounds, *arms)

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
        **{f"{k}_{n}": col(runs, k) for k in ("relay_sys", "client_sys", "machine_cores",
                                               "relay_us", "client_us")
           for n, runs in ((1, one), (2, two))},
        "crossed_2": col(two, "crossed", 3),
        "relay_1": [{**r["relay_counters"], **r["relay_drops"]} for r in one],
        "relay_2": [{**r["relay_counters"], **r["relay_drops"]} for r in two],
        **(_split(split[0], one, col) if split else {})})


def _split(runs: list[dict[str, Any]], one: list[dict[str, Any]],
           col: Callable[[list[dict[str, Any]], str], list[float]]) -> dict[str, Any]:
    """The ``--split`` arm: two independent one-worker relays with no pair crossing between
    them, the most two relay processes can deliver on this machine: ``split_ratio`` over
    the one-worker arm of the same rounds."""
    return {**round_ratios(col(runs, "pps"), col(one, "pps"), "split_ratio"),
            "pps_split": round(statistics.median(col(runs, "pps"))),
            "pps_split_runs": [round(x) for x in col(runs, "pps")],
            **{f"{k}_split": col(runs, k) for k in ("relay_cores", "client_cores",
                                                    "machine_cores", "relay_us", "client_us")}}


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        role(sys.argv[1:])
    else:
        main()
