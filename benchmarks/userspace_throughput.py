"""Throughput of the tunnel: wgmesh userspace <-> wgmesh vs wireguard-go <-> wireguard-go.

The same implementation at both ends, configured with the stock ``wg`` tool;
iperf3 TCP and UDP through the tunnel, in two topologies (``--topology``, default
both): ``two-host`` (two lab hosts on one bridge) and ``one-ns`` (both UDP sockets
in one namespace over loopback, the TUN interfaces moved into two others, as in
WireGuard's own selftests). Prints ONE JSON line with, per topology, implementation
and protocol, the median over rounds of Mbit/s (what iperf3 received) and
packets/s (entering the sender's tunnel); ``ratio`` = the median of per-round
ratios wgmesh TCP / wireguard-go TCP, ``udp_ratio`` the same for UDP, each with
every round's ratio and their spread.

    sudo .venv/bin/python benchmarks/userspace_throughput.py [--seconds 5] [--rounds 4] \
        [--topology two-host] [--topology one-ns]

Rounds run the two implementations in ABBA order (see ``_bench``). The reference is
whatever ``wireguard-go`` is installed (Debian's is v0.0.20220316); its version and
the offloads it lacks against current wireguard-go are part of the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import WG_SOCKET_BUFFERS, Report, round_ratios, run_abba, socket_buffers
from wgmesh.keys import PrivateKey
from wgmesh.lab import Host, Lab

ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
PORT = 51820
TOPOLOGIES = ("two-host", "one-ns")


def start(lab: Lab, host: Host, ifname: str, impl: str, key: PrivateKey, tmp: Path,
          port: int = PORT) -> None:
    """Start ``impl`` on ``host`` and give it its key and port with the stock ``wg``."""
    argv = ([sys.executable, "-m", "wgmesh", "userspace", "--foreground", ifname]
            if impl == "wgmesh" else ["wireguard-go", "-f", ifname])
    proc = lab.spawn(host, argv, env=ENV)
    deadline = time.monotonic() + 30
    while not Path(f"/var/run/wireguard/{ifname}.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{impl} did not start: {proc.stderr[-500:]}")
        time.sleep(0.05)
    kf = tmp / f"{ifname}.key"
    kf.write_text(key.b64())
    kf.chmod(0o600)
    lab.run(host, ["wg", "set", ifname, "listen-port", str(port), "private-key", str(kf)])


def link_up(lab: Lab, host: Host, ifname: str, addr: str) -> None:
    lab.run(host, ["ip", "addr", "add", f"{addr}/24", "dev", ifname])
    lab.run(host, ["ip", "link", "set", ifname, "mtu", "1420", "up"])


def tx_packets(lab: Lab, host: Host, ifname: str) -> int:
    """Packets the kernel handed to the sender's tunnel (one per IP packet: the receiving
    side may merge TCP segments into one TUN write, so its rx count would undercount)."""
    return int(lab.run(host, ["cat", f"/sys/class/net/{ifname}/statistics/tx_packets"]).stdout)


def iperf(lab: Lab, client: Host, server: Host, ifname: str, dst: str, seconds: float,
          udp: bool) -> dict[str, float]:
    """iperf3 from ``client`` to ``server``; ``ifname`` is the client's tunnel."""
    srv = lab.spawn(server, ["iperf3", "-s", "-1", "-B", dst])
    time.sleep(0.3)  # iperf3 has no readiness signal; the client retries below anyway
    argv = ["iperf3", "-c", dst, "-t", str(seconds), "-J"]
    if udp:
        argv += ["-u", "-b", "0", "-l", "1372"]  # 1372 + 28 = 1400 fits the 1420 tunnel MTU
    before, t0 = tx_packets(lab, client, ifname), time.monotonic()
    for _ in range(5):
        r = lab.run(client, argv, check=False, timeout=seconds + 30)
        if r.returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    elapsed = time.monotonic() - t0
    pkts = tx_packets(lab, client, ifname) - before
    srv.stop()
    end = json.loads(r.stdout)["end"]
    summary = end["sum_received"]  # what arrived, not what the sender offered
    out = {"mbps": round(summary["bits_per_second"] / 1e6, 1),
           "pps": round(pkts / min(elapsed, seconds + 1))}
    if udp:
        out["loss_percent"] = round(end["sum"].get("lost_percent", 0.0), 1)
    return out


def run_pair(impl: str, seconds: float, topology: str) -> dict[str, dict[str, float]]:
    """One round of ``impl`` in ``topology``:

    * ``two-host``: each device in its own host, UDP between them over the lab's
      bridge (veth pairs), as two machines on one LAN;
    * ``one-ns``: both devices' UDP sockets in one namespace, talking over loopback,
      their TUN interfaces moved into two other namespaces (WireGuard's own
      selftests, ``netns.sh``): no veth or bridge in the path.
    """
    with Lab() as lab, tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        a, b = lab.add_public_host("a"), lab.add_public_host("b")
        ia, ib = f"{lab.prefix}a", f"{lab.prefix}b"
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        if topology == "two-host":
            start(lab, a, ia, impl, ka, tmp)
            start(lab, b, ib, impl, kb, tmp)
            endpoint = f"{b.ip}:{PORT}"
        else:
            wire = lab.add_public_host("wire")
            start(lab, wire, ia, impl, ka, tmp, PORT)
            start(lab, wire, ib, impl, kb, tmp, PORT + 1)
            lab.run(wire, ["ip", "link", "set", ia, "netns", a.ns])
            lab.run(wire, ["ip", "link", "set", ib, "netns", b.ns])
            endpoint = f"127.0.0.1:{PORT + 1}"
        link_up(lab, a, ia, "10.90.0.1")
        link_up(lab, b, ib, "10.90.0.2")
        lab.run(a, ["wg", "set", ia, "peer", kb.public.b64(), "allowed-ips", "10.90.0.2/32",
                    "endpoint", endpoint])
        lab.run(b, ["wg", "set", ib, "peer", ka.public.b64(), "allowed-ips", "10.90.0.1/32"])
        lab.run(a, ["ping", "-c", "2", "-W", "5", "10.90.0.2"])
        tcp = iperf(lab, a, b, ia, "10.90.0.2", seconds, udp=False)
        tcp["udp_rcvbuf_errors"] = rcvbuf_errors(lab)
        udp = iperf(lab, a, b, ia, "10.90.0.2", seconds, udp=True)
        return {"tcp": tcp, "udp": udp}


def rcvbuf_errors(lab: Lab) -> int:
    """Datagrams the lab's UDP sockets dropped for a full receive buffer (the namespaces
    are new each round, so the counters start at zero)."""
    total = 0
    for host in lab.hosts.values():
        out = lab.run(host, ["nstat", "-az", "UdpRcvbufErrors", "Udp6RcvbufErrors"]).stdout
        total += sum(int(line.split()[1]) for line in out.splitlines()[1:] if line.strip())
    return total


# What wireguard-go releases added to the data path: an older reference lacks it.
OFFLOADS = (((0, 0, 20230223), "TUN TCP segmentation/receive offload (TSO/GRO), batched UDP I/O"),
            ((0, 0, 20231211), "UDP GSO/GRO on the socket and the TUN device"))


def reference() -> dict[str, object]:
    """The installed wireguard-go's version, and the data-path offloads it predates."""
    out = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    have = tuple(map(int, m.groups())) if m else (0, 0, 0)
    return {"version": m.group(0) if m else "unknown",
            "missing_offloads": [what for release, what in OFFLOADS if have < release]}


def summary(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per protocol, the median over rounds of each figure."""
    return {proto: {k: round(statistics.median(r[proto][k] for r in runs), 1)
                    for k in runs[0][proto]} for proto in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds of both implementations, in ABBA order")
    ap.add_argument("--topology", choices=TOPOLOGIES, action="append",
                    help="two-host and/or one-ns (default: both, one after the other)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (lab namespaces)")
    report = Report()
    res: dict[str, object] = {"bench": "userspace_throughput", "rounds": args.rounds,
                              "seconds": args.seconds, "order": "ABBA, wgmesh first",
                              "reference": reference(), "default_socket_buffers": WG_SOCKET_BUFFERS}
    for topology in args.topology or TOPOLOGIES:
        with socket_buffers(WG_SOCKET_BUFFERS):
            mesh, ref = run_abba(args.rounds,
                                 lambda t=topology: run_pair("wgmesh", args.seconds, t),
                                 lambda t=topology: run_pair("wireguard-go", args.seconds, t))
        out: dict[str, object] = {"wgmesh": summary(mesh), "wireguard-go": summary(ref)}
        for proto in ("tcp", "udp"):
            a, b = ([r[proto]["mbps"] for r in runs] for runs in (mesh, ref))
            out[f"{proto}_mbps_rounds"] = {"wgmesh": a, "wireguard-go": b}
            out.update(round_ratios(a, b, "ratio" if proto == "tcp" else "udp_ratio"))
        res[topology] = out
    report.emit(res)


if __name__ == "__main__":
    main()
