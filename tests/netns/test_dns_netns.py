"""Mesh DNS on real sockets, queried with dig: the responder answers mesh names from its
netmap, forwards other names to an upstream (a lab stub, never a real server, with TCP
fallback for truncated answers), follows a netmap update, refuses the underlay, and
survives a flood of hostile datagrams.

The responder listens on its lab host's public address so an underlay host can reach it;
the node's "tunnel address" is an extra address on its loopback, and trusted queries come from it
(``dig -b``), as the node's own programs' would."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from dnstools import BIG_TXT, DOMAIN, NETMAP, ULA, WWW_IP
from polling import wait_for
from systools import need

from wgmesh.lab.network import Host, Lab

pytestmark = pytest.mark.netns

TOOLS = str(Path(__file__).parents[1] / "support" / "dnstools.py")
TUNNEL_IP = NETMAP.self_node.ipv4


def dig(lab: Lab, host: Host, server: str, *args: str, source: str | None = None) -> str:
    """dig's output; one try with a 2 s timeout, so a lost answer is a failure, not a wait."""
    bind = ["-b", source] if source else []
    return lab.run(host, ["dig", *bind, f"@{server}", "+tries=1", "+time=2", *args],
                   check=False).stdout


def ask(lab: Lab, node: Host, *args: str) -> str:
    """dig at the responder on ``node`` from inside the tunnel."""
    return dig(lab, node, node.ip, *args, source=TUNNEL_IP)


def status(output: str) -> str:
    return output.split("status: ", 1)[1].split(",", 1)[0] if "status: " in output else ""


def flags(output: str) -> list[str]:
    """The header flags dig shows (``;; flags: qr aa rd; QUERY: 1, ...``)."""
    return output.split(";; flags: ", 1)[1].split(";", 1)[0].split() if ";; flags" in output \
        else []


def test_responder_answers_forwards_follows_the_netmap_and_shuts_out_the_underlay(
        lab: Lab) -> None:
    need("dig")
    node, upstream, outsider = (lab.add_public_host(n) for n in ("node", "upstream", "out"))
    lab.run(node, ["ip", "addr", "add", f"{TUNNEL_IP}/32", "dev", "lo"])
    lab.python(upstream, TOOLS, "upstream", upstream.ip).wait_for_output("ready")
    responder = lab.python(node, TOOLS, "responder", node.ip, upstream.ip)
    responder.wait_for_output("ready")

    assert ask(lab, node, "+short", f"peer.{DOMAIN}").split() == ["100.64.0.2"]
    assert ask(lab, node, "+short", "AAAA", f"PEER.{DOMAIN}.").split() == [f"{ULA}2"]
    assert ask(lab, node, "+short", "+tcp", f"me.{DOMAIN}").split() == ["100.64.0.1"]
    out = ask(lab, node, f"nobody.{DOMAIN}")
    assert status(out) == "NXDOMAIN" and "aa" in flags(out)
    # forwarded to the stub; a TXT too big for UDP comes back whole (we retry over TCP
    # upstream; dig retries over TCP with us after our truncated UDP answer)
    assert ask(lab, node, "+short", "www.example.test").split() == [WWW_IP]
    assert status(ask(lab, node, "nothing.example.test")) == "NXDOMAIN"
    assert "tc" in flags(ask(lab, node, "+ignore", "TXT", "big.example.test"))
    txt = ask(lab, node, "+short", "TXT", "big.example.test").splitlines()
    assert sorted(t.strip('"') for t in txt) == sorted(BIG_TXT)

    # the underlay: refused, for mesh names too
    for name in ("www.example.test", f"peer.{DOMAIN}"):
        out = dig(lab, outsider, node.ip, name)
        assert status(out) == "REFUSED" and "ANSWER: 0" in out

    # hostile datagrams from the underlay: nothing but REFUSED, and that only to what is
    # still a well-formed query (the batches' good ones, and garbage that happens to parse)
    flood = lab.python(outsider, TOOLS, "flood", node.ip, "300")
    wait_for(lambda: flood.poll() is not None, 60, "the flood to finish")
    assert flood.poll() == 0, flood.stderr
    replies = json.loads(flood.stdout)
    assert {rcode for _, rcode in replies} == {5}
    assert {4242 + n for n in range(6)} <= {qid for qid, _ in replies}
    assert len(replies) < 6 + 300 // 4
    # ... and blasts far over the rate limit, from outside and inside the tunnel, leave
    # it serving (once the tunnel source's tokens refill)
    blasts = [lab.python(outsider, TOOLS, "blast", node.ip, "3000", outsider.ip),
              lab.python(node, TOOLS, "blast", node.ip, "3000", TUNNEL_IP)]
    wait_for(lambda: all(b.poll() is not None for b in blasts), 60, "the blasts to finish")
    assert [b.poll() for b in blasts] == [0, 0], [b.stderr for b in blasts]
    wait_for(lambda: ask(lab, node, "+short", f"db.{DOMAIN}").split() == ["100.64.0.3"], 20,
             "an answer after the blasts")
    assert responder.poll() is None, responder.stderr

    # a netmap update: renamed and removed nodes stop resolving at once
    os.kill(responder.pid, signal.SIGUSR1)
    responder.wait_for_output("updated")
    assert status(ask(lab, node, f"peer.{DOMAIN}")) == "NXDOMAIN"
    assert status(ask(lab, node, f"db.{DOMAIN}")) == "NXDOMAIN"
    assert ask(lab, node, "+short", f"peer-renamed.{DOMAIN}").split() == ["100.64.0.2"]


def test_forwarding_is_bounded_and_saturation_leaves_mesh_names_answered(lab: Lab) -> None:
    """Two forwards in flight at most: of five queries to an upstream that never answers,
    two go upstream (and get SERVFAIL after the timeout), three get nothing, and a mesh
    name sent after them is answered at once."""
    need("dig")
    node, upstream = lab.add_public_host("node"), lab.add_public_host("upstream")
    lab.run(node, ["ip", "addr", "add", f"{TUNNEL_IP}/32", "dev", "lo"])
    held = lab.python(upstream, TOOLS, "hold", upstream.ip)
    held.wait_for_output("ready")
    lab.python(node, TOOLS, "responder", node.ip, upstream.ip, "2", "3").wait_for_output("ready")
    client = lab.python(node, TOOLS, "burst", node.ip, TUNNEL_IP, "5")

    def replies() -> list[tuple[int, int]]:
        return sorted(tuple(json.loads(line)) for line in client.stdout.splitlines())

    wait_for(lambda: replies() == [(1000, 0)], 10, "the mesh name's answer")
    wait_for(lambda: held.stdout.count("query") >= 2, 10, "the admitted queries upstream")
    assert ask(lab, node, "+short", "+tcp", f"peer.{DOMAIN}").split() == ["100.64.0.2"]
    assert held.stdout.count("query") == 2  # the other three never left
    wait_for(lambda: len(replies()) >= 3, 20, "SERVFAIL for the admitted queries")
    assert replies() == [(1, 2), (2, 2), (1000, 0)]
