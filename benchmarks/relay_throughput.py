"""Relay throughput: one relay process forwarding 1400-byte packets between lab hosts.

One invocation (root, network namespaces) builds a lab with a relay host and
two public hosts, and measures, each figure the median of ``--runs`` runs (>= 3
for a figure to quote; every run is in the ``*_runs`` lists):

* ``relay_mbps`` / ``relay_pps``: a packet pump through ``wgmesh relay serve``
  (source -> relay -> sink), counted at the sink; ``relay_delivered`` is the
  fraction of sent packets that arrived (the relay drops the oldest when a sink
  falls behind, as DERP does);
* ``direct_mbps``, the reference: the same pump over one direct TCP connection
  between the two hosts. Both ends are :class:`RelayConnection` objects doing the
  same per-frame work as on the relay path (the source encodes one frame per
  packet into the same batched writes, the sink decodes and hands each packet to
  the same callback); only the relay's HTTP upgrade and handshake are replaced by
  a bare 101 head. So the one difference is the relay hop itself: its decode,
  lookup and re-encode, and a second TCP connection. Relay and direct runs
  alternate in ABBA order and ``ratio`` is the median of per-round ratios;
* ``iperf3_direct_mbps``: the kernel's own TCP figure for the same pair;
* ``pairs_mbps`` / ``pairs_delivered``: ``--pairs`` concurrent source/sink client
  pairs through the relay;
* ``relay_tls_mbps``: one pair through the same relay code serving TLS on 443;
* ``rss_*``: the relay's resident memory empty, with 1,000 idle clients
  connected, and again after they idled for a while (flat = no growth);
* ``*_cores``: CPU seconds per second that the relay, the source and the sink used
  while pumping (medians over the runs), to show which one limits the figure.

Prints one JSON line. Usage: ``sudo .venv/bin/python benchmarks/relay_throughput.py
[--seconds 5] [--runs 3] [--idle 1000] [--pairs 100]``. The roles below run inside
the lab hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from _bench import Report, last_json, proc_cpu_s, proc_rss_mb, round_ratios, run_abba, spread
from wgmesh.keys import Key, PrivateKey
from wgmesh.relay import FrameType, RelayURL, encode_frame
from wgmesh.relaynet.connection import RelayConnection
from wgmesh.relaynet.stream import FrameStream

if TYPE_CHECKING:  # the roles below run in lab hosts and need no lab themselves
    from wgmesh.lab.network import Host, Lab, Process

PACKET = 1400
PORT = 3340
DIRECT_PORT = 5002
REFERENCE = ("the same pump and RelayConnection framing over one direct TCP connection; "
             "differs from the relay path only by the relay hop (decode, lookup, re-encode, "
             "a second TCP connection)")


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- roles (run inside lab hosts) ------------------------------------------------------
def _ssl(ca: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca) if ca else None


class DirectPeer(RelayConnection):
    """A :class:`RelayConnection` on a plain TCP connection, with no relay in between.

    Each end writes a bare ``101`` head where the HTTP upgrade would be (and skips the
    handshake); ``send`` builds, per packet, the RECV frame the relay would have made of
    it with the same ``encode_frame`` call ``frame_send`` makes, so the sink runs the relay
    path's receive code.
    """

    @classmethod
    def make(cls, on_recv: Callable[[Key, bytes], None] | None = None) -> DirectPeer:
        return cls(RelayURL.parse("http://direct"), PrivateKey.generate(), None,
                   on_recv=on_recv, on_peer=None, keepalive=20.0, idle_timeout=65.0,
                   queue_frames=4096, write_timeout=5.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        FrameStream.connection_made(self, transport)
        self.write_raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self._ready.set_result(None)

    def send(self, dst: Key, data: bytes) -> None:
        self.write_frame(encode_frame(FrameType.RECV, dst.raw + data))


class Counts:
    """What a sink received; one ``on_recv`` for every connection of the sink.

    With ``windows`` (start on the monotonic clock, which every lab namespace
    shares; window length; count) the bytes are also summed per time window, so
    a caller can compare windows of one run (``metrics_cost.py``)."""

    def __init__(self, windows: tuple[float, float, int] | None = None) -> None:
        self.packets = self.bytes = 0
        self.first = self.last = 0.0
        self.cpu_first = 0.0
        self.windows = windows
        self.window_bytes = [0] * (windows[2] if windows else 0)

    def on_recv(self, src: Key, data: bytes) -> None:
        now = time.monotonic()
        if not self.packets:
            self.first = now
            self.cpu_first = time.process_time()
        self.packets += 1
        self.bytes += len(data)
        self.last = now
        if self.windows:
            k = int((now - self.windows[0]) // self.windows[1])
            if 0 <= k < self.windows[2]:
                self.window_bytes[k] += len(data)

    async def report_when_quiet(self, quiet: float) -> None:
        while not self.packets or time.monotonic() - self.last < quiet:
            await asyncio.sleep(0.1)
        dt = max(self.last - self.first, 1e-9)
        emit(packets=self.packets, bytes=self.bytes, seconds=dt,
             mbps=self.bytes * 8 / dt / 1e6, pps=self.packets / dt,
             sink_cores=(time.process_time() - self.cpu_first) / dt,
             **({"window_bytes": self.window_bytes} if self.windows else {}))


async def sink(kind: str, where: str, n: int, quiet: float, ca: str | None,
               windows: tuple[float, float, int] | None = None) -> None:
    """``n`` receiving keys: relay clients of ``where`` (a URL), or one direct listener
    on ``where`` (an address) taking any number of connections."""
    counts = Counts(windows)
    keys = [PrivateKey.generate() for _ in range(n)]
    conns: list[RelayConnection] = []
    server: asyncio.Server | None = None
    if kind == "relay":
        conns = [await RelayConnection.open(where, k, on_recv=counts.on_recv,
                                            queue_frames=4096, ssl=_ssl(ca)) for k in keys]
    else:
        server = await asyncio.get_running_loop().create_server(
            lambda: DirectPeer.make(counts.on_recv), where, DIRECT_PORT)
    emit(ready=True, keys=[k.public.b64() for k in keys])
    await counts.report_when_quiet(quiet)
    for c in conns:
        c.close()
    if server is not None:
        server.close()


async def source(kind: str, where: str, peers: list[str], seconds: float,
                 ca: str | None) -> None:
    """16 packets to each peer in turn, then wait for that connection's socket: the same
    loop relayed and direct."""
    loop = asyncio.get_running_loop()
    conns: list[RelayConnection] = []
    for _ in peers:
        if kind == "relay":
            conns.append(await RelayConnection.open(where, PrivateKey.generate(),
                                                    queue_frames=4096, ssl=_ssl(ca)))
        else:
            conns.append((await loop.create_connection(DirectPeer.make, where, DIRECT_PORT))[1])
    dsts = [Key(p) for p in peers]
    packet = bytes(PACKET)
    sent = 0
    cpu = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for conn, dst in zip(conns, dsts, strict=True):
            for _ in range(16):
                conn.send(dst, packet)
            sent += 16
            await conn.drain()
        await asyncio.sleep(0)
    emit(sent=sent, source_cores=(time.process_time() - cpu) / seconds)
    await asyncio.sleep(0.5)
    for c in conns:
        c.close()


async def idle_clients(url: str, n: int) -> None:
    conns = []
    for _ in range(n):
        conns.append(await RelayConnection.open(url, PrivateKey.generate(), keepalive=5.0))
    emit(connected=len(conns))
    await asyncio.Event().wait()


def role(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["relay-sink", "relay-source", "direct-sink",
                                     "direct-source", "idle"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--ca")
    ap.add_argument("--windows", help="START,SECONDS,COUNT: also count bytes per window")
    a = ap.parse_args(argv)
    _raise_nofile()
    kind, _, what = a.role.partition("-")
    if what == "sink":
        w = a.windows.split(",") if a.windows else None
        asyncio.run(sink(kind, a.args[0], a.n, 1.0, a.ca,
                         (float(w[0]), float(w[1]), int(w[2])) if w else None))
    elif what == "source":
        asyncio.run(source(kind, a.args[0], a.args[1].split(","), a.seconds, a.ca))
    else:
        asyncio.run(idle_clients(a.args[0], a.n))


# ---- orchestration -----------------------------------------------------------------------
def _median(runs: list[dict[str, Any]], key: str, digits: int | None = 1) -> float:
    return round(statistics.median(float(r[key]) for r in runs), digits)


def _delivered(run: dict[str, Any]) -> float:
    return int(run["packets"]) / int(run["sent"])


def relay_lab(lab: Lab) -> tuple[tuple[Host, Host, Host], Process, str]:
    """Hosts relay, src and dst on the lab's internet and ``wgmesh relay serve`` on the
    first: (hosts, the relay process, its URL)."""
    relay, src, dst = (lab.add_public_host(n) for n in ("relay", "src", "dst"))
    srv = lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen",
                     f"{relay.ip}:{PORT}", "--key-file", f"/tmp/{lab.prefix}-relay.key")
    srv.wait_for_output('"listening"', timeout=30)
    return (relay, src, dst), srv, f"http://{relay.ip}:{PORT}"



def run_pump(lab: Lab, src: Host, dst: Host, kind: str, where: str, seconds: float,
             n: int = 1, *tls: str, relay_pid: int | None = None) -> dict[str, Any]:
    """One pump run, ``src`` -> ``dst`` through the relay at ``where`` (``kind`` relay) or
    straight to ``dst`` (``kind`` direct) to ``n`` receiving keys: the sink's counts
    (``packets``, ``mbps``, ``pps``, ``sink_cores``, ...), the source's ``sent`` and
    ``source_cores``, and with ``relay_pid`` the relay's ``relay_cores``."""
    sink = lab.python(dst, __file__, f"{kind}-sink", where, "--n", str(n), *tls)
    keys = json.loads(sink.wait_for_output('"ready"', timeout=60).splitlines()[0])["keys"]
    source = lab.python(src, __file__, f"{kind}-source", where, ",".join(keys),
                        "--seconds", str(seconds), *tls)
    relay_cpu = proc_cpu_s(relay_pid) if relay_pid else 0.0
    deadline = time.monotonic() + seconds + 60
    while source.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    relay = {"relay_cores": (proc_cpu_s(relay_pid) - relay_cpu) / seconds} if relay_pid else {}
    while sink.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    source.wait(30)
    return {**last_json(sink), **last_json(source), **relay}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (the median counts)")
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=100)
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    me = __file__
    with Lab() as lab:
        (relay, src, dst), srv, url = relay_lab(lab)

        def metrics() -> dict[str, Any]:
            m: dict[str, Any] = json.loads(lab.run(relay, [sys.executable, "-c", (
                "import urllib.request;"
                f"print(urllib.request.urlopen('{url}/metrics').read().decode())")]).stdout)
            return m

        # memory first, on the fresh relay: 1000 idle clients, then idle for a while
        time.sleep(1)
        rss_base = proc_rss_mb(srv.pid)
        idle = lab.python(src, me, "idle", url, "--n", str(a.idle))
        idle.wait_for_output('"connected"', timeout=300)
        rss_idle = proc_rss_mb(srv.pid)
        time.sleep(12)  # more than two client keepalive periods
        rss_after = proc_rss_mb(srv.pid)
        idle_clients = metrics()["clients"]
        idle.stop()

        def pump(kind: str, where: str, n: int = 1, *tls: str) -> dict[str, Any]:
            return run_pump(lab, src, dst, kind, where, a.seconds, n, *tls,
                            relay_pid=srv.pid if kind == "relay" and not tls else None)

        def iperf3() -> float:
            server = lab.spawn(dst, ["iperf3", "-s", "-1", "-B", dst.ip])
            time.sleep(0.5)  # iperf3 prints nothing parseable before it listens
            cp = lab.run(src, ["iperf3", "-c", dst.ip, "-t", str(int(a.seconds)), "-J"],
                         check=False, timeout=a.seconds + 30)
            server.stop()
            return (json.loads(cp.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
                    if cp.returncode == 0 else float("nan"))

        relayed, direct = run_abba(a.runs, lambda: pump("relay", url),
                                   lambda: pump("direct", dst.ip))
        iperfs = [iperf3() for _ in range(a.runs)]
        pairs = [pump("relay", url, a.pairs) for _ in range(a.runs)]
        drops = metrics()["drops"]
        # the same relay code behind TLS on 443 (a throwaway certificate for its address)
        cert, key = f"/tmp/{lab.prefix}-relay.crt", f"/tmp/{lab.prefix}-relay.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=relay", "-days", "1",
                        "-addext", f"subjectAltName=IP:{relay.ip}", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        tls_srv = lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen",
                             f"{relay.ip}:443", "--stun-port", "-1", "--tls-cert", cert,
                             "--tls-key", key, "--key-file", f"/tmp/{lab.prefix}-relay.key")
        tls_srv.wait_for_output('"listening"', timeout=30)
        tls = [pump("relay", f"https://{relay.ip}", 1, "--ca", cert) for _ in range(a.runs)]

    def runs(xs: list[dict[str, Any]], key: str = "mbps") -> list[float]:
        return [round(float(x[key]), 1) for x in xs]

    report.emit({
        "bench": "relay_throughput", "runs": a.runs, "seconds": a.seconds,
        "packet_bytes": PACKET, "reference": REFERENCE,
        "relay_mbps": _median(relayed, "mbps"), "direct_mbps": _median(direct, "mbps"),
        **round_ratios(runs(relayed), runs(direct)),
        "relay_mbps_runs": runs(relayed), "direct_mbps_runs": runs(direct),
        "relay_pps": _median(relayed, "pps", None),
        "relay_delivered": round(statistics.median(map(_delivered, relayed)), 3),
        "relay_cores": _median(relayed, "relay_cores", 2),
        "relay_source_cores": _median(relayed, "source_cores", 2),
        "relay_sink_cores": _median(relayed, "sink_cores", 2),
        "direct_source_cores": _median(direct, "source_cores", 2),
        "direct_sink_cores": _median(direct, "sink_cores", 2),
        "direct_delivered": round(statistics.median(map(_delivered, direct)), 3),
        "iperf3_direct_mbps": round(statistics.median(iperfs), 1),
        "iperf3_direct_mbps_runs": [round(x, 1) for x in iperfs],
        "relay_tls_mbps": _median(tls, "mbps"), "relay_tls_mbps_runs": runs(tls),
        "pairs": a.pairs, "pairs_mbps": _median(pairs, "mbps"), "pairs_mbps_runs": runs(pairs),
        "pairs_pps": _median(pairs, "pps", None),
        "pairs_delivered": round(statistics.median(map(_delivered, pairs)), 3),
        "pairs_delivered_spread": spread([_delivered(p) for p in pairs]),
        "idle_clients": idle_clients, "rss_base_mb": rss_base, "rss_idle_mb": rss_idle,
        "rss_idle_after_mb": rss_after,
        "kb_per_idle_client": round((rss_idle - rss_base) * 1024 / max(a.idle, 1), 1),
        "relay_drops": drops})


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        role(sys.argv[1:])
    else:
        main()
