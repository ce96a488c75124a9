"""File-drop throughput over a wireguard-go tunnel against raw iperf3 TCP over the same tunnel.

Two lab hosts, one wireguard-go tunnel. Each round runs an iperf3 run and a
file drop (``wgmesh.cli.file send`` to a ``wgmesh.lab.dropd serve`` peer API,
fsync and digest checks on, as shipped), in ABBA order so both see the same
machine load. Prints one JSON line; ``ratio`` is the median of per-round ratios
drop / iperf3 (target >= 0.9). The payload is random, generated in /tmp and deleted.
Both run with 4 MiB default socket buffers (``_bench.socket_buffers``), as current
wireguard-go sizes its own.

    sudo .venv/bin/python benchmarks/file_drop.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import WG_SOCKET_BUFFERS, Report, proc_cpu_s, round_ratios, run_abba, socket_buffers
from wgmesh.lab import Lab, LabError
from wgmesh.lab.wg import wg_mesh

MiB = 1 << 20


def _iperf(lab: Lab, host: object, server_ip: str, seconds: int) -> tuple[float, int]:
    """iperf3's received rate (bytes/s) and bytes."""
    deadline = time.monotonic() + 10
    while True:  # the server may still be binding: retry, bounded
        cp = lab.run(host, ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"],  # type: ignore[arg-type]
                     check=False, timeout=seconds + 30)
        if cp.returncode == 0:
            got = json.loads(cp.stdout)["end"]["sum_received"]
            return float(got["bits_per_second"]) / 8, int(got["bytes"])
        if time.monotonic() > deadline:
            raise LabError(f"iperf3 failed: {cp.stdout[-300:]} {cp.stderr[-300:]}")
        time.sleep(0.2)


def _out_segs(lab: Lab, host: object) -> int:
    """TCP segments ``host`` has sent (its namespace's /proc/net/snmp ``OutSegs``): at the
    receiving end these are ACKs and window updates, each a packet through the tunnel."""
    rows = [r.split() for r in lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()  # type: ignore[arg-type]
            if r.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def _children_cpu_s() -> float:
    """CPU seconds of the children waited for so far (``lab.run``'s processes)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="payload size in MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iperf-seconds", type=int, default=3)
    a = ap.parse_args()
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="wgmesh-bench-drop-"))
    try:
        src = work / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(MiB))
        with socket_buffers(WG_SOCKET_BUFFERS), Lab() as lab:
            alice, bob = lab.add_public_host("alice"), lab.add_public_host("bob")
            wa, wb = wg_mesh(lab, [alice, bob])
            iperf_srv = lab.spawn(alice, ["iperf3", "-s", "-B", wa.ip])
            srv = lab.python(alice, "-m", "wgmesh.lab.dropd", "serve", "--interface", wa.ifname,
                             "--state-dir", str(work / "alice"), "--allow-all")
            srv.wait_for_output("listening", timeout=30)
            inbox = work / "alice" / "inbox"
            cpu = {"recv": 0.0, "wg": 0.0, "send": 0.0, "iperf3": 0.0, "wg_iperf3": 0.0}
            acks = {"drop": 0, "iperf3": 0}
            iperf_mib = 0.0
            wg_pids = [n.process.pid for n in (wa, wb) if n.process is not None]

            def iperf() -> float:
                nonlocal iperf_mib
                c0, w0 = _children_cpu_s() + proc_cpu_s(iperf_srv.pid), sum(map(proc_cpu_s, wg_pids))
                k0 = _out_segs(lab, alice)
                rate, moved = _iperf(lab, bob, wa.ip, a.iperf_seconds)
                acks["iperf3"] += _out_segs(lab, alice) - k0
                cpu["iperf3"] += _children_cpu_s() + proc_cpu_s(iperf_srv.pid) - c0
                cpu["wg_iperf3"] += sum(map(proc_cpu_s, wg_pids)) - w0
                iperf_mib += moved / MiB
                return rate
            hashing: list[float] = []

            def drop() -> float:
                c0 = proc_cpu_s(srv.pid)
                w0 = sum(map(proc_cpu_s, wg_pids))
                s0 = _children_cpu_s()
                k0 = _out_segs(lab, alice)
                cp = lab.run(bob, [sys.executable, "-m", "wgmesh.cli.file", "send",
                                   wa.ip, str(src), "--json"], timeout=600)
                cpu["recv"] += proc_cpu_s(srv.pid) - c0
                cpu["wg"] += sum(map(proc_cpu_s, wg_pids)) - w0
                cpu["send"] += _children_cpu_s() - s0  # the sending process, waited for
                acks["drop"] += _out_segs(lab, alice) - k0
                r = json.loads(cp.stdout)
                (inbox / r["name"]).unlink()
                hashing.append(float(r["hash_seconds"]))
                return float(r["size"] / r["seconds"])

            iperfs, drops = run_abba(a.rounds, iperf, drop)
        drop_bps, iperf_bps = statistics.median(drops), statistics.median(iperfs)
        report.emit({
            "bench": "file_drop", "backend": "wireguard-go", "bytes": a.mib * MiB,
            "default_socket_buffers": WG_SOCKET_BUFFERS,
            "rounds": a.rounds, "drop_MBps": round(drop_bps / 1e6, 1),
            "iperf3_MBps": round(iperf_bps / 1e6, 1), **round_ratios(drops, iperfs),
            # CPU per MiB moved: what the receiver costs next to the tunnel itself.
            "receiver_cpu_ms_per_MiB": round(1000 * cpu["recv"] / (a.rounds * a.mib), 2),
            "sender_cpu_ms_per_MiB": round(1000 * cpu["send"] / (a.rounds * a.mib), 2),
            "wireguard_go_cpu_ms_per_MiB": round(1000 * cpu["wg"] / (a.rounds * a.mib), 2),
            # The reference's side of the same accounting (the tunnel's CPU includes the
            # iperf3 client's connection setup and the end of its run).
            "iperf3_cpu_ms_per_MiB": round(1000 * cpu["iperf3"] / iperf_mib, 2),
            "wireguard_go_cpu_ms_per_MiB_iperf3": round(1000 * cpu["wg_iperf3"] / iperf_mib, 2),
            "receiver_segments_per_MiB": round(acks["drop"] / (a.rounds * a.mib), 1),
            "receiver_segments_per_MiB_iperf3": round(acks["iperf3"] / iperf_mib, 1),
            "drop_runs_MBps": [round(x / 1e6, 1) for x in drops],
            # Time the sender hashed before its first byte went out (it hashes as it streams
            # and names the digest in the commit, so 0 unless it resumed).
            "sender_hash_s_runs": [round(x, 3) for x in hashing],
            "iperf3_runs_MBps": [round(x / 1e6, 1) for x in iperfs]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
