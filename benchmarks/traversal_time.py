"""Time from relayed to direct, through real lab NATs, with the production traversal.

Each run starts two fresh nodes (``python -m wgmesh.lab.traversal``: the real
Traversal over a UDP port, the real relay for call-me-maybe) behind their own NATs
and measures, on the shared wall clock:

* ``t_relay_s``: node start -> connected to the relay (the first-packet path),
  STUN included;
* ``t_direct_s``: the later node on the relay -> both sides direct;
* ``t_recover_s``: a's NAT reboots (mappings flushed, a new port from then on) ->
  both sides direct again (via relay, re-STUN and call-me-maybe in between).

Reference, same runs: the least a coordinated punch can take, one relay round trip
(call-me-maybe) plus one direct disco round trip (ping/pong). ``ratio`` =
median ``t_direct_s`` / median reference.

``pairs``: per NAT pair (``a:b`` as spelled on the command line, ``symmetric+pcp``
with a port-mapping router whose node maps its port, as a Node does), the
fraction of runs that ended direct, the median time to direct and the same
runs' median relay round trip. Prints one JSON line. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import Report
from wgmesh.keys import PrivateKey
from wgmesh.lab import Host, Lab, Process


def _events(p: Process) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]


def _reboot_nat(lab: Lab, host: Host) -> float:
    """The router forgets every mapping and maps to other ports from now on."""
    assert host.nat is not None
    lab.run(host.nat, ["iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-o", "eth0", "-p",
                       "udp", "-j", "MASQUERADE", "--to-ports", "50000-50100"])
    host.nat.flush()
    return time.time()


#: (a, b, seconds a run may take): the port-mapping cases, and the pair that must stay
#: relayed without them.
PORTMAP_PAIRS = (("symmetric+pcp", "symmetric", 40), ("symmetric+natpmp", "symmetric", 40),
                 ("symmetric+upnp", "symmetric", 40), ("symmetric", "symmetric", 12))


def run_pair(lab: Lab, tmp: Path, relay: str, stun: list[str], kind_a: str, kind_b: str,
             tag: str, reboot: bool = False, duration: float = 40) -> dict[str, Any]:
    hosts = [lab.add_node_host(f"{tag}a", kind_a), lab.add_node_host(f"{tag}b", kind_b)]
    keys = []
    for side in "ab":
        node, dk = PrivateKey.generate(), PrivateKey.generate()
        node.save(tmp / f"{tag}{side}.key")
        dk.save(tmp / f"{tag}{side}.disco")
        keys.append((node.public.b64(), dk.public.b64()))
    procs = []
    for i, (side, host) in enumerate(zip("ab", hosts, strict=True)):
        stun_args = [x for s in stun for x in ("--stun", s)]
        if host.nat is not None and host.nat.portmap:
            stun_args.append("--portmap")
        procs.append(lab.python(
            host, "-m", "wgmesh.lab.traversal", "--key-file", str(tmp / f"{tag}{side}.key"),
            "--disco-key-file", str(tmp / f"{tag}{side}.disco"), "--peer", keys[1 - i][0],
            "--peer-disco", keys[1 - i][1], "--relay", relay, *stun_args,
            "--duration", str(duration), "--exit-after-direct", "0.3",
            "--directs", "2" if reboot else "1"))
    t_reboot = None
    if reboot:
        deadline = time.monotonic() + 20
        while not all(any(e["event"] == "path" for e in _events(p)) for p in procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        t_reboot = _reboot_nat(lab, hosts[0])
    evs = []
    for p in procs:
        p.wait(timeout=90)
        evs.append(_events(p))
    if t_reboot is not None:
        again = [[e["wall"] for e in ev if e["event"] == "path" and e["path"] == "direct"
                  and e["wall"] > t_reboot] for ev in evs]
        return {"t_recover_s": max(a[-1] for a in again) - t_reboot} if all(again) else {}
    relay_up = [next(e for e in ev if e["event"] == "relay") for ev in evs]
    direct = [next((e for e in ev if e["event"] == "path" and e["path"] == "direct"), None)
              for ev in evs]
    out: dict[str, Any] = {"t_relay_s": max(r["t"] for r in relay_up),
                           "relay_rtt_s": statistics.median(r["rtt"] for r in relay_up)}
    if not all(direct):  # say why on stderr; stdout stays one JSON line
        print(json.dumps({"miss": tag, "final": [ev[-1] for ev in evs]}), file=sys.stderr)
    else:
        out["t_direct_s"] = (max(d["wall"] for d in direct if d)
                             - max(r["wall"] for r in relay_up))
        out["disco_rtt_s"] = statistics.median(d["rtt"] for d in direct if d)
    return out


def _pair_summary(pair: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fraction direct, median time to direct and the same runs' relay round trip."""
    t = [r["t_direct_s"] for r in runs if "t_direct_s" in r]
    rtt = [r["relay_rtt_s"] for r in runs if "relay_rtt_s" in r]
    return {"pair": pair, "direct": f"{len(t)}/{len(runs)}",
            "fraction_direct": round(len(t) / len(runs), 2) if runs else None,
            "t_direct_median_s": round(statistics.median(t), 3) if t else None,
            "relay_rtt_median_ms": round(statistics.median(rtt) * 1e3, 2) if rtt else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hard-runs", type=int, default=3, help="eim x symmetric runs")
    ap.add_argument("--reboot-runs", type=int, default=3, help="NAT reboot recovery runs")
    ap.add_argument("--portmap-runs", type=int, default=3,
                    help="runs of each port-mapping pair (and of symmetric x symmetric)")
    a = ap.parse_args()
    report = Report()
    with Lab() as lab, tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        relay, stun2 = lab.add_public_host("relay"), lab.add_public_host("stun2")
        for i, h in enumerate((relay, stun2)):
            lab.python(h, "-m", "wgmesh", "relay", "serve", "--listen", f"{h.ip}:3340",
                       "--key-file", str(tmp / f"relay{i}.key")).wait_for_output(
                '"listening"', timeout=30)
        url, stun = f"http://{relay.ip}:3340", [f"{relay.ip}:3478", f"{stun2.ip}:3478"]
        easy = [run_pair(lab, tmp, url, stun, "eim", "eim", f"e{i}") for i in range(a.runs)]
        hard = [run_pair(lab, tmp, url, stun, "eim", "symmetric", f"h{i}")
                for i in range(a.hard_runs)]
        reboot = [run_pair(lab, tmp, url, stun, "eim", "eim", f"r{i}", reboot=True)
                  for i in range(a.reboot_runs)]
        mapped = {f"{ka}:{kb}": [run_pair(lab, tmp, url, stun, ka, kb, f"m{j}{i}",
                                          duration=limit) for i in range(a.portmap_runs)]
                  for j, (ka, kb, limit) in enumerate(PORTMAP_PAIRS)}
    direct = [r["t_direct_s"] for r in easy if "t_direct_s" in r]
    ref = [r["relay_rtt_s"] + r["disco_rtt_s"] for r in easy if "disco_rtt_s" in r]
    hard_t = [r["t_direct_s"] for r in hard if "t_direct_s" in r]
    rec = [r["t_recover_s"] for r in reboot if "t_recover_s" in r]
    med = statistics.median
    report.emit({
        "bench": "traversal_time", "runs": a.runs,
        "eim_eim_direct": f"{len(direct)}/{len(easy)}",
        "t_direct_s": round(med(direct), 4) if direct else None,
        "t_relay_s": round(med(r["t_relay_s"] for r in easy), 4),
        "reference_s": round(med(ref), 6) if ref else None,
        "ratio": round(med(direct) / med(ref), 1) if direct and ref else None,
        "eim_symmetric_direct": f"{len(hard_t)}/{len(hard)}",
        "t_direct_eim_symmetric_s": round(med(hard_t), 2) if hard_t else None,
        "t_direct_eim_symmetric_runs_s": [round(t, 2) for t in hard_t],
        "nat_reboot_recovered": f"{len(rec)}/{len(reboot)}",
        "t_recover_s": round(med(rec), 2) if rec else None,
        "pairs": [_pair_summary("eim:eim", easy), _pair_summary("eim:symmetric", hard),
                  *(_pair_summary(k, v) for k, v in mapped.items())],
        "target_direct_s": 2.0, "target_first_packet_s": 1.0, "target_recover_s": 10.0,
    })


if __name__ == "__main__":
    sys.exit(main())
