"""Mesh names through a real systemd-resolved (Debian's, run privately on the lab host by
tests/support/resolvedtools.py): the node hooks in with split DNS, so ``NAME.DOMAIN``
goes to its responder and every other name to the upstream as before, and ``down``, or
the next start after ``kill -9``, takes the interface's DNS settings out of resolved."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from dnstools import DOMAIN, NETMAP, WWW_IP
from polling import wait_for
from resolvedtools import Resolved, private_resolved
from systools import need

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Host, Lab, Process

pytestmark = pytest.mark.netns

SUPPORT = Path(__file__).parents[1] / "support"
DNSTOOLS, RESOLVEDTOOLS = str(SUPPORT / "dnstools.py"), str(SUPPORT / "resolvedtools.py")
ME = NETMAP.self_node.ipv4


def _upstream(lab: Lab) -> Host:
    """The lab's only DNS server (dnstools' stub: knows www.example.test)."""
    host = lab.add_public_host("upstream")
    lab.python(host, DNSTOOLS, "upstream", host.ip).wait_for_output("ready")
    return host


def _getent(lab: Lab, host: Host, name: str) -> list[str]:
    """IPv4 addresses of ``name`` as a program on ``host`` gets them: libc, through the
    resolv.conf of a resolved host (its stub, 127.0.0.53)."""
    out = lab.run(host, ["getent", "ahostsv4", name], check=False).stdout
    return sorted({line.split()[0] for line in out.splitlines()})


def _tun_host(lab: Lab, tmp_path: Path) -> tuple[Host, Path]:
    """A host whose ``wgx`` (a persistent TUN device, as lasting as a kernel WireGuard
    interface) has dnstools' node address; and a state directory for MeshNames."""
    host = lab.add_public_host("node")
    for cmd in (["ip", "tuntap", "add", "wgx", "mode", "tun"],
                ["ip", "addr", "add", f"{ME}/32", "dev", "wgx"], ["ip", "link", "set", "wgx", "up"]):
        lab.run(host, cmd)
    (tmp_path / "state").mkdir()
    return host, tmp_path / "state"


def _query(resolved: Resolved, name: str) -> tuple[list[str], str]:
    """``resolvectl query``'s IPv4 addresses of ``name`` and the link they came over."""
    out = resolved.ctl("query", "-4", "--legend=no", name).stdout
    m = re.fullmatch(rf"{re.escape(name)}: ([\d. ]+?)\s+-- link: (\S+)", out.strip())
    assert m, out
    return m.group(1).split(), m.group(2)


def test_a_crashed_hook_on_a_lasting_interface_is_reverted(lab: Lab, tmp_path: Path) -> None:
    """A kernel WireGuard interface outlives a killed agent, and resolved keeps its DNS
    settings: the next start must take them out (its journal) before hooking in again, and
    stop must leave the interface with none."""
    host, state = _tun_host(lab, tmp_path)
    with private_resolved(lab, host, _upstream(lab).ip, tmp_path / "resolved") as resolved:
        assert resolved.link("dns", "wgx") == []
        names = lab.python(host, RESOLVEDTOOLS, "names", str(state), "wgx")
        names.wait_for_output("hook resolved")
        assert (resolved.link("dns", "wgx"), resolved.link("domain", "wgx")) == (
            [ME], [f"~{DOMAIN}"])
        os.kill(names.pid, signal.SIGKILL)
        names.wait(10)
        assert resolved.link("dns", "wgx") == [ME]  # the crash left it
        again = lab.python(host, RESOLVEDTOOLS, "names", str(state), "wgx")
        again.wait_for_output("hook resolved")
        assert (resolved.link("dns", "wgx"), resolved.link("domain", "wgx")) == (
            [ME], [f"~{DOMAIN}"])
        os.kill(again.pid, signal.SIGTERM)
        again.wait_for_output("stopped")
        assert (resolved.link("dns", "wgx"), resolved.link("domain", "wgx")) == ([], [])
        assert DOMAIN not in resolved.everywhere("domain")
        assert not (state / "host-dns.json").exists()


def test_split_dns_through_resolved_and_out_again_on_down_and_after_kill(
        lab: Lab, tmp_path: Path) -> None:
    """The agent (``wgmesh up``, userspace) on a host where resolved runs, as issue 15
    asks: hook "resolved" in status, mesh names by split DNS, the rest as before."""
    need("dig")
    upstream = _upstream(lab)
    mesh = MeshLab(lab, relays=1, control_args=["--mesh-domain", DOMAIN])
    host = lab.add_node_host("a", "eim")
    with private_resolved(lab, host, upstream.ip, tmp_path / "resolved") as resolved:
        a = mesh.add_node("a", "eim", host=host)
        b = mesh.add_node("b", "eim")
        mesh.wait_connected()
        a_ip, b_ip, ifname = a.ipv4, b.ipv4, "wga"
        assert a.status()["dns"] == {"domain": DOMAIN, "hook": "resolved"}
        status = lab.run(host, [sys.executable, "-m", "wgmesh", "status", "--socket", a.socket])
        assert f"mesh DNS {DOMAIN}  system hook resolved" in status.stdout.splitlines()
        assert (resolved.link("dns", ifname), resolved.link("domain", ifname)) == (
            [a_ip], [f"~{DOMAIN}"])
        # split DNS: resolved asks the mesh link for the mesh domain only
        assert _query(resolved, f"b.{DOMAIN}") == ([b_ip], ifname)
        assert _getent(lab, host, f"b.{DOMAIN}") == [b_ip]
        assert _getent(lab, host, f"a.{DOMAIN}") == [a_ip]
        # ... and everything else to the upstream, over the underlay
        assert _query(resolved, "www.example.test") == ([WWW_IP], "eth0")
        assert _getent(lab, host, "www.example.test") == [WWW_IP]
        # the responder forwards what is not a mesh name to the host's resolver: here
        # resolved's stub (the host's resolv.conf), which asks the upstream
        dig = ["dig", "-b", a_ip, f"@{a_ip}", "+short", "+time=2", "+tries=1", "www.example.test"]
        assert lab.run(host, dig).stdout.split() == [WWW_IP]

        def out_of_resolved() -> None:
            assert a_ip not in resolved.everywhere("dns")
            assert DOMAIN not in resolved.everywhere("domain")
            assert _getent(lab, host, f"b.{DOMAIN}") == []  # the upstream knows no mesh

        down = [sys.executable, "-m", "wgmesh", "down", "--socket", a.socket]
        lab.run(host, down)
        a.proc.wait(30)
        out_of_resolved()
        a.restart()
        wait_for(lambda: resolved.link("dns", ifname) == [a_ip], 40, "hooked in again")
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        # the userspace interface died with the agent, and resolved forgot it with it
        wait_for(lambda: a_ip not in resolved.everywhere("dns"), 10, "resolved to drop wga")
        a.restart()
        a.proc.wait_for_output("wgmesh up:", timeout=40)
        wait_for(lambda: _getent(lab, host, f"b.{DOMAIN}") == [b_ip], 20, "b after the crash")
        assert (resolved.link("dns", ifname), resolved.link("domain", ifname)) == (
            [a_ip], [f"~{DOMAIN}"])
        lab.run(host, down)
        a.proc.wait(30)
        out_of_resolved()
        mesh.close()


def test_resolved_on_the_host_but_not_answering_costs_the_hook_not_the_node(
        lab: Lab, tmp_path: Path) -> None:
    """Without its D-Bus, resolved refuses ``resolvectl dns``: the node serves its names
    all the same and takes the next hook (resolv.conf, opted in). Once resolved has
    stopped, the varlink socket file it leaves behind does not count as running."""
    need("dig")
    host, state = _tun_host(lab, tmp_path)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")

    def serve(*resolv_conf: str) -> Process:
        names = lab.python(host, RESOLVEDTOOLS, "names", str(state), "wgx", *resolv_conf)
        names.wait_for_output("hook ")
        dig = ["dig", "-b", ME, f"@{ME}", "+short", "+time=2", "+tries=1", f"me.{DOMAIN}"]
        assert lab.run(host, dig).stdout.split() == [ME]  # served all the same
        return names

    with private_resolved(lab, host, _upstream(lab).ip, tmp_path / "resolved") as resolved:
        resolved.bus.stop()
        names = serve(str(resolv))
        assert names.stdout.split() == ["hook", "resolv.conf"]
        assert "not hooked into systemd-resolved" in names.stderr
        assert f"nameserver {ME}" in resolv.read_text()
        names.stop()
        assert resolv.read_text() == "nameserver 192.0.2.53\n"
        resolved.daemon.stop()
        assert (resolved.root / "run/systemd/resolve/io.systemd.Resolve").exists()
        names = serve()
        assert names.stdout.split() == ["hook", "none"]
        assert "systemd-resolved" not in names.stderr  # not even tried
        names.stop()
