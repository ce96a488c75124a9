"""Kernel fast path: does wgmesh's configuration cost any throughput? And the relay bridge?

Two public lab hosts, one kernel WireGuard tunnel between them, iperf3 (TCP) through it:

* ``hand``: the tunnel set up with ``ip`` and ``wg``, the reference;
* ``wgmesh``: the same tunnel set up by :class:`wgmesh.wireguard.kernel.KernelBackend`;
* ``relay``: the wgmesh tunnel with both endpoints on the relay bridge (loopback UDP
  endpoints, a TCP pipe between the two bridges, Python moving every packet).

Rounds run hand/wgmesh in ABBA order (``_bench``). One JSON line: ``ratio`` is the
median of per-round ratios wgmesh / hand (the two runs of a round are adjacent in
time; target >= 0.98), ``round_ratios`` every round's, ``ratio_spread`` their
[min, max]; ``relay_ratio`` = relay / median wgmesh. ``load_start``/``load_end`` are
the host's; the VM's own are ``vm_load_start``/``vm_load_end``.

What the ratio can detect: a tunnel that wgmesh *configures* differently from the
hand-made one in a way that costs throughput (MTU, addresses, allowed IPs, endpoint,
listen port), by more than the round-to-round spread. What it cannot: anything in
the data path (once configured both tunnels are the same kernel code), the CPU of a
running wgmesh agent (only ``KernelBackend`` runs here, not the agent), differences
smaller than the spread, or line-rate effects (qemu TCG emulates every ChaCha20
instruction, so throughput is a few tens of Mbit/s and CPU-bound in the VM).

The host kernel has no WireGuard, so run on the host it boots one virtme-ng VM
(as the kernel test tier does) and runs itself inside::

    sudo .venv/bin/python benchmarks/kernel_overhead.py [--seconds 4] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _bench import Report, iperf_mbps, round_ratios, run_abba, run_in_vm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))  # bridgetools, vmtier: as the tests use

A_IP, B_IP = "100.64.0.1", "100.64.0.2"
_T0 = time.monotonic()


def note(what: str) -> None:
    """Progress on stderr (inside the VM it lands in a file the host can watch)."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {what}", file=sys.stderr, flush=True)
PORT_A, PORT_B = 51820, 51821


def by_hand(lab, a, b, ka, kb) -> None:  # type: ignore[no-untyped-def]
    for host, key, port, ip, peer, peer_host, peer_port, peer_ip in (
            (a, ka, PORT_A, A_IP, kb, b, PORT_B, B_IP),
            (b, kb, PORT_B, B_IP, ka, a, PORT_A, A_IP)):
        lab.run(host, ["ip", "link", "add", "wg0", "type", "wireguard"])
        lab.run(host, ["wg", "set", "wg0", "private-key", "/dev/stdin", "listen-port", str(port),
                       "peer", peer.public.b64(), "endpoint", f"{peer_host.ip}:{peer_port}",
                       "allowed-ips", f"{peer_ip}/32"], input=key.b64())
        lab.run(host, ["ip", "addr", "add", f"{ip}/24", "dev", "wg0"])
        lab.run(host, ["ip", "link", "set", "wg0", "mtu", "1420", "up"])


def with_wgmesh(a, b, ka, kb, endpoints=None):  # type: ignore[no-untyped-def]
    from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig
    from wgmesh.wireguard.kernel import KernelBackend

    ep_b, ep_a = endpoints or ((b.ip, PORT_B), (a.ip, PORT_A))
    wa, wb = KernelBackend("wg0", netns=a.ns), KernelBackend("wg0", netns=b.ns)
    wa.up(InterfaceConfig("wg0", ka, listen_port=PORT_A, addresses=[f"{A_IP}/24"]))
    wb.up(InterfaceConfig("wg0", kb, listen_port=PORT_B, addresses=[f"{B_IP}/24"]))
    wa.set_peers([PeerConfig(kb.public, [f"{B_IP}/32"], ep_b)])
    wb.set_peers([PeerConfig(ka.public, [f"{A_IP}/32"], ep_a)])
    return wa, wb


def teardown(lab, a, b) -> None:  # type: ignore[no-untyped-def]
    for h in (a, b):
        lab.run(h, ["ip", "link", "del", "wg0"], check=False)


def measure(seconds: float, rounds: int) -> dict[str, object]:
    from bridgetools import BridgePair

    from wgmesh.keys import PrivateKey
    from wgmesh.lab import Lab

    note("imports done")
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    relay = []
    with Lab() as lab:
        a, b = lab.add_public_host("a"), lab.add_public_host("b")

        def run(how: str) -> float:
            """One iperf3 run through a tunnel set up ``how``, torn down after."""
            if how == "hand":
                by_hand(lab, a, b, ka, kb)
            else:
                wa, wb = with_wgmesh(a, b, ka, kb)
            try:
                lab.run(a, ["ping", "-c", "1", "-W", "10", B_IP])
                mbps = iperf_mbps(lab, a, b, B_IP, seconds)
            finally:
                if how == "hand":
                    teardown(lab, a, b)
                else:
                    wa.down()
                    wb.down()
            note(f"{how}: {mbps:.0f} Mbit/s")
            return mbps

        hand, mesh = run_abba(rounds, lambda: run("hand"), lambda: run("wgmesh"))
        with BridgePair(a.ns, PORT_A, ka.public, b.ns, PORT_B, kb.public, b.ip) as pair:
            eps = (pair.a.add(kb.public), pair.b.add(ka.public))
            wa, wb = with_wgmesh(a, b, ka, kb, eps)
            try:
                lab.run(a, ["ping", "-c", "1", "-W", "10", B_IP])
                relay.append(iperf_mbps(lab, a, b, B_IP, seconds))
                note(f"relay bridge: {relay[-1]:.0f} Mbit/s")
                relayed = pair.a.counters(kb.public).to_relay
            finally:
                wa.down()
                wb.down()
    h, m, r = (statistics.median(x) for x in (hand, mesh, relay))
    return {"benchmark": "kernel_overhead", **round_ratios(mesh, hand),
            "wgmesh_mbps": round(m, 1), "hand_mbps": round(h, 1),
            "relay_mbps": round(r, 1), "relay_ratio": round(r / m, 3),
            "relay_packets": relayed, "rounds": rounds, "seconds": seconds,
            "hand_runs": [round(x, 1) for x in hand], "wgmesh_runs": [round(x, 1) for x in mesh],
            "where": "virtme-ng VM, qemu TCG (no KVM)" if os.environ.get("WGMESH_IN_VM")
            else "this kernel"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="iperf3 time per run")
    ap.add_argument("--rounds", type=int, default=4, help="hand/wgmesh rounds, ABBA order")
    ap.add_argument("--inside", action="store_true", help="measure here (used inside the VM)")
    args = ap.parse_args()
    report = Report()
    sys.path.insert(0, str(ROOT / "src"))
    from wgmesh.wireguard.backend import kernel_wireguard_available

    if not args.inside and not kernel_wireguard_available()[0]:
        return run_in_vm(__file__, ["--inside", "--seconds", str(args.seconds),
                                    "--rounds", str(args.rounds)], report, "kernel_overhead")
    started = time.monotonic()
    result = measure(args.seconds, args.rounds)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    report.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
