"""The mesh DNS core: answers from the netmap's table, forwarding decisions, and no
answer but FORMERR/NOTIMP/REFUSED or silence for anything hostile."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from budget import examples
from dnstools import DOMAIN, NETMAP, RENAMED, ULA, hostile_datagrams
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh.node.dns import TTL, DnsResponder, Forward, NameTable, RateLimiter, decide

pytestmark = pytest.mark.unit

TABLE = NameTable.from_netmap(NETMAP, DOMAIN)
HEADER_ERRORS = {dns.rcode.FORMERR, dns.rcode.NOTIMP}


def ask(name: str, rdtype: str = "A", rdclass: str = "IN", *, trusted: bool = True,
        table: NameTable = TABLE) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, rdclass)
    wire = decide(table, query.to_wire(), trusted=trusted)
    assert isinstance(wire, bytes), wire
    response = dns.message.from_wire(wire)
    assert response.id == query.id and response.flags & dns.flags.QR
    return response


def records(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def test_a_and_aaaa_of_peers_and_self_are_authoritative() -> None:
    r = ask(f"peer.{DOMAIN}")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert records(r) == ["100.64.0.2"] and r.answer[0].ttl == TTL
    assert records(ask(f"peer.{DOMAIN}", "AAAA")) == [f"{ULA}2"]
    assert records(ask(f"me.{DOMAIN}")) == ["100.64.0.1"]
    assert records(ask(f"db.{DOMAIN}", "ANY")) == ["100.64.0.3", f"{ULA}3"]


def test_names_are_case_insensitive_and_answers_keep_the_asked_case() -> None:
    r = ask(f"PeEr.{DOMAIN.upper()}.")
    assert records(r) == ["100.64.0.2"]
    assert r.answer[0].name.to_text() == f"PeEr.{DOMAIN.upper()}."


def test_unknown_and_deeper_names_are_nxdomain_known_names_other_types_nodata() -> None:
    for name in (f"nobody.{DOMAIN}", f"www.peer.{DOMAIN}"):
        r = ask(name)
        assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA and not r.answer
    for name, rdtype in ((f"peer.{DOMAIN}", "MX"), (DOMAIN, "A")):
        r = ask(name, rdtype)
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and not r.answer


def test_reverse_names_of_mesh_addresses_point_at_the_node() -> None:
    assert records(ask("2.0.64.100.in-addr.arpa", "PTR")) == [f"peer.{DOMAIN}."]


def test_other_names_are_forwarded_with_the_clients_question_and_flags() -> None:
    query = dns.message.make_query("www.example.test", "A", want_dnssec=True)
    query.flags &= ~dns.flags.RD
    decision = decide(TABLE, query.to_wire(), trusted=True)
    assert isinstance(decision, Forward)
    assert decision.upstream.question == query.question
    assert not decision.upstream.flags & dns.flags.RD
    assert decision.upstream.ednsflags & dns.flags.DO


def test_forwarded_reply_gets_the_clients_id_and_is_truncated_to_its_limit() -> None:
    query = dns.message.make_query("big.example.test", "TXT", use_edns=False)
    decision = decide(TABLE, query.to_wire(), trusted=True)
    assert isinstance(decision, Forward)
    upstream = dns.message.make_response(decision.upstream)
    upstream.answer.append(dns.rrset.from_text_list(
        query.question[0].name, 60, "IN", "TXT", [f'"{"x" * 200}{i}"' for i in range(10)]))
    reply = dns.message.from_wire(decision.reply(upstream), ignore_trailing=True)
    assert reply.id == query.id and reply.flags & dns.flags.TC and reply.edns == -1
    failed = dns.message.from_wire(decision.reply(None))
    assert failed.rcode() == dns.rcode.SERVFAIL and failed.id == query.id


def test_sources_outside_the_tunnel_are_refused_everything() -> None:
    for name in ("www.example.test", f"peer.{DOMAIN}"):
        r = ask(name, trusted=False)
        assert r.rcode() == dns.rcode.REFUSED and not r.answer


@pytest.mark.parametrize(("name", "rdtype", "rdclass"), [
    (DOMAIN, "AXFR", "IN"), ("www.example.test", "IXFR", "IN"),
    ("version.bind", "TXT", "CH")])
def test_zone_transfers_and_other_classes_are_refused(name: str, rdtype: str,
                                                      rdclass: str) -> None:
    assert ask(name, rdtype, rdclass).rcode() == dns.rcode.REFUSED


def _header_rcode(wire: bytes | Forward | None) -> int:
    assert isinstance(wire, bytes) and len(wire) >= 12 and wire[2] & 0x80
    return wire[3] & 0x0F


def test_hostile_messages_get_formerr_or_notimp_inside_and_silence_outside() -> None:
    good = dns.message.make_query(f"peer.{DOMAIN}", "A")
    update = dns.message.make_query(f"peer.{DOMAIN}", "A")
    update.set_opcode(dns.opcode.UPDATE)
    two = bytearray(good.to_wire())
    two[5] = 2
    two += good.to_wire()[12:]
    opt_question = dns.message.make_query(".", "OPT")
    cases = {
        "malformed": (good.to_wire()[:-3], dns.rcode.FORMERR),
        "oversize": (good.to_wire() + bytes(5000), dns.rcode.FORMERR),
        "two questions": (bytes(two), dns.rcode.FORMERR),
        "opcode UPDATE": (update.to_wire(), dns.rcode.NOTIMP),
        "OPT question": (opt_question.to_wire(), dns.rcode.FORMERR),
    }
    for what, (wire, rcode) in cases.items():
        assert _header_rcode(decide(TABLE, wire, trusted=True)) == rcode, what
        assert decide(TABLE, wire, trusted=False) is None, what
    response = dns.message.make_response(good).to_wire()
    for wire in (b"", b"\x00" * 11, response):  # no header, or a response: never answered
        assert decide(TABLE, wire, trusted=True) is None


def _check_no_escape(wire: bytes) -> None:
    for trusted in (True, False):
        decision = decide(TABLE, wire, trusted=trusted)
        if isinstance(decision, bytes):
            assert decision[:2] == wire[:2] and decision[2] & 0x80
            if not trusted:
                assert decision[3] & 0x0F == dns.rcode.REFUSED
        elif isinstance(decision, Forward):
            assert trusted
            decision.reply(None)


@settings(max_examples=examples(500))
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_never_raise(wire: bytes) -> None:
    _check_no_escape(wire)


@settings(max_examples=examples(200))
@given(st.integers(0, 2**32 - 1))
def test_fuzz_mutated_queries_never_raise(seed: int) -> None:
    for wire in hostile_datagrams(20, seed):
        _check_no_escape(wire)


def test_resolve_takes_short_or_full_names_and_never_guesses() -> None:
    for name in ("peer", "peer.", "PEER", f"peer.{DOMAIN}", f"Peer.{DOMAIN.upper()}."):
        assert TABLE.resolve(name) == ["100.64.0.2", f"{ULA}2"], name
    for name in ("nobody", f"www.peer.{DOMAIN}", "peer.example.test", DOMAIN):
        assert TABLE.resolve(name) == [], name


def test_update_swaps_the_table_renamed_and_removed_nodes_stop_resolving() -> None:
    responder = DnsResponder(NETMAP, DOMAIN, "100.64.0.1")
    assert responder.resolve("db") == ["100.64.0.3", f"{ULA}3"]
    responder.update(RENAMED)
    assert responder.resolve("peer") == [] and responder.resolve("db") == []
    assert responder.resolve("peer-renamed") == ["100.64.0.2", f"{ULA}2"]
    assert ask(f"peer.{DOMAIN}", table=responder.table).rcode() == dns.rcode.NXDOMAIN
    # The new table reuses the old one's parsed addresses and keeps only its own: what it
    # holds is bounded by the netmap, however many nodes come and go.
    old, new = responder.table, NameTable.from_netmap(NETMAP, DOMAIN, responder.table)
    assert new.parsed["100.64.0.2"] is old.parsed["100.64.0.2"]
    assert "100.64.0.3" not in old.parsed and "100.64.0.3" in new.parsed
    assert ask("3.0.64.100.in-addr.arpa", "PTR", table=new).rcode() == dns.rcode.NOERROR


def test_a_responder_never_forwards_to_itself() -> None:
    responder = DnsResponder(NETMAP, DOMAIN, "100.64.0.1",
                             upstreams=[("100.64.0.1", 53), ("192.0.2.53", 53)])
    assert responder.upstreams == [("192.0.2.53", 53)]


def test_trust_is_loopback_or_a_node_of_the_netmap() -> None:
    assert TABLE.trusts("127.0.0.1") and TABLE.trusts("::1")
    assert TABLE.trusts("100.64.0.3") and TABLE.trusts(f"{ULA.upper()}0:2")
    assert not TABLE.trusts("100.64.0.9") and not TABLE.trusts("203.0.113.7")
    assert not TABLE.trusts("not an address")


def test_rate_limiter_allows_bursts_refills_over_time_and_stays_bounded() -> None:
    limiter = RateLimiter(rate=10, burst=3, max_sources=2)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("a", 0.1) and not limiter.allow("a", 0.1)
    limiter.allow("b", 0.1)
    limiter.allow("c", 0.1)  # forgets "a", the longest idle
    assert limiter.allow("a", 0.1)
