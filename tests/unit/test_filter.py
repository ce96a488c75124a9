"""The packet filter's sans-I/O core: rule matching, connection tracking, hostile packets."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmesh.netmap import FilterRule
from wgmesh.wireguard.filter import (
    PacketFilter,
    nft_delete,
    nft_replace,
    nft_ruleset,
    parse_flow,
)

pytestmark = pytest.mark.unit

ME, PEER = "100.64.0.1", "100.64.0.2"


def ipv4(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, proto, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return hdr + struct.pack("!HH", sport, dport) + bytes(16)


def test_default_deny_rule_allows_port_and_tracks_replies() -> None:
    f = PacketFilter([FilterRule(src=(f"{PEER}/32",), dst=(f"{ME}/32",), ports=((80, 80),),
                                 proto="tcp")])
    assert f.inbound(ipv4(PEER, ME, 6, 40000, 80), now=0)        # allowed by the rule
    assert not f.inbound(ipv4(PEER, ME, 6, 40000, 81), now=0)    # port not in the rule
    assert not f.inbound(ipv4(PEER, ME, 17, 40000, 80), now=0)   # wrong protocol
    assert not f.inbound(ipv4("100.64.0.9", ME, 6, 1, 80), now=0)  # wrong source
    # our own flow out to the peer makes its replies acceptable, and only those
    f.outbound(ipv4(ME, PEER, 17, 5353, 9999), now=0)
    assert f.inbound(ipv4(PEER, ME, 17, 9999, 5353), now=1)
    assert not f.inbound(ipv4(PEER, ME, 17, 9999, 5354), now=1)
    assert not f.inbound(ipv4(PEER, ME, 17, 9999, 5353), now=10_000)  # the flow expired
    assert f.counters["tracked"] == 1 and f.counters["dropped"] >= 4


def test_allow_all_short_circuits() -> None:
    f = PacketFilter([FilterRule(src=("0.0.0.0/0", "::/0"), dst=("0.0.0.0/0", "::/0"))])
    assert f.allow_all and f.inbound(b"garbage that is not ip", now=0)


@given(st.binary(max_size=80))
def test_hostile_packets_never_raise(data: bytes) -> None:
    f = PacketFilter([FilterRule(src=(f"{PEER}/32",), dst=(f"{ME}/32",), ports=((22, 22),))])
    f.outbound(data, now=0)
    assert f.inbound(data, now=0) in (True, False)
    flow = parse_flow(data)
    assert flow is None or len(flow) == 5


def test_nft_ruleset_has_tracking_rules_and_drop() -> None:
    text = nft_ruleset("wg0", [FilterRule(src=(f"{PEER}/32",), dst=(f"{ME}/32",),
                                          ports=((80, 80), (1000, 2000)), proto="tcp")])
    assert 'iifname "wg0" ct state established,related accept' in text
    assert "tcp dport { 80, 1000-2000 } accept" in text
    assert text.rstrip().endswith("}") and 'iifname "wg0" drop' in text


def test_nft_scripts_replace_and_delete_in_one_transaction() -> None:
    rules = [FilterRule(src=(f"{PEER}/32",), dst=(f"{ME}/32",), ports=((22, 22),))]
    delete = nft_delete("wg-x")
    # declaring the table first lets the delete succeed when there is none yet
    assert delete == "table inet wgmesh_wg_x\ndelete table inet wgmesh_wg_x\n"
    script = nft_replace("wg-x", rules)
    assert script.startswith(delete) and script.endswith(nft_ruleset("wg-x", rules))
