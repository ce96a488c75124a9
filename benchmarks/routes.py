"""Subnet routes, router failover and mesh DNS (issue 15).

One lab: routers R and R2 on the LAN 198.18.0.0/24 with a plain host H that runs no
wgmesh, and client C that accepts routes (``tests/support/routetools.router_pair``, the
setup of the failover test). Four parts, run in this order:

* ``failover`` (cold): right after setup, kill -9 the primary router and time until a
  ping C sent *after the router was gone* is answered by H through the other router
  (``routetools.fail_over``: C pings every 50 ms); C has sent nothing through the
  standby yet. The killed router rejoins (``routetools.rejoin``); the other stays
  primary (no flap).
* ``throughput``: iperf3 TCP from C to H through the primary router, against iperf3 TCP
  from C to that router's own tunnel address: the same tunnel between the same two
  agents, without the router's forwarding, SNAT, filter and LAN hop. Rounds run the two
  in ABBA order; ``ratio`` = median of per-round ratios routed / to-the-router (target
  >= 0.9).
* ``dns``: the agent's own responder on R's tunnel address (``wgmesh.node.names``),
  A queries for a mesh name, built and checked with dnspython: ``dns_capacity`` is a
  closed loop on R with one query in flight from each of 32 loopback sources (trusted, as
  the node's own programs are; 32 sources so the per-source rate limit of 200 q/s does
  not bind), ``dns_tunnel`` paced queries from C through the tunnel (one source: kept
  under that limit), ``dns_forwarded`` the capacity loop for a name forwarded to R's
  previous resolver (a stub on H, ``tests/support/dnstools.py``; never a real server).
* ``failover`` (warm): ``--failovers`` more kills, each of the current primary, once the
  router killed before is back and C has reached it through the tunnel.
* ``uplink``: the primary's uplink taken down (the host lost, its agent alive but
  unreachable, so nothing closes its control stream): seconds until pings resume, or
  null if not within ``--uplink-cap``.

Control's stream keepalive is 2 s here (the default is 15 s).

Prints ONE JSON line (``_bench``): every run listed, ``load_start``/``load_end``.

    sudo .venv/bin/python benchmarks/routes.py [--seconds 5] [--rounds 6] [--failovers 5]
    sudo .venv/bin/python benchmarks/routes.py --backend kernel   # in a virtme-ng VM

The host kernel has no WireGuard, so ``--backend kernel`` boots one VM (as
``kernel_overhead.py`` does) and runs the throughput part there, under qemu TCG: the
ratio is what it measures; absolute Mbit/s are the emulator's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype

from _bench import Report, iperf_mbps, last_json, round_ratios, run_abba, run_in_vm, spread, tail

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT))  # routetools, dnstools, polling: as the tests use them

#: Loopback sources of the capacity loops: one query in flight from each.
DNS_SOURCES = [f"127.0.0.{i}" for i in range(2, 34)]
#: Queries per second from C through the tunnel: under the responder's per-source limit.
TUNNEL_RATE = 150.0
DNS_TIMEOUT = 1.0


def dns_load(server: str, name: str, expect: str, sources: list[str], seconds: float,
             rate: float) -> dict[str, Any]:
    """Query ``server``:53 for ``name`` A for ``seconds``: with ``rate`` 0 a closed loop
    (one query in flight per source socket), else ``rate`` queries/s from the first
    source ("" = let the kernel choose). A reply counts if it is NOERROR with ``expect``
    among its A records; a query unanswered after 1 s is lost."""
    query = dns.message.make_query(name, "A")
    socks = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if src:
            s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    pending: dict[tuple[int, int], float] = {}  # (socket, query id) -> sent at
    busy: set[int] = set()
    latencies: list[float] = []
    wrong = lost = sent = 0

    def send(i: int) -> None:
        nonlocal sent
        sent += 1
        query.id = sent & 0xFFFF
        pending[(i, query.id)] = time.monotonic()
        busy.add(i)
        socks[i].sendto(query.to_wire(), (server, 53))

    t0 = time.monotonic()
    end, next_send, last = t0 + seconds, t0, t0
    while True:
        now = time.monotonic()
        if now >= end and not pending:
            break
        if now < end:
            if rate:
                while next_send <= now:
                    send(0)
                    next_send += 1 / rate
            else:
                for i in range(len(socks)):
                    if i not in busy:
                        send(i)
        for key, at in list(pending.items()):
            if now - at > DNS_TIMEOUT:
                del pending[key]
                busy.discard(key[0])
                lost += 1
        for key, _ in sel.select(0.005):
            i = key.data
            while True:
                try:
                    wire = socks[i].recv(65535)
                except BlockingIOError:
                    break
                reply = dns.message.from_wire(wire)
                at = pending.pop((i, reply.id), None)
                if at is None:
                    continue
                last = time.monotonic()
                busy.discard(i)
                latencies.append(last - at)
                answers = [rd.address for rrset in reply.answer for rd in rrset
                           if rrset.rdtype == dns.rdatatype.A]
                if reply.rcode() != dns.rcode.NOERROR or expect not in answers:
                    wrong += 1
    for s in socks:
        s.close()
    elapsed = last - t0
    return {"qps": round((len(latencies) - wrong) / elapsed, 1), "sent": sent,
            "answered": len(latencies), "wrong": wrong, "lost": lost, "sources": len(socks),
            "seconds": round(elapsed, 2), **tail(latencies)}


def throughput(pair: Any, seconds: float, rounds: int) -> dict[str, Any]:
    from wgmesh.lab.network import TIME_SCALE

    lab, c = pair.mesh.lab, pair.c
    router = pair.primary()
    tunnel_ip = router.ipv4
    for ip in (tunnel_ip, pair.plain.ip):  # the tunnel's handshake before either side runs
        lab.run(c.host, ["ping", "-c", "1", "-W", str(int(10 * TIME_SCALE)), ip])
    routed, direct = run_abba(rounds, lambda: iperf_mbps(lab, c.host, pair.plain,
                                                         pair.plain.ip, seconds),
                              lambda: iperf_mbps(lab, c.host, router.host, tunnel_ip, seconds))
    peer = c.peer(router.name) or {}
    return {**round_ratios(routed, direct),
            "routed_mbps": round(statistics.median(routed), 1),
            "to_router_mbps": round(statistics.median(direct), 1),
            "routed_runs": [round(x, 1) for x in routed],
            "to_router_runs": [round(x, 1) for x in direct],
            "rounds": rounds, "seconds": seconds, "order": "ABBA, routed first",
            "tunnel_path": peer.get("path"), "tunnel_endpoint": peer.get("endpoint")}


def failover(pair: Any, runs: int) -> dict[str, Any]:
    """``runs`` kills of the primary, each with the standby warm: it rejoined after the
    previous kill and C has reached it through the tunnel since (``routetools.rejoin``)."""
    from routetools import fail_over, rejoin

    took = []
    for _ in range(runs):
        killed, seconds = fail_over(pair)
        took.append(seconds)
        rejoin(pair, killed)
    return {"failover_s": round(statistics.median(took), 2),
            "failover_runs": [round(x, 2) for x in took], "failover_spread": spread(took, 2)}


def cold_failover(pair: Any) -> dict[str, Any]:
    """One kill right after setup: C has sent nothing through the standby yet."""
    from routetools import fail_over, rejoin

    killed, seconds = fail_over(pair)
    rejoin(pair, killed)
    return {"failover_cold_s": round(seconds, 2)}


def uplink_failover(pair: Any, cap: float) -> dict[str, Any]:
    """The primary's uplink taken down (the host lost, its agent alive but unreachable):
    seconds until pings resume through the other router, None if not within ``cap``."""
    from routetools import fail_over

    try:
        _, seconds = fail_over(pair, cap, uplink=True)
    except AssertionError:
        return {"uplink_failover_s": None, "uplink_cap_s": cap}
    return {"uplink_failover_s": round(seconds, 2), "uplink_cap_s": cap}


def dns_part(pair: Any, seconds: float) -> dict[str, Any]:
    from dnstools import WWW_IP

    from wgmesh.node.dns import DnsResponder
    from wgmesh.node.names import DEFAULT_DOMAIN

    lab = pair.mesh.lab
    router = pair.primary()
    ip, c_ip = router.ipv4, pair.c.ipv4
    name = f"{pair.c.name}.{DEFAULT_DOMAIN}"

    def load(host: Any, qname: str, expect: str, sources: list[str],
             rate: float) -> dict[str, Any]:
        p = lab.python(host, __file__, "dnsload", ip, qname, expect, str(seconds), str(rate),
                       *sources)
        if p.wait(seconds * 3 + 60) != 0:
            raise SystemExit(f"dnsload failed: {p.stderr[-2000:]}")
        return last_json(p)

    capacity = load(router.host, name, c_ip, DNS_SOURCES, 0)
    tunnel = load(pair.c.host, name, c_ip, [""], TUNNEL_RATE)
    forwarded = load(router.host, "www.example.test", WWW_IP, DNS_SOURCES, 0)
    limit = inspect.signature(DnsResponder).parameters["rate"].default
    return {"dns_capacity": capacity, "dns_tunnel": {**tunnel, "rate": TUNNEL_RATE},
            "dns_forwarded": forwarded, "dns_rate_limit_per_source": limit}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from routetools import router_pair

    from wgmesh.lab import Lab
    from wgmesh.lab.network import TIME_SCALE

    parts = args.parts.split(",")
    result: dict[str, Any] = {"benchmark": "routes", "backend": args.backend, "parts": parts}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        def router_args(name: str) -> list[str]:
            """Each router's own resolv.conf (the agent rewrites it to point at itself),
            naming the plain host's stub as the resolver it had before."""
            conf = Path(tmp) / f"{name}.resolv.conf"
            conf.write_text("nameserver 198.18.0.10\n")
            return ["--dns-resolv-conf", str(conf)]

        print(f"lab {lab.prefix}: setting up", file=sys.stderr, flush=True)
        started = time.monotonic()
        pair = router_pair(lab, backend=args.backend, router_args=router_args,
                           timeout=40 * TIME_SCALE)
        result["setup_s"] = round(time.monotonic() - started, 1)
        if "failover" in parts:
            result.update(cold_failover(pair))
        if "throughput" in parts:
            result.update(throughput(pair, args.seconds, args.rounds))
        if "dns" in parts:
            lab.python(pair.plain, str(SUPPORT / "dnstools.py"), "upstream",
                       pair.plain.ip).wait_for_output("ready", timeout=30)
            result.update(dns_part(pair, args.dns_seconds))
        if "failover" in parts and args.failovers:
            result.update(failover(pair, args.failovers))
        if "uplink" in parts:  # last: the router stays cut off
            result.update(uplink_failover(pair, args.uplink_cap))
        result["control_keepalive_s"] = 2
        pair.mesh.close()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["where"] = ("virtme-ng VM, qemu TCG (no KVM)" if os.environ.get("WGMESH_IN_VM")
                       else "this kernel")
    return result


def main() -> int:
    if sys.argv[1:2] == ["dnsload"]:  # the load generator, run inside a lab host
        server, name, expect, seconds, rate, *sources = sys.argv[2:]
        print(json.dumps(dns_load(server, name, expect, sources, float(seconds),
                                  float(rate))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("userspace", "kernel"), default="userspace")
    ap.add_argument("--parts", help="comma-separated: throughput,failover,dns,uplink (default: all "
                    "on userspace, throughput on kernel)")
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per run")
    ap.add_argument("--rounds", type=int, default=6, help="routed/to-router rounds, ABBA")
    ap.add_argument("--failovers", type=int, default=5, help="router failover runs")
    ap.add_argument("--uplink-cap", type=float, default=30.0,
                    help="seconds to wait for a failover after the primary's uplink is cut")
    ap.add_argument("--dns-seconds", type=float, default=3.0, help="seconds per DNS load")
    ap.add_argument("--inside", action="store_true", help="measure here (used inside the VM)")
    args = ap.parse_args()
    args.parts = args.parts or ("throughput" if args.backend == "kernel"
                                else "throughput,failover,dns,uplink")
    if os.geteuid() != 0:
        raise SystemExit("needs root (lab namespaces)")
    report = Report()
    from wgmesh.wireguard.backend import kernel_wireguard_available

    if args.backend == "kernel" and not args.inside and not kernel_wireguard_available()[0]:
        return run_in_vm(__file__, ["--inside", "--backend", "kernel", "--parts", args.parts,
                                    "--seconds", str(args.seconds), "--rounds",
                                    str(args.rounds), "--failovers", str(args.failovers)],
                         report, "routes", timeout=2400)
    report.emit(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
