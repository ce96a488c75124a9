"""The lab itself: NAT kinds measured from outside, processes, and guaranteed clean-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from polling import wait_for

from wgmesh.lab.natprobe import check_kinds
from wgmesh.lab.network import Host, Lab, LabError, list_namespaces

pytestmark = pytest.mark.netns
WGMESH = [sys.executable, "-m", "wgmesh"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"


def _ns_of(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


def test_lab_check_json_every_kind_behaves_as_named() -> None:
    cp = subprocess.run([*WGMESH, "lab", "check", "--json"], capture_output=True, text=True,
                        timeout=180, check=True)
    rows = {r["kind"]: r for r in json.loads(cp.stdout)}
    assert set(rows) == {"none", "eim", "symmetric", "udp-blocked"}
    for r in rows.values():
        assert {"kind", "udp_ok", "mapping", "external", "external_2"} <= set(r)

    none, eim, sym, blocked = rows["none"], rows["eim"], rows["symmetric"], rows["udp-blocked"]
    assert none["udp_ok"] and none["mapping"] == "none"
    assert none["external"].startswith("203.0.113.")

    assert eim["udp_ok"] and eim["mapping"] == "endpoint-independent"
    assert eim["external"] == eim["external_2"]  # same mapping towards both servers
    assert eim["external"].startswith("198.51.100.")
    assert eim["port_preserving"] is True
    assert eim["filtering"] == "address-and-port-dependent"  # port-restricted

    assert sym["udp_ok"] and sym["mapping"] == "endpoint-dependent"
    assert sym["external"] != sym["external_2"]
    assert sym["external"].split(":")[0] == sym["external_2"].split(":")[0]

    assert blocked["udp_ok"] is False and blocked["external"] is None
    assert blocked["tcp_ok"] is True  # only UDP is blocked


def test_lab_check_table_is_aligned() -> None:
    cp = subprocess.run([*WGMESH, "lab", "check"], capture_output=True, text=True,
                        timeout=180, check=True)
    lines = cp.stdout.splitlines()
    assert lines[0].split()[:3] == ["KIND", "UDP_OK", "MAPPING"]
    col = lines[0].index("MAPPING")
    assert all(len(line) > col and line[col - 1] == " " for line in lines[1:])
    assert len(lines) == 5


def test_hairpin_on_and_off() -> None:
    on = check_kinds(("eim",), hairpin=True)[0]
    off = check_kinds(("eim",), hairpin=False)[0]
    assert on["hairpin"] is True
    assert off["hairpin"] is False
    assert on["mapping"] == off["mapping"] == "endpoint-independent"


def test_run_and_spawn_capture_and_reap(lab: Lab) -> None:
    h = lab.add_public_host("h")
    cp = lab.run(h, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert h.ip in cp.stdout
    with pytest.raises(LabError, match="failed"):
        lab.run(h, ["false"])
    p = lab.python(h, "-c", "import sys; print('out'); print('err', file=sys.stderr)")
    assert p.wait(10) == 0
    assert p.stdout.strip() == "out" and p.stderr.strip() == "err"
    sleeper = lab.spawn(h, ["sleep", "600"])
    lab.close()
    assert sleeper.poll() is not None
    assert not _ns_of(lab.prefix)


def test_output_read_while_the_process_writes_is_kept_whole(lab: Lab) -> None:
    """Reading a child's output must not move the offset the child writes at: polled
    while it wrote, a process used to lose lines under its own later ones."""
    h = lab.add_public_host("h")
    lines = [f"line {i:06d}" for i in range(20_000)]
    p = lab.python(h, "-c", "for i in range(20_000): print(f'line {i:06d}', flush=True)")
    reads = 0

    def read_until_exit() -> bool:
        nonlocal reads
        reads += len(p.stdout) > 0
        return p.poll() is not None

    wait_for(read_until_exit, 60, "the writer to finish", interval=0)
    assert reads > 100 and p.wait(10) == 0  # it was read while it wrote
    assert p.stdout.splitlines() == lines


def test_two_labs_side_by_side() -> None:
    with Lab() as a, Lab() as b:
        ha, hb = a.add_public_host("x"), b.add_public_host("x")
        assert a.prefix != b.prefix and ha.ns != hb.ns
        # Same addresses, separate worlds: each lab's host answers only in its own lab.
        a.run(ha, ["ping", "-c1", "-W2", "203.0.113.1"])
        b.run(hb, ["ping", "-c1", "-W2", "203.0.113.1"])
    assert not _ns_of(a.prefix) and not _ns_of(b.prefix)


def test_lan_host_reaches_internet_only_through_nat(lab: Lab) -> None:
    srv = lab.add_public_host("srv")
    nat = lab.add_nat("home", "eim")
    pc = lab.add_host("pc", nat)
    lab.run(pc, ["ping", "-c1", "-W2", srv.ip])
    # Unsolicited traffic from the internet never reaches the LAN host.
    cp = lab.run(srv, ["ping", "-c1", "-W1", pc.ip], check=False)
    assert cp.returncode != 0


CHILD = textwrap.dedent("""
    import signal, sys, time
    from wgmesh.lab.network import Lab
    # ^C as at a terminal: a run started in the background (sh: cmd &) hands its children
    # SIGINT ignored, and Python then leaves it so; the test is about the lab, not that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lab = Lab()
    h = lab.add_public_host("h")
    p = lab.spawn(h, ["sleep", "600"])
    print(lab.prefix, p.pid, flush=True)
    mode = sys.argv[1]
    if mode == "crash":
        import os; os._exit(3)  # no clean-up at all: leaves the lab behind
    if mode == "raise":
        with lab:
            raise RuntimeError("test failure inside the lab")
    with lab:
        time.sleep(600)
""")


def _child(mode: str) -> tuple[subprocess.Popen[str], str, int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, line[0], int(line[1])


def _gone(prefix: str, pid: int, timeout: float = 15) -> bool:
    return wait_for(lambda: not _ns_of(prefix) and not _alive(pid), timeout,
                    f"lab {prefix} and pid {pid} to be gone")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_cleans_up(sig: signal.Signals) -> None:
    proc, prefix, pid = _child("sleep")
    assert _ns_of(prefix) and _alive(pid)
    proc.send_signal(sig)
    proc.wait(30)
    assert _gone(prefix, pid)


def test_exception_cleans_up() -> None:
    proc, prefix, pid = _child("raise")
    assert proc.wait(30) != 0
    assert _gone(prefix, pid)


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_failing_pytest_leaves_nothing(tmp_path: Path) -> None:
    links_before = _root_links()
    test = tmp_path / "test_fails.py"
    test.write_text(textwrap.dedent("""
        from wgmesh.lab.network import Lab
        def test_it():
            with Lab() as lab:
                h = lab.add_public_host("h")
                p = lab.spawn(h, ["sleep", "600"])
                print("LAB", lab.prefix, p.pid)
                assert False, "deliberate"
    """))
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                         str(test)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert cp.returncode == 1, cp.stdout
    _, prefix, pid = next(line for line in cp.stdout.splitlines() if "LAB" in line).split()[-3:]
    assert _gone(prefix, int(pid), timeout=5)
    assert not {n for n in _root_links() - links_before if n.startswith(("veth", "eth", "p", "w"))}


def test_lab_clean_removes_crashed_lab_only(lab: Lab) -> None:
    lab.add_public_host("alive")
    proc, prefix, pid = _child("crash")
    assert proc.wait(30) == 3
    assert _ns_of(prefix) and _alive(pid)  # the crash really left things behind
    cp = subprocess.run([*WGMESH, "lab", "clean"], capture_output=True, text=True, timeout=60,
                        check=True)
    assert f"{prefix}-h" in cp.stdout
    assert _gone(prefix, pid, timeout=5)
    assert _ns_of(lab.prefix), "a live lab must survive `lab clean`"


def _miniupnpd_pids(ns: str) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in pids.split()
            if Path(f"/proc/{p}/comm").read_text().strip() == "miniupnpd"]


def test_portmap_router_runs_miniupnpd_and_close_removes_it_all() -> None:
    with Lab() as lab:
        nat = lab.add_nat("home", "eim+upnp")
        assert (nat.kind, nat.portmap, nat.spec) == ("eim", "upnp", "eim+upnp")
        assert nat.portmapd is not None and nat.portmapd.protocols == ("upnp",)
        [pid] = _miniupnpd_pids(nat.ns)
        conf = nat.portmapd.conf
        assert conf.parent == lab.state_dir
        assert "enable_upnp=yes" in conf.read_text() and "secure_mode=yes" in conf.read_text()
        # A reboot restarts the daemon (mapping table and lease file gone).
        nat.reboot()
        [pid2] = _miniupnpd_pids(nat.ns)
        assert pid2 != pid and not _alive(pid)
    assert not _alive(pid2)
    assert not lab.state_dir.exists() and not _ns_of(lab.prefix)


def test_pcp_router_rejects_natpmp_and_natpmp_router_rejects_pcp(lab: Lab) -> None:
    pcp, pmp = lab.add_nat("r1", "symmetric", portmap="pcp"), lab.add_nat("r2", "symmetric+natpmp")
    hosts = {"pcp": lab.add_host("a", pcp), "natpmp": lab.add_host("b", pmp)}
    ask = textwrap.dedent("""
        import socket, sys
        from wgmesh import portmap as pm
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((sys.argv[1], pm.SERVER_PORT))
        s.settimeout(2)
        for name, req in (("pcp", pm.encode_pcp_announce(s.getsockname()[0])),
                          ("natpmp", pm.encode_natpmp_address())):
            s.send(req)
            try:
                print(name, "answers" if s.recv(1100) else "silent")
            except OSError as e:
                print(name, type(e).__name__)
    """)
    for kind, host in hosts.items():
        assert host.nat is not None
        out = lab.run(host, [sys.executable, "-c", ask, f"{host.nat.lan_prefix}.1"]).stdout
        other = "natpmp" if kind == "pcp" else "pcp"
        assert f"{kind} answers" in out and f"{other} ConnectionRefusedError" in out, out


@pytest.mark.parametrize("spec", ["symmetric+foo", "udp-blocked+pcp", "cone", "none+upnp"])
def test_lab_check_refuses_unknown_kinds(spec: str) -> None:
    cp = subprocess.run([*WGMESH, "lab", "check", "--kinds", spec], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 1 and "unknown NAT" in cp.stderr, cp.stderr


def test_hosts_on_one_lan_reach_each_other_directly(lab: Lab) -> None:
    nat = lab.add_nat("office", "symmetric")
    a, b = lab.add_host("a", nat), lab.add_host("b", nat)
    lab.run(a, ["ping", "-c1", "-W2", b.ip])  # bridged on the LAN, never NATed


def _mac(lab: Lab, host: Host, dev: str) -> str:
    return str(json.loads(lab.run(host, ["ip", "-j", "link", "show", dev]).stdout)[0]["address"])


def test_gateways_keep_their_mac_while_hosts_join(lab: Lab) -> None:
    """Linux gives a bridge its lowest port's MAC unless it has one of its own, and then
    drops frames sent to the old one: a host that resolved its gateway before others
    joined would be cut off until its ARP entry expired (an agent's first connection to
    control timed out in CI that way). The internet's and each LAN's bridges keep theirs.
    """
    srv = lab.add_public_host("srv")
    nat = lab.add_nat("home", "eim")
    first = lab.add_host("first", nat)
    lab.run(first, ["ping", "-c1", "-W2", srv.ip])  # resolves its router and the router ours
    internet, lan = _mac(lab, lab.internet, "br0"), _mac(lab, nat, "lan0")
    # Enough ports that, with random MACs, one is all but sure to be lower than the rest.
    for i in range(12):
        lab.add_public_host(f"pub{i}")
        lab.add_host(f"lan{i}", nat)
    assert (_mac(lab, lab.internet, "br0"), _mac(lab, nat, "lan0")) == (internet, lan)
    # And the first host still gets through at once, through both gateways.
    lab.run(first, ["ping", "-c1", "-W1", srv.ip])
