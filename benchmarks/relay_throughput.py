"""Relay throughput: one relay process forwarding 1400-byte packets between lab hosts.

One invocation (root, network namespaces) builds a lab with a relay host and
two public hosts, and measures:

* ``relay_mbps`` / ``relay_pps``: a packet pump through ``wgmesh relay serve``
  (source -> relay -> sink), counted at the sink;
* ``direct_mbps``: the same pump, same framing and Python costs at both ends,
  over a direct TCP connection between the two hosts (the reference);
  ``ratio`` = relay / direct; ``iperf3_direct_mbps`` is the kernel's own figure;
* ``pairs_mbps``: 100 concurrent source/sink client pairs through the relay;
* ``relay_tls_mbps``: one pair through the same relay code serving TLS on 443;
* ``rss_*``: the relay's resident memory empty, with 1,000 idle clients
  connected, and again after they idled for a while (flat = no growth).

Prints one JSON line. Usage: ``sudo .venv/bin/python benchmarks/relay_throughput.py
[--seconds 5] [--idle 1000]``. The roles below run inside the lab hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import subprocess
import sys
import time
from pathlib import Path

PACKET = 1400
PORT = 3340


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- roles (run inside lab hosts) ------------------------------------------------------
def _ssl(ca: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca) if ca else None


async def relay_sink(url: str, n: int, quiet: float, ca: str | None) -> None:
    from wgmesh.keys import PrivateKey
    from wgmesh.relaynet.connection import RelayConnection

    stats = {"packets": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    def on_recv(src: object, data: bytes) -> None:
        now = time.monotonic()
        if not stats["packets"]:
            stats["first"] = now
        stats["packets"] += 1
        stats["bytes"] += len(data)
        stats["last"] = now

    keys = [PrivateKey.generate() for _ in range(n)]
    conns = [await RelayConnection.open(url, k, on_recv=on_recv, queue_frames=4096, ssl=_ssl(ca))
             for k in keys]
    emit(ready=True, keys=[k.public.b64() for k in keys])
    while not stats["packets"] or time.monotonic() - stats["last"] < quiet:
        await asyncio.sleep(0.1)
    dt = max(stats["last"] - stats["first"], 1e-9)
    emit(packets=stats["packets"], bytes=stats["bytes"], seconds=dt,
         mbps=stats["bytes"] * 8 / dt / 1e6, pps=stats["packets"] / dt)
    for c in conns:
        c.close()


async def relay_source(url: str, peers: list[str], seconds: float, ca: str | None) -> None:
    from wgmesh.keys import Key, PrivateKey
    from wgmesh.relaynet.connection import RelayConnection

    conns = [await RelayConnection.open(url, PrivateKey.generate(), queue_frames=4096,
                                        ssl=_ssl(ca)) for _ in peers]
    dsts = [Key(p) for p in peers]
    packet = bytes(PACKET)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for conn, dst in zip(conns, dsts, strict=True):
            for _ in range(16):
                conn.send(dst, packet)
            sent += 16
            await conn.drain()
        await asyncio.sleep(0)
    emit(sent=sent)
    await asyncio.sleep(0.5)
    for c in conns:
        c.close()


async def direct_sink(host: str, quiet: float) -> None:
    """The reference: the same frames, decoded by the same codec, without the relay."""
    from wgmesh.relay import FrameDecoder

    stats = {"packets": 0, "bytes": 0, "first": 0.0, "last": 0.0}
    done = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        while data := await r.read(1 << 16):
            now = time.monotonic()
            for _, body in dec.feed(data):
                if not stats["packets"]:
                    stats["first"] = now
                stats["packets"] += 1
                stats["bytes"] += len(body) - 32
            stats["last"] = now
        done.set()

    srv = await asyncio.start_server(handle, host, 5002)
    emit(ready=True)
    await done.wait()
    dt = max(stats["last"] - stats["first"], 1e-9)
    emit(packets=stats["packets"], bytes=stats["bytes"], seconds=dt,
         mbps=stats["bytes"] * 8 / dt / 1e6, pps=stats["packets"] / dt)
    srv.close()


async def direct_source(host: str, seconds: float) -> None:
    from wgmesh.keys import PrivateKey
    from wgmesh.relay import frame_send

    _, w = await asyncio.open_connection(host, 5002)
    frame = frame_send(PrivateKey.generate().public, bytes(PACKET))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        w.write(b"".join([frame] * 16))
        await w.drain()
    w.close()
    await w.wait_closed()


async def idle_clients(url: str, n: int) -> None:
    from wgmesh.keys import PrivateKey
    from wgmesh.relaynet.connection import RelayConnection

    conns = []
    for _ in range(n):
        conns.append(await RelayConnection.open(url, PrivateKey.generate(), keepalive=5.0))
    emit(connected=len(conns))
    await asyncio.Event().wait()


def role(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--ca")
    a = ap.parse_args(argv)
    _raise_nofile()
    if a.role == "relay-sink":
        coro = relay_sink(a.args[0], a.n, 1.0, a.ca)
    elif a.role == "relay-source":
        coro = relay_source(a.args[0], a.args[1].split(","), a.seconds, a.ca)
    elif a.role == "direct-sink":
        coro = direct_sink(a.args[0], 1.0)
    elif a.role == "direct-source":
        coro = direct_source(a.args[0], a.seconds)
    else:
        coro = idle_clients(a.args[0], a.n)
    asyncio.run(coro)


# ---- orchestration -----------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=100)
    a = ap.parse_args()

    from wgmesh.lab import Lab

    me = str(Path(__file__).resolve())
    with Lab() as lab:
        relay, src, dst = (lab.add_public_host(n) for n in ("relay", "src", "dst"))
        srv = lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen",
                         f"{relay.ip}:{PORT}", "--key-file", f"/tmp/{lab.prefix}-relay.key")
        srv.wait_for_output('"listening"', timeout=30)
        url = f"http://{relay.ip}:{PORT}"

        def metrics() -> dict[str, object]:
            return json.loads(lab.run(relay, [sys.executable, "-c", (
                "import urllib.request;"
                f"print(urllib.request.urlopen('{url}/metrics').read().decode())")]).stdout)

        # memory first, on the fresh relay: 1000 idle clients, then idle for a while
        time.sleep(1)
        rss_base = rss_mb(srv.pid)
        idle = lab.python(src, me, "idle", url, "--n", str(a.idle))
        idle.wait_for_output('"connected"', timeout=300)
        rss_idle = rss_mb(srv.pid)
        time.sleep(12)  # more than two client keepalive periods
        rss_after = rss_mb(srv.pid)
        idle_clients = metrics()["clients"]
        idle.stop()

        def last(p: object) -> dict[str, object]:
            return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[attr-defined]

        def pump(n: int, via: str = url, *tls: str) -> dict[str, object]:
            sink = lab.python(dst, me, "relay-sink", via, "--n", str(n), *tls)
            keys = json.loads(sink.wait_for_output('"ready"', timeout=60).splitlines()[0])["keys"]
            source = lab.python(src, me, "relay-source", via, ",".join(keys),
                                "--seconds", str(a.seconds), *tls)
            deadline = time.monotonic() + a.seconds + 60
            while sink.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            source.wait(30)
            return {**last(sink), **last(source)}

        relayed = pump(1)
        sink = lab.python(dst, me, "direct-sink", dst.ip)
        sink.wait_for_output('"ready"', timeout=30)
        lab.run(src, [sys.executable, me, "direct-source", dst.ip, "--seconds",
                      str(a.seconds)], timeout=a.seconds + 60)
        sink.wait(30)
        direct = last(sink)
        iperf = lab.spawn(dst, ["iperf3", "-s", "-1", "-B", dst.ip])
        time.sleep(0.5)  # iperf3 prints nothing parseable before it listens
        cp = lab.run(src, ["iperf3", "-c", dst.ip, "-t", str(int(a.seconds)), "-J"],
                     check=False, timeout=a.seconds + 30)
        iperf.stop()
        iperf_mbps = (json.loads(cp.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
                      if cp.returncode == 0 else None)
        pairs = pump(a.pairs)
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
        tls = pump(1, f"https://{relay.ip}", "--ca", cert)


    relay_mbps = float(relayed["mbps"])  # type: ignore[arg-type]
    direct_mbps = float(direct["mbps"])  # type: ignore[arg-type]
    emit(relay_mbps=round(relay_mbps, 1), direct_mbps=round(direct_mbps, 1),
         ratio=round(relay_mbps / direct_mbps, 3), relay_pps=round(float(relayed["pps"])),  # type: ignore[arg-type]
         iperf3_direct_mbps=iperf_mbps and round(iperf_mbps, 1),
         relay_tls_mbps=round(float(tls["mbps"]), 1),  # type: ignore[arg-type]
         pairs=a.pairs, pairs_mbps=round(float(pairs["mbps"]), 1),  # type: ignore[arg-type]
         pairs_pps=round(float(pairs["pps"])),  # type: ignore[arg-type]
         packet_bytes=PACKET, seconds=a.seconds,
         relay_delivered=round(int(relayed["packets"]) / int(relayed["sent"]), 3),  # type: ignore[call-overload]
         idle_clients=idle_clients, rss_base_mb=round(rss_base, 1),
         rss_idle_mb=round(rss_idle, 1), rss_idle_after_mb=round(rss_after, 1),
         kb_per_idle_client=round((rss_idle - rss_base) * 1024 / max(a.idle, 1), 1),
         relay_drops=drops)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        role(sys.argv[1:])
    else:
        main()
