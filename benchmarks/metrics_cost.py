"""Metrics cost: relay throughput and control fan-out p99, scraped every second vs not.

Both servers count what they always counted; a scrape reads those counters and
renders Prometheus text. This measures what that costs the hot paths, with a
scraper process asking ``/metrics`` (Prometheus' ``Accept`` header) once a
second during the "scraped" runs and idle during the others:

* ``relay_ratio``: relay throughput scraped / not scraped, the pump of
  ``relay_throughput.py`` (source -> ``wgmesh relay serve`` -> sink, 1400-byte
  packets) in a lab, as one long run cut into ``--window``-second windows that
  are scraped or not in ABBA pairs (the sink counts bytes per window); the
  scraper runs on the relay's host (``/metrics`` answers this host only by
  default);
* ``control_ratio``: control fan-out p99 not scraped / scraped (so >= 0.97 means
  at most 3% slower), ``--nodes`` netmap streams against ``wgmesh control
  serve`` (SQLite) as in ``control_scale.py``, ``--changes`` changes per run.

Windows (relay) and runs (control) alternate in ABBA order and each ratio is
the median of per-pair ratios (``_bench``); goal: both >= 0.97. On a loaded
machine the pair ratios spread far wider than 3%, so the run also times one scrape (median of 20, back to
back): ``control_scrape_ms`` with the ``--nodes`` streams open and
``relay_scrape_ms_with_idle_clients`` with ``--idle`` clients connected. At one
scrape a second, a scrape of x ms takes at most x/1000 of the server's core,
whatever the load. Prints one JSON line. Usage: ``sudo .venv/bin/python
benchmarks/metrics_cost.py [--relay-pairs 20] [--window 2] [--rounds 4] [--nodes 1000]
[--changes 5] [--idle 1000] [--part relay|control|both]`` (the relay part needs root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from _bench import Report, last_json, round_ratios, run_abba, tail
from control_scale import Streams, _fake_key, _raise_fd_limit, _start_server, _stop
from relay_throughput import relay_lab
from wgmesh.control.store import open_store
from wgmesh.keys import PrivateKey

RELAY_BENCH = str(Path(__file__).with_name("relay_throughput.py"))
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scraped_window(k: int) -> bool:
    """Whether window ``k`` of the relay run is scraped: pairs of windows in ABBA order
    (scraped, plain), (plain, scraped), ... so neither side always comes first."""
    pair, pos = divmod(k, 2)
    return (pos == 0) == (pair % 2 == 0)


def scrape(url: str, times: int | None = None,
           windows: tuple[float, float, int] | None = None) -> None:
    """Role: GET ``url`` as Prometheus does, once a second until killed; or once a second
    in the scraped ``windows`` (start on the shared monotonic clock, length, count); or
    ``times`` times back to back, then print the median time of one scrape and its size."""
    req = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT})
    if windows:
        start, length, count = windows
        due = [start + k * length + i for k in range(count) if scraped_window(k)
               for i in range(int(length))]
    else:
        due = []
    print("scraping", flush=True)
    took: list[float] = []
    size = 0
    while times is None or len(took) < times:
        if windows and not due:
            return
        if due:
            time.sleep(max(0.0, due.pop(0) - time.monotonic()))
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        if not body.startswith(b"# HELP"):
            raise SystemExit(f"{url}: not Prometheus text")
        took.append(time.monotonic() - t0)
        size = len(body)
        if times is None and not windows:
            time.sleep(max(0.0, 1.0 - took.pop()))
    print(json.dumps({"scrape_ms": round(statistics.median(took) * 1e3, 2), "bytes": size}))


def scrape_once(run: Callable[[list[str]], str], url: str) -> dict[str, Any]:
    """What one scrape of ``url`` takes (median of 20), run by ``run(argv) -> stdout``."""
    out: dict[str, Any] = json.loads(run([sys.executable, __file__, "scrape", url, "20"])
                                     .splitlines()[-1])
    return out


@contextlib.contextmanager
def scraped(spawn: Callable[[list[str]], Any], url: str, on: bool) -> Iterator[None]:
    """While the block runs, a scraper process (``spawn(argv)``) reads ``url`` each second."""
    if not on:
        yield
        return
    proc = spawn([sys.executable, __file__, "scrape", url])
    try:
        proc.wait_for_output("scraping", timeout=30)
        yield
    finally:
        proc.stop()


def relay_part(a: argparse.Namespace) -> dict[str, Any]:
    """One long relay pump, scraped once a second in alternate windows (ABBA pairs): the
    same processes on the same cores on both sides of every ratio, which separate runs
    cannot promise on two shared cores (their round ratios spread +-15 %)."""
    from wgmesh.lab import Lab

    count = 2 * a.relay_pairs
    with Lab() as lab:
        (relay, src, dst), _, url = relay_lab(lab)
        start = time.monotonic() + 5  # both pump ends are connected and running by then
        windows = f"{start},{a.window},{count}"
        sink = lab.python(dst, RELAY_BENCH, "relay-sink", url, "--windows", windows)
        ready = sink.wait_for_output('"ready"', timeout=60).splitlines()[0]
        scraper = lab.spawn(relay, [sys.executable, __file__, "scrape", f"{url}/metrics",
                                    "--windows", windows])
        scraper.wait_for_output("scraping", timeout=30)
        lab.python(src, RELAY_BENCH, "relay-source", url, json.loads(ready)["keys"][0],
                   "--seconds", str(start + count * a.window + 0.5 - time.monotonic())
                   ).wait(count * a.window + 60)
        sink.wait(60)
        scraper.wait(30)
        got = last_json(sink)["window_bytes"]
        mbps = [b * 8 / a.window / 1e6 for b in got]
        on = [x for k, x in enumerate(mbps) if scraped_window(k)]
        off = [x for k, x in enumerate(mbps) if not scraped_window(k)]
        idle = lab.python(src, RELAY_BENCH, "idle", url, "--n", str(a.idle))
        idle.wait_for_output('"connected"', timeout=300)
        cost = scrape_once(lambda argv: lab.run(relay, argv).stdout, f"{url}/metrics")
        idle.stop()
    return {"relay_scrape_ms_with_idle_clients": cost["scrape_ms"], "idle_clients": a.idle,
            "relay_scrape_bytes": cost["bytes"], "relay_window_s": a.window,
            "relay_scraped_mbps_median": round(statistics.median(on), 1),
            "relay_plain_mbps_median": round(statistics.median(off), 1),
            "relay_scraped_mbps_windows": [round(x, 1) for x in on],
            "relay_plain_mbps_windows": [round(x, 1) for x in off],
            **round_ratios(on, off, "relay_ratio")}


class _Local:
    """A scraper on this host (control's ``/metrics`` answers loopback by default)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def wait_for_output(self, needle: str, timeout: float) -> None:
        assert self.proc.stdout is not None and needle in self.proc.stdout.readline()

    def stop(self) -> None:
        _stop(self.proc)


def p99(xs: list[float]) -> float:
    """The run's p99 (its maximum when a run has fewer than 100 samples, as _bench says)."""
    t = tail(xs)
    return float(t.get("p99_s", t.get("max_s", 0.0)))


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=None))


def control_part(a: argparse.Namespace, state: Path) -> dict[str, Any]:
    db = str(state / "control.db")
    store = open_store(db)
    peer_disco = PrivateKey.generate().public
    tokens = store.seed_nodes([(_fake_key(i), peer_disco, f"n{i}", []) for i in range(a.nodes)])
    store.close()
    proc, url = _start_server(db, state, "a")
    admin_key = (state / "admin.key").read_text().strip()
    port = iter(range(20000, 60000))
    loop = asyncio.new_event_loop()
    try:
        session = loop.run_until_complete(_session())
        streams = Streams([url], tokens)
        loop.run_until_complete(streams.open(session))
        loop.run_until_complete(streams.quiesce(session, admin_key))

        async def changes() -> list[float]:
            lat: list[float] = []
            for _ in range(a.changes):
                got, _, missed = await streams.measure(session, tokens[0],
                                                       set(range(1, a.nodes)), next(port))
                if missed:
                    raise SystemExit(f"{missed} streams missed a change")
                lat += got.values()
                await streams.quiesce(session, admin_key, 0.3)
            return lat

        def run(with_metrics: bool) -> list[float]:
            with scraped(_Local, f"{url}/metrics", with_metrics):
                return loop.run_until_complete(changes())

        on, off = run_abba(a.rounds, lambda: run(True), lambda: run(False))
        cost = scrape_once(lambda argv: subprocess.run(argv, capture_output=True, text=True,
                                                       check=True).stdout, f"{url}/metrics")
        streams.close()
        loop.run_until_complete(session.close())
    finally:
        _stop(proc)
        loop.close()
    on_p99, off_p99 = [p99(x) for x in on], [p99(x) for x in off]
    return {"nodes": a.nodes, "changes_per_run": a.changes,
            "control_scrape_ms": cost["scrape_ms"], "control_scrape_bytes": cost["bytes"],
            "control_scraped_p99_s_runs": on_p99, "control_plain_p99_s_runs": off_p99,
            "control_scraped": tail([t for x in on for t in x]),
            "control_plain": tail([t for x in off for t in x]),
            **round_ratios(off_p99, on_p99, "control_ratio")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="control: ABBA rounds (each: one run a side)")
    ap.add_argument("--relay-pairs", type=int, default=20,
                    help="relay: pairs of windows (one scraped, one not), ABBA")
    ap.add_argument("--window", type=float, default=2.0, help="relay: seconds per window")
    ap.add_argument("--nodes", type=int, default=1000, help="control streams")
    ap.add_argument("--changes", type=int, default=5, help="control changes per run")
    ap.add_argument("--idle", type=int, default=1000,
                    help="relay clients connected while one scrape is timed")
    ap.add_argument("--part", choices=["relay", "control", "both"], default="both")
    a = ap.parse_args()
    report = Report()
    _raise_fd_limit()
    out: dict[str, Any] = {"bench": "metrics_cost", "rounds": a.rounds, "goal": 0.97,
                           "scrape_interval_s": 1.0}
    if a.part in ("relay", "both"):
        out.update(relay_part(a))
    if a.part in ("control", "both"):
        with tempfile.TemporaryDirectory(prefix="wgm-metricsbench-") as tmp:
            out.update(control_part(a, Path(tmp)))
    report.emit(out)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "scrape":
        if sys.argv[3:4] == ["--windows"]:
            w = sys.argv[4].split(",")
            scrape(sys.argv[2], windows=(float(w[0]), float(w[1]), int(w[2])))
        else:
            scrape(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        main()
