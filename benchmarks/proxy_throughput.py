"""The kernel backend's relay bridge against the relay client alone, on the host.

The kernel backend reaches a relayed peer through :class:`~wgmesh.wireguard.proxy.RelayBridge`:
WireGuard sends to a loopback UDP endpoint, the bridge hands each datagram to the relay
client, and the far bridge injects it into the far WireGuard. This measures what the
bridge costs against the relay client alone (issue 18: at least 0.8 of it). The host
kernel has no WireGuard, so wireguard-go stands in for the kernel module at both ends:
measured in the TCG VM, every figure would be Python slowed ~10x by emulation.

A lab with three public hosts, one ``wgmesh relay serve`` on ``relay``:

* ``bridge``: wireguard-go on ``a`` and ``b``, each peer's endpoint the loopback endpoint
  of a bridge process (``RelayClient`` + ``RelayBridge``, as the agent wires them); an
  iperf3 UDP flood (1372-byte payloads: 1440-byte WireGuard packets) from ``a`` to ``b``
  through the tunnel; the figure is the WireGuard packets per second the far bridge
  injected into wireguard-go (its ``from_relay`` counter over the flood).
* ``client``, the reference: the same two hosts, a pump sending 1440-byte packets with
  ``RelayClient.send_nowait`` as fast as the loop allows, counted by a ``RelayClient``
  sink: what the relay client alone carries.

Both sides saturate the path and count what arrives; rounds run in ABBA order and
``ratio`` = bridge / client is the median of per-round ratios. The bridge side also
runs wireguard-go and iperf3 on the same two cores, which the reference does not: that
is part of what the bridge costs in practice, and it is stated in ``reference``. One TCP
iperf3 run through the bridge is reported too (``bridge_tcp_mbps``).

    sudo .venv/bin/python benchmarks/proxy_throughput.py [--seconds 5] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs

from _bench import Report, round_ratios, run_abba
from relay_throughput import relay_lab
from userspace_throughput import PORT, iperf, start
from wgmesh.keys import Key, PrivateKey

PACKET = 1440  # a WireGuard transport packet carrying iperf3's 1372-byte UDP payload
REFERENCE = ("RelayClient alone: a pump of 1440-byte packets through send_nowait to a "
             "RelayClient sink via the same relay; the bridge side also runs wireguard-go "
             "and iperf3 on the same two cores")


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


# ---- roles (run inside lab hosts) --------------------------------------------------------
async def bridge(url: str, keyfile: str, wg_port: int, peer: str) -> None:
    """RelayClient + RelayBridge for one peer, as the kernel agent wires them; prints the
    peer's loopback endpoint, then its counters when told to stop (SIGTERM)."""
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.wireguard.proxy import RelayBridge

    loop = asyncio.get_running_loop()
    holder: list[RelayBridge] = []
    client = RelayClient(PrivateKey.load(keyfile), [url],
                         on_packet=lambda src, pkt: holder[0].deliver(src, pkt))
    br = RelayBridge(loop, client.send_nowait, wg_port)
    holder.append(br)
    await client.start()
    host, port = br.add(Key(peer))
    emit(ready=True, endpoint=f"{host}:{port}")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: emit(**attrs.asdict(br.counters(Key(peer))),
                                                         t=time.monotonic()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    br.close()
    await client.close()


async def pump_sink(url: str) -> None:
    from wgmesh.relaynet.client import RelayClient

    key = PrivateKey.generate()
    got = {"packets": 0, "first": 0.0, "last": 0.0}

    def on_packet(src: Key, pkt: bytes) -> None:
        now = time.monotonic()
        if not got["packets"]:
            got["first"] = now
        got["packets"] += 1
        got["last"] = now

    async with RelayClient(key, [url], on_packet=on_packet) as _client:
        emit(ready=True, key=key.public.b64())
        while not got["packets"] or time.monotonic() - got["last"] < 1.0:
            await asyncio.sleep(0.1)
    emit(pps=got["packets"] / max(got["last"] - got["first"], 1e-9), packets=got["packets"])


async def pump_source(url: str, dst: str, seconds: float) -> None:
    from wgmesh.relaynet.client import RelayClient

    packet, peer = bytes(PACKET), Key(dst)
    async with RelayClient(PrivateKey.generate(), [url], on_packet=lambda *_: None) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                c.send_nowait(peer, packet)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)


def role(argv: list[str]) -> None:
    r, *args = argv
    if r == "bridge":
        asyncio.run(bridge(args[0], args[1], int(args[2]), args[3]))
    elif r == "pump-sink":
        asyncio.run(pump_sink(args[0]))
    else:
        asyncio.run(pump_source(args[0], args[1], float(args[2])))


# ---- orchestration -----------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds (one run a side)")
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    me = __file__
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="wgm-proxybench-") as d:
        tmp = Path(d)
        (_, ha, hb), _, url = relay_lab(lab)
        ia, ib = f"{lab.prefix}a", f"{lab.prefix}b"
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        start(lab, ha, ia, "wireguard-go", ka, "10.90.0.1", tmp)
        start(lab, hb, ib, "wireguard-go", kb, "10.90.0.2", tmp)
        bridges = []
        for host, ifname, mine, peer, addr in ((ha, ia, ka, kb, "10.90.0.2"),
                                               (hb, ib, kb, ka, "10.90.0.1")):
            mine.save(tmp / f"{ifname}.relaykey")
            p = lab.python(host, me, "bridge", url, str(tmp / f"{ifname}.relaykey"),
                           str(PORT), peer.public.b64())
            ep = json.loads(p.wait_for_output('"ready"', timeout=60).splitlines()[0])["endpoint"]
            lab.run(host, ["wg", "set", ifname, "peer", peer.public.b64(), "allowed-ips",
                           f"{addr}/32", "endpoint", ep])
            bridges.append(p)
        lab.run(ha, ["ping", "-c", "2", "-W", "5", "10.90.0.2"])

        def injected() -> tuple[int, float]:
            """The far bridge's from_relay counter, and when it was read."""
            before = len(bridges[1].stdout.splitlines())
            os.kill(bridges[1].pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while len(bridges[1].stdout.splitlines()) <= before:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bridge did not report: {bridges[1].stderr[-500:]}")
                time.sleep(0.01)
            c = json.loads(bridges[1].stdout.splitlines()[-1])
            return int(c["from_relay"]), float(c["t"])

        def via_bridge() -> float:
            n0, t0 = injected()
            iperf(lab, ha, hb, ia, "10.90.0.2", a.seconds, udp=True)
            n1, t1 = injected()
            return (n1 - n0) / a.seconds if t1 > t0 else 0.0

        def client_alone() -> float:
            sink = lab.python(hb, me, "pump-sink", url)
            key = json.loads(sink.wait_for_output('"ready"', timeout=60).splitlines()[0])["key"]
            lab.python(ha, me, "pump-source", url, key, str(a.seconds)).wait(a.seconds + 60)
            sink.wait(60)
            return float(json.loads(sink.stdout.strip().splitlines()[-1])["pps"])

        br, ref = run_abba(a.rounds, via_bridge, client_alone)
        tcp = iperf(lab, ha, hb, ia, "10.90.0.2", a.seconds, udp=False)["mbps"]
        for p in bridges:
            p.stop()
    report.emit({"bench": "proxy_throughput", "rounds": a.rounds, "seconds": a.seconds,
                 "packet_bytes": PACKET, "reference": REFERENCE, "goal": 0.8,
                 "bridge_pps_runs": [round(x) for x in br],
                 "client_pps_runs": [round(x) for x in ref],
                 "bridge_mbps_median": round(statistics.median(br) * PACKET * 8 / 1e6, 1),
                 "bridge_tcp_mbps": tcp, **round_ratios(br, ref)})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("bridge", "pump-sink", "pump-source"):
        role(sys.argv[1:])
    else:
        main()
