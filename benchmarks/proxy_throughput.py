"""The kernel backend's relay bridge against the relay client alone, on the host.

The kernel backend reaches a relayed peer through :class:`~wgmesh.wireguard.proxy.RelayBridge`:
WireGuard sends to a loopback UDP endpoint, the bridge hands each datagram to the relay
client, and the far bridge injects it into the far WireGuard. This measures what the
bridge costs against the relay client alone (issue 18: at least 0.8 of it). The host
kernel has no WireGuard, so wireguard-go stands in for the kernel module at both ends:
measured in the TCG VM, every figure would be Python slowed ~10x by emulation.

A lab with three public hosts, one ``wgmesh relay serve`` on ``relay``, and on ``a`` and
``b`` a bridge process each (``RelayClient`` + ``RelayBridge``, wired as the agent wires
them), each the other's peer. Two measurements, both in ABBA rounds with the ratio the
median of per-round ratios:

1. ``ratio`` (the issue's figure): the bridge against the relay client alone.
   ``bridge``: plain UDP sockets stand in for the kernel ports: a sender on ``a`` blasts
   1440-byte datagrams (a WireGuard packet carrying 1372 bytes of payload) at the
   bridge's loopback endpoint, a counter on ``b``'s kernel port counts what the far bridge
   injected. ``client``, the reference: a pump of 1440-byte packets through
   ``RelayClient.send_nowait`` to a ``RelayClient`` sink via the same relay, each batch
   of 64 ending with one ``RelayClient.send``, whose backpressure holds the pump while
   the link is backed up (the client at its best: unpaced, its own queue dropped a third
   of what it made and it carried 15-27 % less). Both saturate the path and count what
   arrives, per second. Both sources keep at most ``--window`` packets in flight (4,096;
   :class:`InFlight`), as TCP inside the tunnel would: the receiver publishes what
   arrived, so neither side makes packets the path then drops. Without it the relay
   dropped 10-48 % of the pump's packets for its slower sink (``offered_per_delivered``
   1.1-1.48), after the pump and the relay had paid for them; and the bridge, overrun
   (``--window 0``, the UDP sender paced at ``--blast-pps``, the method until
   2026-12-07: 300,000/s offered, ~1.5x what it carried), kept its socket queue full,
   took ~6.4 us per packet instead of ~5.2 (the kernel's part 2.2-2.5 against 1.5-1.7
   us), and its sender spent CPU on datagrams the socket then dropped.
   ``cpu_ratio`` is the load-robust side of the same comparison: CPU time per delivered
   packet of the client's source and sink over that of the two bridge processes (the
   relay's, ``relay_cpu_us_per_packet``, is the same work on both sides).
   ``standin_cpu_us_per_packet``: the UDP sender's and counter's CPU per delivered packet,
   which the bridge runs spend on the same two cores and the client's runs do not;
   ``standin_timed_out``, ``client_timed_out``: the share of each source's packets its
   window gave up on as lost.
   ``*_sys_us_per_packet``: the kernel's part of each side's CPU per packet;
   ``machine_busy_cores``: how many of the machine's cores were busy (``/proc/stat``,
   any process and the kernel's softirq work, which no process is charged for) while the
   source sent, and ``machine_us_per_packet`` that over the packets per second;
   ``offered_per_delivered``: packets each source sent per packet that arrived;
   ``client_source_dropped``: the share the pump's own link queue
   dropped; ``faults_per_packet``: minor page faults of the processes under test. Every
   role process tunes its heap as ``wgmesh up`` does (``libc.steady_heap``), and the
   pump's sink reads its clocks every 20 ms, not per packet.
2. ``wg_bridge_of_direct_ratio``: wireguard-go standing in for the kernel module at both
   ends (the issue's stand-in), an iperf3 UDP flood (1372-byte payloads) through the
   tunnel with the peers' endpoints on the bridges, against the same flood with direct
   endpoints: what the bridge costs the stand-in, whose own ceiling (Debian's
   wireguard-go v0.0.20220316 and iperf3 on the same two cores) sits far below the relay
   client's. ``wg_bridge_of_client`` divides the bridged flood by part 1's client runs;
   one TCP iperf3 through the bridges is ``wg_bridge_tcp_mbps``.

    sudo .venv/bin/python benchmarks/proxy_throughput.py [--seconds 5] [--rounds 4]
        [--window 4096 | --window 0 --blast-pps 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import resource
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from _bench import (
    Report,
    last_json,
    machine_busy_s,
    proc_cpu_s,
    proc_usage,
    round_ratios,
    run_abba,
)
from relay_throughput import relay_lab
from userspace_throughput import PORT, iperf, link_up, start
from wgmesh.keys import Key, PrivateKey
from wgmesh.libc import steady_heap

if TYPE_CHECKING:
    from wgmesh.lab.network import Process

UDP_PORT = 51900  # the UDP stand-in's "kernel port"
UDP_PAYLOAD = 1372  # iperf3's datagrams: 1400-byte IP packets fit the 1420 tunnel MTU
PACKET = 1440  # the WireGuard transport packet that carries one
BLAST_PPS = 300_000  # offered without a window: ~1.5x what the bridge carries
WINDOW = 4096  # packets in flight per source: 2,048-8,192 carried alike, none lost
COUNT = struct.Struct("=Q")  # packets arrived, published by a receiver to its source
REFERENCE = ("ratio: RelayClient alone, a pump of 1440-byte packets through send_nowait "
             "(each batch of 64 ending with send's backpressure) to a RelayClient sink via "
             "the same relay, both sources within the same window of packets in flight, "
             "against the bridges fed and drained "
             "by plain UDP sockets on the kernel ports; wg_bridge_of_direct_ratio: "
             "wireguard-go peers flooded through the bridges against direct endpoints")


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)



@attrs.frozen
class Run:
    """One run of either side: packets per second at the receiver, and CPU microseconds
    per packet of the processes under test (the bridges; the client's source and sink)
    and of the relay."""

    pps: float
    cpu_s_per_packet: float
    relay_cpu_s_per_packet: float
    standin_cpu_s_per_packet: float = 0.0  # the UDP sender and counter (bridge runs)
    offered: float = 0.0  # packets the source sent (or queued) per packet that arrived
    source_dropped: float = 0.0  # the share of them the client's own link queue dropped
    timed_out: float = 0.0  # the share the source's window gave up on as lost
    faults: float = 0.0  # minor page faults per packet of the processes under test
    sys_s_per_packet: float = 0.0  # the kernel's part of cpu_s_per_packet
    busy_cores: float = 0.0  # cores the whole machine kept busy while the source sent

    @property
    def cpu_us(self) -> float:
        return self.cpu_s_per_packet * 1e6

    @property
    def relay_cpu_us(self) -> float:
        return self.relay_cpu_s_per_packet * 1e6

    @property
    def standin_cpu_us(self) -> float:
        return self.standin_cpu_s_per_packet * 1e6


class InFlight:
    """A sender's window over what its receiver reports as arrived, as a TCP sender inside
    the tunnel would keep: at most ``window`` packets in flight (0: no window). The
    receiver publishes its count in the file ``arrived`` (8 bytes, mmap'd); what has not
    arrived ``TIMEOUT`` s after the last progress counts as lost and reopens the window
    (TCP's retransmission timeout). Both sides' sources use it, so neither makes packets
    the path then drops."""

    TIMEOUT = 0.02

    def __init__(self, window: int, arrived: str) -> None:
        self.window = window
        with open(arrived, "rb") as f:
            self._count = mmap.mmap(f.fileno(), COUNT.size, prot=mmap.PROT_READ)
        self.lost = self._seen = 0
        self._progress = time.monotonic()

    def full(self, sent: int, batch: int, now: float) -> bool:
        """Whether sending ``batch`` more would exceed the window (``sent`` so far)."""
        if not self.window:
            return False
        got = COUNT.unpack_from(self._count)[0]
        if sent - got - self.lost <= self.window - batch:
            return False
        if got != self._seen:
            self._seen, self._progress = got, now
        elif now - self._progress > self.TIMEOUT:
            self.lost = sent - got
        return True


def published(arrived: str) -> Callable[[int], None]:
    """The receiver's side of :class:`InFlight`: publishes a count into ``arrived``."""
    with open(arrived, "r+b") as f:
        count = mmap.mmap(f.fileno(), COUNT.size)
    return lambda n: COUNT.pack_into(count, 0, n)


# ---- roles (run inside lab hosts) --------------------------------------------------------
async def bridge(url: str, keyfile: str, wg_port: int, peer: str) -> None:
    """RelayClient + RelayBridge for one peer, as the kernel agent wires them; prints the
    peer's loopback endpoint and runs until SIGTERM."""
    from wgmesh.relaynet.client import RelayClient
    from wgmesh.wireguard.proxy import RelayBridge

    loop = asyncio.get_running_loop()
    client = RelayClient(PrivateKey.load(keyfile), [url])
    br = RelayBridge(loop, client.send_nowait, wg_port)
    client.on_packet = br.deliver  # as the agent's data plane sets it
    await client.start()
    host, port = br.add(Key(peer))
    emit(ready=True, endpoint=f"{host}:{port}")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    br.close()
    await client.close()


async def pump_sink(url: str, arrived: str) -> None:
    """The reference's receiver: counts packets and publishes the count once per loop
    iteration for the source's window (the UDP counter does so once per read); the clock,
    CPU and page-fault readings are taken every 20 ms, not per packet (a per-packet
    ``process_time`` is a system call the bridge's counter does not pay)."""
    from wgmesh.relaynet.client import RelayClient

    key = PrivateKey.generate()
    count = [0]
    publish = published(arrived)
    due = [False]
    loop = asyncio.get_running_loop()

    def flush() -> None:
        due[0] = False
        publish(count[0])

    def on_packet(src: Key, pkt: bytes) -> None:
        count[0] += 1
        if not due[0]:
            due[0] = True
            loop.call_soon(flush)

    def reading() -> tuple[int, float, tuple[float, float, int]]:
        return count[0], time.monotonic(), _usage()

    async with RelayClient(key, [url], on_packet=on_packet) as _client:
        emit(ready=True, key=key.public.b64())
        while not count[0]:
            await asyncio.sleep(0.02)
        first = last = reading()
        while time.monotonic() - last[1] < 1.0:
            await asyncio.sleep(0.02)
            if count[0] > last[0]:
                last = reading()
    packets = last[0] - first[0]
    emit(pps=packets / max(last[1] - first[1], 1e-9), packets=packets,
         **_used(first[2], last[2]))


def _usage() -> tuple[float, float, int]:
    """CPU seconds (user + system), system seconds and minor page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def _used(before: tuple[float, float, int], after: tuple[float, float, int]
          ) -> dict[str, float]:
    return {"cpu_s": after[0] - before[0], "sys_s": after[1] - before[1],
            "faults": after[2] - before[2]}


async def pump_source(url: str, dst: str, seconds: float, window: int, arrived: str
                      ) -> None:
    """The reference's source: batches of 64 through ``send_nowait``, within the same
    window of packets in flight as the UDP stand-in's sender (without one, the relay
    dropped 10-48 % of them for the sink, after the pump and the relay had paid for
    them)."""
    from wgmesh.relaynet.client import RelayClient

    packet, peer = bytes(PACKET), Key(dst)
    flight = InFlight(window, arrived)
    async with RelayClient(PrivateKey.generate(), [url], on_packet=lambda *_: None) as c:
        start, before, busy, sent = time.monotonic(), _usage(), machine_busy_s(), 0
        while (now := time.monotonic()) < start + seconds:
            if flight.full(sent, 64, now):
                # epoll rounds this up to 1 ms: ~1/15 of what the window holds here
                await asyncio.sleep(50e-6)
                continue
            for _ in range(63):
                c.send_nowait(peer, packet)
            # The batch's last packet with backpressure: while the link is backed up the
            # pump waits instead of making packets its queue then drops (unpaced, a
            # third of them were, and the client carried 15-27 % less).
            await c.send(peer, packet)
            sent += 64
            await asyncio.sleep(0)
        used = _used(before, _usage())
        cores = (machine_busy_s() - busy) / (time.monotonic() - start)
        await asyncio.sleep(0.5)
    emit(**used, sent=sent, dropped=sum(c.drops.values()), timed_out=flight.lost,
         busy_cores=cores)


def udp_blast(port: int, dst: str, seconds: float, pps: float, window: int,
              arrived: str) -> None:
    """The UDP stand-in's sender: 1440-byte datagrams from 127.0.0.1:``port`` (where the
    bridge's socket is connected) to the bridge endpoint ``dst``, 44 per GSO send, within
    an :class:`InFlight` window of ``window`` datagrams; without one (0) paced at ``pps``
    datagrams per second (0: unpaced)."""
    from wgmesh.wireguard.offload import SOL_UDP, UDP_SEGMENT

    host, _, p = dst.rpartition(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.connect((host, int(p)))
    burst, gso = bytes(PACKET * 44), [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", PACKET))]
    flight = InFlight(window, arrived)
    start, cpu, busy = time.monotonic(), time.process_time(), machine_busy_s()
    sent = 0
    while (now := time.monotonic()) < start + seconds:
        if flight.full(sent, 44, now):
            time.sleep(50e-6)
            continue
        if not window and pps and sent >= (now - start) * pps:
            time.sleep(44 / pps)
            continue
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            s.sendmsg([burst], gso)
            sent += 44
    cores = (machine_busy_s() - busy) / (time.monotonic() - start)
    emit(cpu_s=time.process_time() - cpu, sent=sent, timed_out=flight.lost, busy_cores=cores)


def udp_count(port: int, arrived: str) -> None:
    """The UDP stand-in's receiver on the kernel port: datagrams per second from the first
    to the last (UDP GRO on, so the bridge's GSO runs arrive in one read each); the count
    so far is kept in the file ``arrived`` for the sender's window."""
    from wgmesh.wireguard.offload import SOL_UDP, UDP_GRO

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    publish = published(arrived)
    emit(ready=True)
    buf = bytearray(1 << 16)
    packets = -(-s.recv_into(buf) // PACKET)
    publish(packets)
    first = last = time.monotonic()
    cpu_first = cpu_last = time.process_time()
    s.settimeout(1.0)
    with contextlib.suppress(TimeoutError):
        while True:
            packets += -(-s.recv_into(buf) // PACKET)
            publish(packets)
            last, cpu_last = time.monotonic(), time.process_time()
    emit(pps=packets / max(last - first, 1e-9), packets=packets, cpu_s=cpu_last - cpu_first)


def role(argv: list[str]) -> None:
    r, *args = argv
    steady_heap()  # every role as ``wgmesh up`` runs the agent: both sides alike
    if r == "bridge":
        asyncio.run(bridge(args[0], args[1], int(args[2]), args[3]))
    elif r == "pump-sink":
        asyncio.run(pump_sink(args[0], args[1]))
    elif r == "pump-source":
        asyncio.run(pump_source(args[0], args[1], float(args[2]), int(args[3]), args[4]))
    elif r == "udp-blast":
        udp_blast(int(args[0]), args[1], float(args[2]), float(args[3]), int(args[4]), args[5])
    else:
        udp_count(int(args[0]), args[1])


# ---- orchestration -----------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds (one run a side)")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help="packets each source keeps in flight (0: no window, the UDP "
                         "stand-in paced by --blast-pps, the method before 2026-12-07)")
    ap.add_argument("--blast-pps", type=float, default=BLAST_PPS,
                    help="without a window, the UDP stand-in's offered datagrams/s "
                         "(0: unpaced)")
    a = ap.parse_args()
    report = Report()

    from wgmesh.lab import Lab

    me = __file__
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="wgm-proxybench-") as d:
        tmp = Path(d)
        (_, ha, hb), relay, url = relay_lab(lab)

        def bridge_pair(port: int) -> tuple[list[Process], list[str]]:
            """A bridge process on each host for a kernel port ``port``, each the other's
            peer: the processes and each one's loopback endpoint for its peer."""
            keys = [PrivateKey.generate() for _ in range(2)]
            procs, eps = [], []
            for i, host in enumerate((ha, hb)):
                keys[i].save(tmp / f"{port}{i}.key")
                p = lab.python(host, me, "bridge", url, str(tmp / f"{port}{i}.key"),
                               str(port), keys[1 - i].public.b64())
                line = p.wait_for_output('"ready"', timeout=60).splitlines()[0]
                procs.append(p)
                eps.append(json.loads(line)["endpoint"])
            return procs, eps

        def fresh_count() -> str:
            """The file a run's receiver publishes its count in, for the source's window."""
            arrived = tmp / "arrived"
            arrived.write_bytes(bytes(COUNT.size))
            return str(arrived)

        def client_alone() -> Run:
            arrived = fresh_count()
            sink = lab.python(hb, me, "pump-sink", url, arrived)
            key = json.loads(sink.wait_for_output('"ready"', timeout=60).splitlines()[0])["key"]
            relay0 = proc_cpu_s(relay.pid)
            source = lab.python(ha, me, "pump-source", url, key, str(a.seconds),
                                str(a.window), arrived)
            source.wait(a.seconds + 60)
            sink.wait(60)
            got, sent = last_json(sink), last_json(source)
            return Run(got["pps"], (got["cpu_s"] + sent["cpu_s"]) / got["packets"],
                       (proc_cpu_s(relay.pid) - relay0) / got["packets"],
                       offered=sent["sent"] / got["packets"],
                       source_dropped=sent["dropped"] / sent["sent"],
                       timed_out=sent["timed_out"] / sent["sent"],
                       faults=(got["faults"] + sent["faults"]) / got["packets"],
                       sys_s_per_packet=(got["sys_s"] + sent["sys_s"]) / got["packets"],
                       busy_cores=sent["busy_cores"])

        # 1. The bridge itself: plain UDP sockets on the kernel ports, against the client.
        udp_bridges, udp_eps = bridge_pair(UDP_PORT)

        def via_bridge_udp() -> Run:
            arrived = fresh_count()
            count = lab.python(hb, me, "udp-count", str(UDP_PORT), arrived)
            count.wait_for_output('"ready"', timeout=60)
            procs = (*udp_bridges, relay)
            before = [proc_usage(p.pid) for p in procs]
            blast = lab.python(ha, me, "udp-blast", str(UDP_PORT), udp_eps[0],
                               str(a.seconds), str(a.blast_pps), str(a.window), arrived)
            blast.wait(a.seconds + 60)
            count.wait(60)
            near, far, rel = (_used(b, proc_usage(p.pid))
                              for p, b in zip(procs, before, strict=True))
            got, sent = last_json(count), last_json(blast)
            n = got["packets"]
            return Run(got["pps"], (near["cpu_s"] + far["cpu_s"]) / n, rel["cpu_s"] / n,
                       (sent["cpu_s"] + got["cpu_s"]) / n, sent["sent"] / n,
                       timed_out=sent["timed_out"] / sent["sent"],
                       faults=(near["faults"] + far["faults"]) / n,
                       sys_s_per_packet=(near["sys_s"] + far["sys_s"]) / n,
                       busy_cores=sent["busy_cores"])

        br_runs, ref_runs = run_abba(a.rounds, via_bridge_udp, client_alone)
        br, ref = [r.pps for r in br_runs], [r.pps for r in ref_runs]
        for p in udp_bridges:
            p.stop()

        # 2. wireguard-go standing in for the kernel: through the bridge vs direct.
        ia, ib = f"{lab.prefix}a", f"{lab.prefix}b"
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        start(lab, ha, ia, "wireguard-go", ka, tmp)
        start(lab, hb, ib, "wireguard-go", kb, tmp)
        link_up(lab, ha, ia, "10.90.0.1")
        link_up(lab, hb, ib, "10.90.0.2")
        wg_bridges, wg_eps = bridge_pair(PORT)

        def endpoints(eps: tuple[str, str]) -> None:
            lab.run(ha, ["wg", "set", ia, "peer", kb.public.b64(), "allowed-ips",
                         "10.90.0.2/32", "endpoint", eps[0]])
            lab.run(hb, ["wg", "set", ib, "peer", ka.public.b64(), "allowed-ips",
                         "10.90.0.1/32", "endpoint", eps[1]])

        def flood(eps: tuple[str, str]) -> float:
            """iperf3 UDP flood a -> b; datagrams per second that arrived."""
            endpoints(eps)
            got = iperf(lab, ha, hb, ia, "10.90.0.2", a.seconds, udp=True)["mbps"]
            return got * 1e6 / 8 / UDP_PAYLOAD

        via_wg = (wg_eps[0], wg_eps[1])
        direct = (f"{hb.ip}:{PORT}", f"{ha.ip}:{PORT}")
        endpoints(via_wg)
        lab.run(ha, ["ping", "-c", "2", "-W", "5", "10.90.0.2"])
        wg_br, wg_direct = run_abba(a.rounds, lambda: flood(via_wg), lambda: flood(direct))
        endpoints(via_wg)
        tcp = iperf(lab, ha, hb, ia, "10.90.0.2", a.seconds, udp=False)["mbps"]
        for p in wg_bridges:
            p.stop()
    med = statistics.median
    report.emit({"bench": "proxy_throughput", "rounds": a.rounds, "seconds": a.seconds,
                 "packet_bytes": PACKET, "window": a.window,
                 "blast_pps": None if a.window else a.blast_pps, "reference": REFERENCE,
                 "goal": 0.8,
                 "bridge_pps_runs": [round(x) for x in br],
                 "client_pps_runs": [round(x) for x in ref],
                 "bridge_mbps_median": round(med(br) * PACKET * 8 / 1e6, 1),
                 **round_ratios(br, ref),
                 "bridge_cpu_us_per_packet": [round(r.cpu_us, 2) for r in br_runs],
                 "client_cpu_us_per_packet": [round(r.cpu_us, 2) for r in ref_runs],
                 "bridge_sys_us_per_packet": [round(r.sys_s_per_packet * 1e6, 2)
                                              for r in br_runs],
                 "client_sys_us_per_packet": [round(r.sys_s_per_packet * 1e6, 2)
                                              for r in ref_runs],
                 **round_ratios([r.cpu_us for r in ref_runs], [r.cpu_us for r in br_runs],
                                "cpu_ratio"),
                 "standin_cpu_us_per_packet": [round(r.standin_cpu_us, 2) for r in br_runs],
                 "offered_per_delivered": {"bridge_runs": [round(r.offered, 2) for r in br_runs],
                                           "client_runs": [round(r.offered, 2) for r in ref_runs]},
                 "client_source_dropped": [round(r.source_dropped, 3) for r in ref_runs],
                 "standin_timed_out": [round(r.timed_out, 4) for r in br_runs],
                 "client_timed_out": [round(r.timed_out, 4) for r in ref_runs],
                 "faults_per_packet": {"bridge_runs": [round(r.faults, 3) for r in br_runs],
                                       "client_runs": [round(r.faults, 3) for r in ref_runs]},
                 "machine_busy_cores": {
                     "bridge_runs": [round(r.busy_cores, 2) for r in br_runs],
                     "client_runs": [round(r.busy_cores, 2) for r in ref_runs]},
                 "machine_us_per_packet": {
                     "bridge_runs": [round(r.busy_cores / r.pps * 1e6, 2) for r in br_runs],
                     "client_runs": [round(r.busy_cores / r.pps * 1e6, 2) for r in ref_runs]},
                 "relay_cpu_us_per_packet": {
                     "bridge_runs": [round(r.relay_cpu_us, 2) for r in br_runs],
                     "client_runs": [round(r.relay_cpu_us, 2) for r in ref_runs]},
                 "wg_bridge_pps_runs": [round(x) for x in wg_br],
                 "wg_direct_pps_runs": [round(x) for x in wg_direct],
                 **round_ratios(wg_br, wg_direct, "wg_bridge_of_direct_ratio"),
                 "wg_bridge_of_client": round(med(wg_br) / med(ref), 3),
                 "wg_bridge_tcp_mbps": tcp})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("bridge", "pump-sink", "pump-source",
                                              "udp-blast", "udp-count"):
        role(sys.argv[1:])
    else:
        main()
