"""NetcheckProbe on canned STUN replies (unit), and `wgmesh netcheck` against real
coturn and the relay's STUN responder behind real NATs (netns)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from systools import need

from wgmesh import stun
from wgmesh.cli.netcheck import format_report
from wgmesh.lab.network import Host, Lab
from wgmesh.netmap import RelayMap, RelayNode, RelayRegion
from wgmesh.node.netcheck import (
    NetcheckProbe,
    NetcheckReport,
    StunServer,
    classic_nat_type,
    local_addresses,
    netcheck,
    servers_from_relay_map,
)

S1 = StunServer(("203.0.113.10", 3478), 1, "one")
S2 = StunServer(("203.0.113.11", 3478), 2, "two")
S6 = StunServer(("2001:db8:203::a", 3478), 1, "one")


def reply(req: bytes, seen: tuple[str, int]) -> bytes:
    out = stun.binding_response(req, seen)
    assert out is not None
    return out


@pytest.mark.unit
def test_same_mapping_everywhere_is_not_hard() -> None:
    p = NetcheckProbe([S1, S2], 0.0, hairpin=False)
    for addr, req in p.start():
        p.receive(reply(req, ("198.51.100.4", 41641)), addr, 0.02 if addr == S1.addr else 0.05)
    assert p.done
    r = p.report()
    assert r.udp and r.ipv4 == ("198.51.100.4", 41641) and r.mapping_varies_by_dest is False
    assert not r.hard_nat
    assert r.region_latency == pytest.approx({1: 0.02, 2: 0.05}) and r.preferred_region == 1


@pytest.mark.unit
def test_a_port_per_destination_is_a_hard_nat() -> None:
    p = NetcheckProbe([S1, S2], 0.0, hairpin=False)
    for i, (addr, req) in enumerate(p.start()):
        p.receive(reply(req, ("198.51.100.4", 5000 + i)), addr, 0.01)
    r = p.report()
    assert r.mapping_varies_by_dest is True and r.hard_nat
    assert "hard NAT" in format_report(r)


@pytest.mark.unit
def test_report_survives_json_as_the_agent_sends_it() -> None:
    p = NetcheckProbe([S1, S6], 0.0, hairpin=False)
    for addr, req in p.start():
        seen = ("2001:db8::5", 41641) if ":" in addr[0] else ("198.51.100.4", 41641)
        p.receive(reply(req, seen), addr, 0.03)
    r = p.report(local=("192.168.1.2",))
    d = json.loads(json.dumps(r.to_json()))
    assert d["ipv6"] == "[2001:db8::5]:41641" and d["region_latency"] == {"1": 0.03}
    assert NetcheckReport.from_json(d) == r


@pytest.mark.unit
def test_no_replies_means_no_udp_after_the_retries() -> None:
    p = NetcheckProbe([S1, S2], 0.0, rto=0.1, max_sends=3)
    sent = len(p.start())
    t = 0.0
    while not p.done:
        t = p.next_deadline
        assert t is not None
        sent += len(p.on_timeout(t))
    assert sent == 6 and t < 2.0
    r = p.report()
    assert not r.udp and r.ipv4 is None and r.mapping_varies_by_dest is None
    assert r.region_latency == {1: None, 2: None} and r.preferred_region is None
    assert r.hairpin is None


@pytest.mark.unit
def test_hairpin_probe_goes_to_our_own_reflexive_address() -> None:
    p = NetcheckProbe([S1], 0.0)
    (addr, req), = p.start()
    hp = p.receive(reply(req, ("198.51.100.4", 41641)), addr, 0.01)
    assert [a for a, _ in hp] == [("198.51.100.4", 41641)]
    assert not p.done
    p.receive(hp[0][1], ("198.51.100.4", 41641), 0.02)  # it came back
    assert p.done and p.report().hairpin is True
    q = NetcheckProbe([S1], 0.0)
    (addr, req), = q.start()
    q.receive(reply(req, ("198.51.100.4", 41641)), addr, 0.01)
    q.on_timeout(0.5)
    assert q.done and q.report().hairpin is False


@pytest.mark.unit
def test_families_filter_and_ipv6_reflexive() -> None:
    p = NetcheckProbe([S1, S6], 0.0, families=(4,))
    assert [a for a, _ in p.start()] == [S1.addr]
    q = NetcheckProbe([S6], 0.0, hairpin=False)
    (addr, req), = q.start()
    q.receive(reply(req, ("2001:db8::5", 41641)), addr, 0.01)
    assert q.report().ipv6 == ("2001:db8::5", 41641)


@pytest.mark.unit
@given(st.binary(max_size=200))
@settings(max_examples=examples(200), deadline=None)
def test_fuzz_receive_ignores_garbage(data: bytes) -> None:
    p = NetcheckProbe([S1, S2], 0.0)
    p.start()
    assert p.receive(data, S1.addr, 0.01) == []
    assert not p.report().udp


@pytest.mark.unit
def test_servers_from_relay_map_and_local_addresses() -> None:
    m = RelayMap((RelayRegion(1, "one", nodes=(RelayNode("r1", "http://203.0.113.10:3340"),)),
                  RelayRegion(2, "two", nodes=(RelayNode("r2", "http://x:1", stun_port=0),
                                               RelayNode("r3", "http://203.0.113.11:3340",
                                                         3479, "192.0.2.11")))))
    assert servers_from_relay_map(m) == [StunServer(("203.0.113.10", 3478), 1, "one"),
                                         StunServer(("192.0.2.11", 3479), 2, "two")]
    assert "127.0.0.1" not in local_addresses()
    assert "127.0.0.1" in local_addresses(include_loopback=True)


@pytest.mark.unit
def test_netcheck_over_loopback_with_the_real_codec() -> None:
    """The blocking driver against a STUN responder on loopback, through a given socket."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.05)
    mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mine.bind(("127.0.0.1", 0))
    import threading

    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, src = srv.recvfrom(2048)
            except TimeoutError:
                continue
            out = stun.binding_response(data, src)
            if out:
                srv.sendto(out, src)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        r = netcheck([StunServer(srv.getsockname(), 1)], sock=mine, timeout=2.0)
    finally:
        stop.set()
        th.join()
        srv.close()
    assert r.ipv4 == mine.getsockname()  # probed from the given port
    assert r.hairpin is None  # the server saw our own address: no NAT, nothing to hairpin
    mine.close()


@pytest.mark.unit
def test_classic_gives_up_within_its_hard_timeout() -> None:
    """pystun3 against a silent port on loopback: no answer, but no hang either."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        assert classic_nat_type(silent.getsockname(), timeout=4.0, reply_wait=0.1) in (
            "Blocked", None)


@pytest.mark.unit
def test_cli_needs_servers_or_an_agent(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "wgmesh", "netcheck", "--socket",
                         str(tmp_path / "no-agent.sock")], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 1 and "no wgmesh agent running" in cp.stderr
    assert "--stun" in cp.stderr and "Traceback" not in cp.stderr


# ---------------------------------------------------------------- netns


def coturn(lab: Lab, host: Host, tmp: Path, *, two_addresses: bool) -> None:
    turnserver = need("turnserver")
    argv = [turnserver, "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "-n",
            "--log-file", "stdout", "--simple-log", "--pidfile", str(tmp / f"{host.name}.pid"),
            "-L", host.ip, "-p", "3478"]
    if two_addresses:  # RFC 5780 / 3489 CHANGE-REQUEST: a second address and port
        argv += ["-L", str(host.alt_ip), "--alt-listening-port", "3479"]
    p = lab.spawn(host, argv)
    p.wait_for_output("Total General servers", timeout=20)


def run_netcheck(lab: Lab, host: Host, *args: str) -> dict:
    cp = lab.run(host, [sys.executable, "-m", "wgmesh", "netcheck", "--json", *args],
                 timeout=90)
    return json.loads(cp.stdout)


@pytest.mark.netns
def test_netcheck_against_coturn_behind_eim_and_symmetric(lab: Lab, tmp_path: Path) -> None:
    srv1, srv2 = lab.add_public_host("stun1"), lab.add_public_host("stun2")
    coturn(lab, srv1, tmp_path, two_addresses=True)
    coturn(lab, srv2, tmp_path, two_addresses=False)
    eim = lab.add_node_host("eim", "eim")
    sym = lab.add_node_host("sym", "symmetric")
    args = ["--stun", f"{srv1.ip}:3478", "--stun", f"{srv2.ip}:3478",
            "--classic", f"{srv1.ip}:3478", "--port", "41641"]
    r_eim = run_netcheck(lab, eim, *args)
    r_sym = run_netcheck(lab, sym, *args)
    assert eim.nat is not None and sym.nat is not None
    assert r_eim["udp"] and r_eim["ipv4"] == f"{eim.nat.ip}:41641"  # from the given port
    assert r_eim["mapping_varies_by_dest"] is False and r_eim["hard_nat"] is False
    assert r_eim["nat_type"] == "Restric Port NAT"  # pystun3's spelling
    assert r_eim["hairpin"] is False and eim.ip in r_eim["local_addresses"]
    assert r_sym["udp"] and r_sym["ipv4"].startswith(sym.nat.ip + ":")
    assert r_sym["mapping_varies_by_dest"] is True and r_sym["hard_nat"] is True
    assert r_sym["nat_type"] == "Symmetric NAT"


@pytest.mark.netns
def test_netcheck_udp_blocked_and_hairpin(lab: Lab, tmp_path: Path) -> None:
    srv = lab.add_public_host("stun1")
    coturn(lab, srv, tmp_path, two_addresses=False)
    blocked = lab.add_node_host("blk", "udp-blocked")
    hp = lab.add_node_host("hp", "eim", hairpin=True)
    r = run_netcheck(lab, blocked, "--stun", f"{srv.ip}:3478", "--timeout", "1.5")
    assert r["udp"] is False and r["ipv4"] is None
    assert run_netcheck(lab, hp, "--stun", f"{srv.ip}:3478")["hairpin"] is True


@pytest.mark.netns
def test_netcheck_relay_regions_via_the_relays_stun(lab: Lab, tmp_path: Path) -> None:
    relays = [lab.add_public_host(f"relay{i}") for i in (1, 2, 3)]
    for i, h in enumerate(relays):  # relay 3 runs with its STUN responder off
        p = lab.python(h, "-m", "wgmesh", "relay", "serve", "--listen", f"{h.ip}:3340",
                       "--key-file", str(tmp_path / f"r{i}.key"),
                       *(["--stun-port", "-1"] if i == 2 else []))
        p.wait_for_output('"listening"', timeout=30)
    rmap = {"regions": [{"region_id": i + 1, "code": f"r{i + 1}",
                         "nodes": [{"name": h.name, "url": f"http://{h.ip}:3340"}]}
                        for i, h in enumerate(relays)]}
    (tmp_path / "relaymap.json").write_text(json.dumps(rmap))
    pc = lab.add_node_host("pc", "eim")
    r = run_netcheck(lab, pc, "--relay-map", str(tmp_path / "relaymap.json"), "--timeout", "1.5")
    assert pc.nat is not None
    assert r["udp"] and r["ipv4"].startswith(pc.nat.ip + ":")
    assert r["mapping_varies_by_dest"] is False  # two relays saw the same mapping
    lat = r["region_latency"]
    assert lat["1"] > 0 and lat["2"] > 0 and lat["3"] is None
    assert r["preferred_region"] == min((1, 2), key=lambda k: lat[str(k)])
    text = lab.run(pc, [sys.executable, "-m", "wgmesh", "netcheck", "--timeout", "1.5",
                        "--relay-map", str(tmp_path / "relaymap.json")], timeout=60).stdout
    assert "<- preferred" in text and "3 (r3): no reply" in text
