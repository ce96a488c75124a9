"""The production traversal through real NATs: two nodes start relayed (the real
relay carries call-me-maybe) and go direct by disco wherever the NATs allow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from polling import wait_for

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Host, Lab, Process

pytestmark = pytest.mark.netns


def events(p: Process) -> list[dict]:
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def pair(lab: Lab, tmp: Path, kind_a: str, kind_b: str, duration: float,
         *extra: str, hosts: list[Host] | None = None) -> tuple[Process, Process, Host, Host]:
    relay, stun2 = lab.add_public_host("relay"), lab.add_public_host("stun2")
    for i, h in enumerate((relay, stun2)):  # stun2: a second STUN server tells a hard NAT
        lab.python(h, "-m", "wgmesh", "relay", "serve", "--listen", f"{h.ip}:3340",
                   "--key-file", str(tmp / f"relay{i}.key")).wait_for_output(
            '"listening"', timeout=30)
    hosts = hosts or [lab.add_node_host("a", kind_a), lab.add_node_host("b", kind_b)]
    keys = []
    for name in ("a", "b"):
        node, dk = PrivateKey.generate(), PrivateKey.generate()
        node.save(tmp / f"{name}.key")
        dk.save(tmp / f"{name}.disco")
        keys.append((node.public, dk.public))
    procs = []
    for i, (name, host) in enumerate(zip(("a", "b"), hosts, strict=True)):
        peer = keys[1 - i]
        procs.append(lab.python(
            host, "-m", "wgmesh.lab.traversal", "--key-file", str(tmp / f"{name}.key"),
            "--disco-key-file", str(tmp / f"{name}.disco"), "--peer", peer[0].b64(),
            "--peer-disco", peer[1].b64(), "--relay", f"http://{relay.ip}:3340",
            "--stun", f"{relay.ip}:3478", "--stun", f"{stun2.ip}:3478",
            "--duration", str(duration), *extra))
    return procs[0], procs[1], hosts[0], hosts[1]


def finish(p: Process) -> dict:
    p.wait(timeout=60)
    final = [e for e in events(p) if e["event"] == "final"]
    assert final, p.stderr[-3000:]
    return final[0]


def test_eim_pair_goes_from_relay_to_direct(lab: Lab, tmp_path: Path) -> None:
    a, b, ha, hb = pair(lab, tmp_path, "eim", "eim", 10, "--exit-after-direct", "4")
    fa, fb = finish(a), finish(b)
    assert fa["path"] == "direct" and fb["path"] == "direct", (fa, fb)
    assert ha.nat is not None and hb.nat is not None
    assert fa["endpoint"] == [hb.nat.ip, 41641] and fb["endpoint"] == [ha.nat.ip, 41641]
    for p in (a, b):
        ev = events(p)
        relay_up = next(e["t"] for e in ev if e["event"] == "relay")
        direct = next(e["t"] for e in ev if e["event"] == "path" and e["path"] == "direct")
        assert direct - relay_up < 2.0  # call-me-maybe made both sides punch at once
        assert not next(e for e in ev if e["event"] == "netcheck")["hard_nat"]
    assert fa["counters"].get("round_cmm", 0) + fb["counters"].get("round_cmm", 0) >= 1


def test_symmetric_pair_stays_relayed(lab: Lab, tmp_path: Path) -> None:
    a, b, _ha, _hb = pair(lab, tmp_path, "symmetric", "symmetric", 9)
    fa, fb = finish(a), finish(b)
    assert fa["path"] == "relay" and fb["path"] == "relay"
    for p in (a, b):
        ev = events(p)
        assert next(e for e in ev if e["event"] == "netcheck")["hard_nat"] is True
        assert not [e for e in ev if e["event"] == "path"]
    assert fa["counters"].get("search_started", 0) == 0  # both hard: no port search


def test_port_search_through_a_real_symmetric_nat(lab: Lab, tmp_path: Path) -> None:
    """eim x symmetric: the birthday search (512 ports so a miss is ~0.03%) goes direct."""
    a, b, _ha, hb = pair(lab, tmp_path, "eim", "symmetric", 30, "--search-ports", "512",
                         "--exit-after-direct", "3")
    fa, fb = finish(a), finish(b)
    assert fa["path"] == "direct" and fb["path"] == "direct", (fa, fb)
    # The search made the path: a probed b's NAT, b opened ports aimed at a. Which side's
    # packet gets through first is timing: a probe that reaches a port of b's before b's
    # mapping exists is lost, but it opened a's filter for that port, so b's next ping
    # from it gets in (seen under load: no search_hit on a). Either way both halves ran.
    ca, cb = fa["counters"], fb["counters"]
    assert ca["search_started"] >= 1 and ca["search_probes"] >= 1, ca
    assert cb["search_ports_opened"] >= 1, cb
    assert ca.get("search_hit", 0) <= 1, ca
    assert hb.nat is not None and fa["endpoint"][0] == hb.nat.ip
    direct = next(e["t"] for e in events(a) if e["event"] == "path")
    relay_up = next(e["t"] for e in events(a) if e["event"] == "relay")
    assert direct - relay_up < 5 + 20 + 2


def test_nat_reboot_with_a_new_port_recovers_within_ten_seconds(lab: Lab, tmp_path: Path
                                                                ) -> None:
    """a's router forgets every mapping and maps a to another port from now on."""
    a, b, ha, _hb = pair(lab, tmp_path, "eim", "eim", 30, "--exit-after-direct", "1",
                         "--directs", "2")
    wait_for(lambda: any(e["event"] == "path" for e in events(b)), 15,
             lambda: f"b's first path: {b.stdout}{b.stderr[-2000:]}")
    assert ha.nat is not None
    lab.run(ha.nat, ["iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-o", "eth0", "-p",
                     "udp", "-j", "MASQUERADE", "--to-ports", "50000-50100"])
    ha.nat.flush()
    t_flush = time.time()
    finish(a), finish(b)
    for p in (a, b):
        after = [e for e in events(p) if e["event"] == "path" and e["wall"] > t_flush]
        assert [e["path"] for e in after][-1:] == ["direct"], after
        back = after[-1]["wall"] - t_flush
        assert back <= 10.0, back
    moved = [e for e in events(b) if e["event"] == "path" and e["wall"] > t_flush][-1]
    assert moved["endpoint"][0] == ha.nat.ip and 50000 <= moved["endpoint"][1] <= 50100


def test_same_lan_prefers_the_lan_path_over_a_hairpinned_one(lab: Lab, tmp_path: Path) -> None:
    """Both the LAN and the router's hairpin work; the LAN address wins."""
    router = lab.add_nat("home", "eim", hairpin=True)
    hosts = [lab.add_host("a", router), lab.add_host("b", router)]
    a, b, ha, hb = pair(lab, tmp_path, "", "", 10, "--exit-after-direct", "3", hosts=hosts)
    fa, fb = finish(a), finish(b)
    assert fa["path"] == "direct" and fb["path"] == "direct", (fa, fb)
    assert fa["endpoint"][0] == hb.ip and fb["endpoint"][0] == ha.ip
