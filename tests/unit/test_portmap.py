"""PCP / NAT-PMP codecs and client machines: RFC layouts, real replies, rejections, fuzzing.

The reply builders below write each field at the byte offset RFC 6887 section 7
and 11.1 / RFC 6886 sections 3.2 and 3.3 give, independently of the encoder.
The ``MINIUPNPD_*`` vectors are replies captured from miniupnpd 2.3.1 (Debian
bookworm) in a throwaway namespace lab: LAN host 198.51.100.10, router WAN
192.0.2.1.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmesh import portmap as pm

pytestmark = pytest.mark.unit

NONCE = bytes(range(1, 13))
LAN_IP = "198.51.100.10"
WAN_IP = "192.0.2.1"
WG_PORT = 51820


# ------------------------------------------------------- replies, by the RFC


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def pcp_header(*, opcode: int = 1, result: int = 0, lifetime: int = 7200, epoch: int = 100,
               version: int = 2) -> bytearray:
    """RFC 6887 s7.2: version(0) R|opcode(1) reserved(2) result(3) lifetime(4:8)
    epoch(8:12) reserved(12:24)."""
    out = bytearray(24)
    out[0], out[1], out[3] = version, 0x80 | opcode, result
    out[4:8], out[8:12] = be(lifetime, 4), be(epoch, 4)
    return out


def pcp_map_reply(*, nonce: bytes = NONCE, internal: int = WG_PORT, ext_ip: str = WAN_IP,
                  ext_port: int = 40000, protocol: int = 17, **header: int) -> bytes:
    """RFC 6887 s11.1 after the header: nonce(24:36) protocol(36) reserved(37:40)
    internal port(40:42) external port(42:44) external address(44:60)."""
    out = pcp_header(**header) + bytearray(36)
    out[24:36], out[36] = nonce, protocol
    out[40:42], out[42:44] = be(internal, 2), be(ext_port, 2)
    addr = ipaddress.ip_address(ext_ip)
    out[44:60] = (ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else addr).packed
    return bytes(out)


def natpmp_address_reply(ip: str = WAN_IP, *, epoch: int = 100, result: int = 0) -> bytes:
    """RFC 6886 s3.2: version 0, op 128, result(2:4), epoch(4:8), address(8:12)."""
    return bytes((0, 128)) + be(result, 2) + be(epoch, 4) + ipaddress.IPv4Address(ip).packed


def natpmp_map_reply(*, internal: int = WG_PORT, external: int = 40000, lifetime: int = 7200,
                     epoch: int = 100, result: int = 0, op: int = 1) -> bytes:
    """RFC 6886 s3.3: version 0, op 128+x, result(2:4), epoch(4:8), internal(8:10),
    external(10:12), lifetime(12:16)."""
    return (bytes((0, 128 + op)) + be(result, 2) + be(epoch, 4) + be(internal, 2)
            + be(external, 2) + be(lifetime, 4))


MINIUPNPD_NATPMP_ADDRESS = bytes.fromhex("008000000000000ac0000201")
MINIUPNPD_NATPMP_MAP = bytes.fromhex("008100000000000aa028a02800000e10")
MINIUPNPD_NATPMP_DELETED = bytes.fromhex("0081000000000001afc8000000000000")
MINIUPNPD_PCP_ANNOUNCE = bytes.fromhex("02800000000000000000000a" + "00" * 12)
MINIUPNPD_PCP_MAP = bytes.fromhex(
    "0281000000000e100000000a000000000000000000000000"
    "00112233445566778899aabb11000000a410a410"
    "00000000000000000000ffffc0000201")
MINIUPNPD_PCP_ADDRESS_MISMATCH = bytes.fromhex(
    "0281000c000000000000000a000000000000000000000000"
    "77777be8299b723a5f4d2f6d11000000a4110000"
    "00000000000000000000ffff00000000")


# ------------------------------------------------------------ request layout


def test_natpmp_requests_follow_rfc6886() -> None:
    assert pm.encode_natpmp_address() == b"\x00\x00"
    req = pm.encode_natpmp_map(WG_PORT, 7200, suggested_port=40000)
    assert len(req) == 12
    assert req[0:2] == b"\x00\x01" and req[2:4] == b"\x00\x00"  # version, op UDP, reserved
    assert req[4:6] == be(WG_PORT, 2) and req[6:8] == be(40000, 2) and req[8:12] == be(7200, 4)
    assert pm.encode_natpmp_map(22, 60, protocol=pm.TCP)[1] == 2
    # deletion: lifetime 0 and the suggested port must be 0 (s3.4)
    assert pm.encode_natpmp_map(WG_PORT, 0, suggested_port=40000)[6:12] == bytes(6)


def test_pcp_map_request_follows_rfc6887() -> None:
    req = pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 7200)
    assert len(req) == 60
    assert req[0] == 2 and req[1] == 1 and req[2:4] == b"\x00\x00"  # version, R=0 MAP, reserved
    assert req[4:8] == be(7200, 4)
    assert req[8:24] == bytes(10) + b"\xff\xff" + bytes((198, 51, 100, 10))  # IPv4-mapped
    assert req[24:36] == NONCE and req[36] == 17 and req[37:40] == bytes(3)
    assert req[40:42] == be(WG_PORT, 2) and req[42:44] == b"\x00\x00"
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # ::ffff:0.0.0.0: "any IPv4"


def test_pcp_map_request_suggestion_and_ipv6() -> None:
    req = pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 0, suggested=(WAN_IP, 40000))
    assert req[4:8] == bytes(4)  # lifetime 0 deletes
    assert req[42:44] == be(40000, 2) and req[44:60] == bytes(10) + b"\xff\xff" + bytes(
        (192, 0, 2, 1))
    v6 = pm.encode_pcp_map(NONCE, "2001:db8::10", WG_PORT, 60)
    assert v6[8:24] == ipaddress.IPv6Address("2001:db8::10").packed
    assert v6[44:60] == bytes(16)  # "::": any IPv6


def test_pcp_announce_request() -> None:
    req = pm.encode_pcp_announce(LAN_IP)
    assert len(req) == 24 and req[:8] == bytes((2, 0, 0, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("call", [
    lambda: pm.encode_pcp_map(b"short", LAN_IP, WG_PORT, 60),
    lambda: pm.encode_pcp_map(NONCE, "not-an-ip", WG_PORT, 60),
    lambda: pm.encode_pcp_map(NONCE, LAN_IP, 0, 60),
    lambda: pm.encode_pcp_map(NONCE, LAN_IP, 70000, 60),
    lambda: pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 2**32),
    lambda: pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 60, protocol=0),
    lambda: pm.encode_natpmp_map(WG_PORT, -1),
    lambda: pm.encode_natpmp_map(WG_PORT, 60, protocol=1),
])
def test_encoders_refuse_bad_arguments(call: object) -> None:
    with pytest.raises(pm.PortmapError):
        call()  # type: ignore[operator]


# ------------------------------------------------------ real gateway replies


def test_miniupnpd_natpmp_replies() -> None:
    assert pm.decode_natpmp(MINIUPNPD_NATPMP_ADDRESS) == pm.NatPmpResponse(
        opcode=0, result=0, epoch=10, external_ip=WAN_IP)
    assert pm.decode_natpmp(MINIUPNPD_NATPMP_MAP) == pm.NatPmpResponse(
        opcode=1, result=0, epoch=10, internal_port=41000, external_port=41000, lifetime=3600)
    tx = pm.NatPmpMap(0.0, internal_port=41000, lifetime=3600)
    assert tx.receive(MINIUPNPD_NATPMP_MAP) is None  # still needs the address
    assert tx.receive(MINIUPNPD_NATPMP_ADDRESS) == pm.Mapping(
        "natpmp", 41000, (WAN_IP, 41000), 3600, 10)


def test_miniupnpd_natpmp_deletion() -> None:
    tx = pm.NatPmpMap(0.0, internal_port=45000, lifetime=0)
    assert tx.requests == (pm.encode_natpmp_map(45000, 0),)
    assert tx.receive(MINIUPNPD_NATPMP_DELETED) == pm.Deleted("natpmp", 45000)


def test_miniupnpd_pcp_replies() -> None:
    nonce = bytes.fromhex("00112233445566778899aabb")
    msg = pm.decode_pcp(MINIUPNPD_PCP_MAP)
    assert (msg.version, msg.opcode, msg.result, msg.lifetime, msg.epoch) == (2, 1, 0, 3600, 10)
    assert msg.nonce == nonce and msg.protocol == 17 and msg.internal_port == 42000
    assert msg.external == (WAN_IP, 42000) and msg.options == ()
    tx = pm.PcpMap(0.0, nonce=nonce, client_ip=LAN_IP, internal_port=42000, lifetime=3600)
    assert tx.receive(MINIUPNPD_PCP_MAP) == pm.Mapping("pcp", 42000, (WAN_IP, 42000), 3600, 10)
    announce = pm.decode_pcp(MINIUPNPD_PCP_ANNOUNCE)
    assert (announce.opcode, announce.result, announce.epoch) == (pm.OP_ANNOUNCE, 0, 10)


def test_miniupnpd_pcp_address_mismatch() -> None:
    nonce = bytes.fromhex("77777be8299b723a5f4d2f6d")
    tx = pm.PcpMap(0.0, nonce=nonce, client_ip="198.51.100.99", internal_port=42001)
    assert tx.receive(MINIUPNPD_PCP_ADDRESS_MISMATCH) == pm.Failure(
        "pcp", "gateway answered ADDRESS_MISMATCH", code=12, retry_after=0)


# ---------------------------------------------------------------- decoding


def test_pcp_options_are_parsed() -> None:
    option = bytes((3, 0)) + be(5, 2) + b"abcde" + bytes(3)  # FILTER-ish, padded to 4
    msg = pm.decode_pcp(pcp_map_reply() + option + bytes((2, 0, 0, 0)))
    assert msg.options == ((3, b"abcde"), (2, b""))


@pytest.mark.parametrize(("data", "why"), [
    (b"", "too short"),
    (bytes(pcp_header())[:20], "too short"),
    (bytes(pcp_header()) + bytes(1100), "too long"),
    (pcp_map_reply() + b"\x00\x00", "multiple of 4"),
    (bytes((2, 1)) + bytes(58), "request"),
    (bytes(pcp_header(version=3)), "version 3"),
    (bytes(pcp_header(opcode=2)), "opcode 2"),
    (bytes(pcp_header(opcode=1)) + bytes(32), "MAP reply too short"),
    (bytes(pcp_header(opcode=1)), "MAP reply too short"),  # a success needs the MAP fields
    (pcp_map_reply() + bytes((1, 0, 0, 9)) + bytes(4), "overruns"),
    (pcp_map_reply() + bytes((1, 0)), "multiple of 4"),
    (natpmp_map_reply(), "NAT-PMP reply, not a PCP one"),
])
def test_pcp_decoder_rejects(data: bytes, why: str) -> None:
    with pytest.raises(pm.PortmapError, match=why):
        pm.decode_pcp(data)


@pytest.mark.parametrize(("data", "why"), [
    (b"\x00\x80\x00", "too short"),
    (natpmp_map_reply() + b"\x00", "too long"),
    (bytes((2,)) + natpmp_address_reply()[1:], "version 2"),
    (bytes((0, 1)) + bytes(10), "request"),
    (natpmp_address_reply() + bytes(4), "not 12"),
    (natpmp_map_reply()[:12], "not 16"),
    (bytes((0, 128 + 9)) + bytes(6), "opcode 9"),
])
def test_natpmp_decoder_rejects(data: bytes, why: str) -> None:
    with pytest.raises(pm.PortmapError, match=why):
        pm.decode_natpmp(data)


def test_natpmp_error_replies_need_not_be_full_size() -> None:
    short = bytes((0, 129)) + be(1, 2) + be(7, 4)  # RFC 6886 s3.5 "Unsupported Version"
    assert pm.decode_natpmp(short) == pm.NatPmpResponse(1, 1, 7, internal_port=None)
    full = natpmp_map_reply(result=4, external=0, lifetime=0)
    assert pm.decode_natpmp(full).internal_port == WG_PORT


# ------------------------------------------------------------- PCP matching


def pcp_tx(**kw: object) -> pm.PcpMap:
    args: dict[str, object] = {"nonce": NONCE, "client_ip": LAN_IP, "internal_port": WG_PORT}
    args.update(kw)
    return pm.PcpMap(0.0, **args)  # type: ignore[arg-type]


def test_pcp_success() -> None:
    tx = pcp_tx()
    assert tx.receive(pcp_map_reply(ext_port=61000, lifetime=3600, epoch=5)) == pm.Mapping(
        "pcp", WG_PORT, (WAN_IP, 61000), 3600, 5)
    assert tx.next_deadline is None and tx.on_timeout(100.0) == []


@pytest.mark.parametrize(("reply", "why"), [
    (pcp_map_reply(nonce=bytes(12)), "nonce"),
    (pcp_map_reply(internal=WG_PORT + 1), "port 51821"),
    (pcp_map_reply(protocol=6), "protocol 6"),
    (bytes(pcp_header(opcode=0)), "opcode 0, not MAP"),
    (natpmp_map_reply(), "NAT-PMP reply"),
    (b"garbage", "too short"),
])
def test_pcp_replies_not_ours_are_ignored_and_quoted(reply: bytes, why: str) -> None:
    tx = pcp_tx(rto=1.0, max_sends=2)
    assert tx.receive(reply) is None and tx.result is None
    assert tx.on_timeout(1.0) == list(tx.requests)  # still waiting: resend
    assert tx.on_timeout(3.0) == []
    assert isinstance(tx.result, pm.Failure) and tx.result.code is None
    assert "no valid reply after 2 sends" in tx.result.reason and why in tx.result.reason


@pytest.mark.parametrize(("reply", "why"), [
    (pcp_map_reply(lifetime=0), "lease of 0 s"),
    (pcp_map_reply(ext_port=0), "external port 0"),
    (pcp_map_reply(ext_ip="0.0.0.0"), "unspecified"),
    (pcp_map_reply(ext_ip="127.0.0.1"), "loopback"),
    (pcp_map_reply(ext_ip="224.0.0.1"), "multicast"),
    (pcp_map_reply(ext_ip="169.254.1.1"), "link-local"),
    (pcp_map_reply(ext_ip="240.0.0.1"), "reserved"),
    (pcp_map_reply(ext_ip="2001:db8::1"), "other family"),
])
def test_pcp_wrong_endpoints_are_failures_never_mappings(reply: bytes, why: str) -> None:
    result = pcp_tx().receive(reply)
    assert isinstance(result, pm.Failure) and why in result.reason


def test_pcp_private_external_address_is_fine() -> None:
    """Double NAT: the gateway's own WAN address is private, and that is the truth."""
    assert isinstance(pcp_tx().receive(pcp_map_reply(ext_ip="10.1.2.3")), pm.Mapping)


def test_pcp_error_codes() -> None:
    result = pcp_tx().receive(pcp_map_reply(result=8, lifetime=30))
    assert result == pm.Failure("pcp", "gateway answered NO_RESOURCES", code=8, retry_after=30)
    unknown = pcp_tx().receive(pcp_map_reply(result=99))
    assert isinstance(unknown, pm.Failure) and "unknown result code 99" in unknown.reason
    # a gateway that could not parse the request answers with the header alone
    header_only = pcp_tx().receive(bytes(pcp_header(result=3, lifetime=0)))
    assert isinstance(header_only, pm.Failure) and "MALFORMED_REQUEST" in header_only.reason


def test_pcp_finds_a_natpmp_only_gateway() -> None:
    """RFC 6887 s9: a NAT-PMP gateway answers a PCP request with version 0, result 1."""
    reply = bytes((0, 129)) + be(1, 2) + be(50, 4)
    result = pcp_tx().receive(reply)
    assert isinstance(result, pm.Failure) and result.code == 1
    assert "speaks NAT-PMP" in result.reason
    older = pcp_tx().receive(bytes(pcp_header(version=1, result=1)))
    assert isinstance(older, pm.Failure) and "PCP version 1" in older.reason


def test_pcp_deletion() -> None:
    assert pcp_tx(lifetime=0).receive(pcp_map_reply(lifetime=0)) == pm.Deleted("pcp", WG_PORT)
    kept = pcp_tx(lifetime=0).receive(pcp_map_reply(lifetime=60))
    assert isinstance(kept, pm.Failure) and "kept the mapping" in kept.reason


def test_pcp_ipv6() -> None:
    tx = pcp_tx(client_ip="2001:db8::10")
    assert tx.receive(pcp_map_reply(ext_ip="2001:db8:1::1")) == pm.Mapping(
        "pcp", WG_PORT, ("2001:db8:1::1", 40000), 7200, 100)


def test_retransmission_schedule_doubles() -> None:
    tx = pcp_tx(rto=0.25, max_sends=4)
    assert tx.next_deadline == 0.25
    assert tx.on_timeout(0.2) == []  # not due
    sends = []
    now = 0.0
    while tx.result is None:
        now = tx.next_deadline or now
        sends.append((now, len(tx.on_timeout(now))))
    assert sends == [(0.25, 1), (0.75, 1), (1.75, 1), (3.75, 0)]


# --------------------------------------------------------- NAT-PMP matching


def natpmp_tx(**kw: object) -> pm.NatPmpMap:
    args: dict[str, object] = {"internal_port": WG_PORT}
    args.update(kw)
    return pm.NatPmpMap(0.0, **args)  # type: ignore[arg-type]


def test_natpmp_asks_for_address_and_mapping_and_resends_only_the_missing() -> None:
    tx = natpmp_tx(suggested_port=40000)
    assert tx.requests == (pm.encode_natpmp_map(WG_PORT, 7200, suggested_port=40000),
                           pm.encode_natpmp_address())
    assert tx.receive(natpmp_address_reply()) is None
    assert tx.on_timeout(0.25) == [tx.requests[0]]
    assert tx.receive(natpmp_map_reply(epoch=101)) == pm.Mapping(
        "natpmp", WG_PORT, (WAN_IP, 40000), 7200, 101)


def test_natpmp_mapping_to_another_internal_port_is_not_ours() -> None:
    tx = natpmp_tx(rto=1.0, max_sends=1)
    tx.receive(natpmp_address_reply())
    assert tx.receive(natpmp_map_reply(internal=WG_PORT + 1)) is None
    assert tx.on_timeout(1.0) == []
    assert isinstance(tx.result, pm.Failure)
    assert "internal port 51821, not 51820" in tx.result.reason


@pytest.mark.parametrize(("replies", "why"), [
    ([natpmp_map_reply(lifetime=0)], "lease of 0 s"),
    ([natpmp_map_reply(external=0), natpmp_address_reply()], "external port 0"),
    ([natpmp_address_reply("0.0.0.0"), natpmp_map_reply()], "unspecified"),
    ([natpmp_map_reply(result=2, external=0, lifetime=0)], "NOT_AUTHORIZED"),
    ([natpmp_address_reply(result=3)], "NETWORK_FAILURE"),
    ([natpmp_map_reply(result=42)], "unknown result code 42"),
])
def test_natpmp_failures(replies: list[bytes], why: str) -> None:
    tx = natpmp_tx()
    results = [tx.receive(r) for r in replies]
    assert isinstance(results[-1], pm.Failure) and why in results[-1].reason


def test_natpmp_ignores_what_it_did_not_ask() -> None:
    tx = natpmp_tx(lifetime=0)  # deletion: no address request
    assert tx.receive(natpmp_address_reply()) is None and "not asked" in (tx.rejected or "")
    assert tx.receive(natpmp_map_reply(op=2)) is None  # TCP, we asked UDP
    assert tx.receive(MINIUPNPD_PCP_ANNOUNCE) is None and tx.result is None


# -------------------------------------------------------------------- epoch


def test_pcp_epoch_rules() -> None:
    e = pm.Epoch("pcp")
    assert not e.observe(1000, 0.0)
    assert not e.observe(1100, 100.0)  # in step
    assert not e.observe(1099, 100.5)  # reordered by a second: tolerated
    assert e.observe(5, 101.0)  # went back: reboot
    assert not e.observe(65, 161.0)
    assert e.observe(1065, 171.0)  # server time ran far faster than ours
    assert not e.observe(1075, 181.0)
    assert e.observe(1076, 281.0)  # or far slower (its clock restarted in between)


def test_natpmp_epoch_rules() -> None:
    e = pm.Epoch("natpmp")
    assert not e.observe(1000, 0.0)
    assert not e.observe(1086, 100.0)  # 7/8 of 100 s is enough
    assert not e.observe(1172, 200.0)  # at least 1086 + 87.5 - 2 = 1171.5 expected
    assert e.observe(1257, 300.0)  # at least 1172 + 87.5 - 2 = 1257.5 expected
    assert e.observe(3, 301.0)


# -------------------------------------------------------------------- lease


def pcp_lease(**kw: object) -> pm.Lease:
    args: dict[str, object] = {"internal_port": WG_PORT, "client_ip": LAN_IP, "nonce": NONCE,
                               "lifetime": 600}
    args.update(kw)
    return pm.Lease("pcp", **args)  # type: ignore[arg-type]


def mapped(lease: pm.Lease, now: float = 0.0, **reply: object) -> None:
    lease.start(now)
    assert lease.receive(pcp_map_reply(**{"lifetime": 600, **reply}), now) == []  # type: ignore[arg-type]
    assert [type(e) for e in lease.events()] == [pm.Mapped]


def test_lease_maps_renews_at_half_and_deletes() -> None:
    lease = pcp_lease()
    first = lease.start(0.0)
    assert first == [pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 600)]
    assert lease.state == "mapping" and lease.next_deadline == 0.25
    lease.receive(pcp_map_reply(lifetime=600, epoch=10), 0.1)
    mapping = pm.Mapping("pcp", WG_PORT, (WAN_IP, 40000), 600, 10)
    assert lease.events() == [pm.Mapped(mapping, renewal=False)]
    assert lease.state == "mapped" and lease.next_deadline == 300.1
    assert lease.on_timeout(200.0) == []
    renew = lease.on_timeout(300.1)
    assert renew == [pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 600, suggested=(WAN_IP, 40000))]
    lease.receive(pcp_map_reply(lifetime=600, epoch=310), 300.2)
    assert lease.events() == [pm.Mapped(pm.Mapping("pcp", WG_PORT, (WAN_IP, 40000), 600, 310),
                                        renewal=True)]
    assert lease.delete(301.0) == [
        pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 0, suggested=(WAN_IP, 40000))]
    lease.receive(pcp_map_reply(lifetime=0, epoch=311), 301.1)
    assert lease.events() == [pm.Removed(WG_PORT)]
    assert lease.state == "deleted" and lease.mapping is None and lease.next_deadline is None
    assert lease.delete(302.0) == [] and lease.receive(pcp_map_reply(), 303.0) == []


def test_lease_endpoint_change_is_not_a_renewal() -> None:
    lease = pcp_lease()
    mapped(lease)
    lease.on_timeout(300.0)
    lease.receive(pcp_map_reply(lifetime=600, ext_port=40001), 300.1)
    (event,) = lease.events()
    assert isinstance(event, pm.Mapped) and not event.renewal
    assert event.mapping.external == (WAN_IP, 40001)


def test_lease_renewal_without_reply_retries_then_expires() -> None:
    lease = pcp_lease(rto=1.0, max_sends=2)
    mapped(lease)
    assert lease.on_timeout(300.0)  # renewal sent
    assert lease.on_timeout(301.0)  # resent
    assert lease.on_timeout(303.0) == [] and lease.state == "mapped"  # gave up: retry later
    assert lease.next_deadline == 303.0 + (600 - 303.0) / 2
    assert lease.events() == []
    now = lease.next_deadline
    while lease.state == "mapped":
        assert now is not None
        lease.on_timeout(now)
        now = lease.next_deadline
    (event,) = lease.events()
    assert isinstance(event, pm.Failed) and "lease expired" in event.failure.reason
    assert lease.mapping is None and lease.next_deadline is None


def test_lease_refused_renewal_fails_at_once() -> None:
    lease = pcp_lease()
    mapped(lease)
    lease.on_timeout(300.0)
    lease.receive(pcp_map_reply(result=2), 300.1)
    assert lease.events() == [pm.Failed(pm.Failure("pcp", "gateway answered NOT_AUTHORIZED",
                                                   code=2, retry_after=7200))]
    assert lease.state == "failed" and lease.receive(pcp_map_reply(), 301.0) == []


def test_lease_initial_failure_names_the_reason() -> None:
    lease = pcp_lease(rto=1.0, max_sends=1)
    lease.start(0.0)
    lease.receive(pcp_map_reply(nonce=bytes(12)), 0.5)  # spoofed: ignored
    lease.on_timeout(1.0)
    (event,) = lease.events()
    assert isinstance(event, pm.Failed) and "nonce" in event.failure.reason


def test_lease_lease0_is_never_a_mapping() -> None:
    lease = pcp_lease()
    lease.start(0.0)
    lease.receive(pcp_map_reply(lifetime=0), 0.1)
    (event,) = lease.events()
    assert isinstance(event, pm.Failed) and "lease of 0 s" in event.failure.reason
    assert lease.mapping is None


def test_lease_remaps_after_gateway_reboot_announced() -> None:
    lease = pcp_lease()
    mapped(lease, epoch=1000)
    announce = bytes(pcp_header(opcode=0, lifetime=0, epoch=0))
    out = lease.receive(announce, 10.0)
    assert out == [pm.encode_pcp_map(NONCE, LAN_IP, WG_PORT, 600, suggested=(WAN_IP, 40000))]
    assert lease.gateway_resets == 1
    lease.receive(pcp_map_reply(lifetime=600, epoch=1), 10.1)
    (event,) = lease.events()
    assert isinstance(event, pm.Mapped) and event.renewal and event.mapping.epoch == 1


def test_lease_ignores_consistent_announcements() -> None:
    lease = pcp_lease()
    mapped(lease, epoch=1000)
    for t in range(1, 50):
        assert lease.receive(bytes(pcp_header(opcode=0, lifetime=0, epoch=1000 + t)), t) == []
    assert lease.events() == [] and lease.gateway_resets == 0


def test_lease_announcement_flood_costs_one_request_per_holdoff() -> None:
    lease = pcp_lease(remap_holdoff=2.0)
    mapped(lease, epoch=1000)
    sent: list[float] = []
    for i in range(400):  # 20 s of announcements, each claiming a reboot
        now, epoch = 10.0 + i * 0.05, i % 2 * 5000
        due = lease.next_deadline
        out = lease.on_timeout(now) if due is not None and now >= due else []
        out += lease.receive(bytes(pcp_header(opcode=0, epoch=epoch)), now)
        sent += [now] * len(out)
        if out:  # the gateway answers each re-map at once
            lease.receive(pcp_map_reply(lifetime=600, epoch=epoch), now)
    assert 9 <= len(sent) <= 11, sent
    assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(sent)), sent
    assert all(isinstance(e, pm.Mapped) and e.renewal for e in lease.events())
    assert lease.mapping is not None and lease.mapping.external == (WAN_IP, 40000)


def test_lease_remap_waits_for_the_drivers_random_delay() -> None:
    lease = pcp_lease(remap_delay=3.0)
    mapped(lease, epoch=1000)
    assert lease.receive(bytes(pcp_header(opcode=0, epoch=0)), 10.0) == []
    assert lease.next_deadline == 13.0
    assert len(lease.on_timeout(13.0)) == 1


def test_lease_gateway_initiated_map_reply_triggers_a_confirming_remap() -> None:
    lease = pcp_lease()
    mapped(lease, epoch=1000)
    # RFC 6887 s14.2: the gateway tells us our mapping changed; we ask it again
    out = lease.receive(pcp_map_reply(lifetime=600, ext_ip="192.0.2.77", epoch=1010), 10.0)
    assert len(out) == 1 and lease.events() == []
    assert lease.mapping is not None and lease.mapping.external == (WAN_IP, 40000)
    # the same from someone who does not know the nonce changes nothing
    lease2 = pcp_lease()
    mapped(lease2, epoch=1000)
    assert lease2.receive(pcp_map_reply(nonce=bytes(12), lifetime=600), 10.0) == []


def natpmp_lease(**kw: object) -> pm.Lease:
    args: dict[str, object] = {"internal_port": WG_PORT, "lifetime": 600}
    args.update(kw)
    return pm.Lease("natpmp", **args)  # type: ignore[arg-type]


def natpmp_mapped(lease: pm.Lease, epoch: int = 1000) -> None:
    lease.start(0.0)
    lease.receive(natpmp_map_reply(lifetime=600, epoch=epoch), 0.1)
    lease.receive(natpmp_address_reply(epoch=epoch), 0.1)
    assert [type(e) for e in lease.events()] == [pm.Mapped]


def test_natpmp_lease_address_announcement_triggers_remap_not_publication() -> None:
    lease = natpmp_lease()
    natpmp_mapped(lease)
    assert lease.receive(natpmp_address_reply(epoch=1010), 10.0) == []  # same address
    out = lease.receive(natpmp_address_reply("192.0.2.99", epoch=1010), 10.0)
    assert out == [pm.encode_natpmp_map(WG_PORT, 600, suggested_port=40000),
                   pm.encode_natpmp_address()]
    assert lease.events() == []  # nothing published from the announcement itself
    lease.receive(natpmp_map_reply(lifetime=600, epoch=1010), 10.1)
    lease.receive(natpmp_address_reply("192.0.2.99", epoch=1010), 10.1)
    (event,) = lease.events()
    assert isinstance(event, pm.Mapped) and event.mapping.external == ("192.0.2.99", 40000)


def test_natpmp_announcement_during_a_remap_never_passes_for_the_reply() -> None:
    """A flooded address announcement is byte for byte an address reply: only where it
    came in (the multicast group) tells them apart."""
    lease = natpmp_lease()
    natpmp_mapped(lease)
    lease.receive(natpmp_address_reply("192.0.2.99", epoch=1010), 10.0, announcement=True)
    lease.receive(natpmp_map_reply(lifetime=600, epoch=1010), 10.1)  # the remap's answer
    lie = natpmp_address_reply("203.0.113.66", epoch=1010)
    assert lease.receive(lie, 10.1, announcement=True) == []
    assert lease.events() == []  # still waiting for the real address reply
    lease.receive(natpmp_address_reply(epoch=1010), 10.2)
    (event,) = lease.events()
    assert isinstance(event, pm.Mapped) and event.mapping.external == (WAN_IP, 40000)


def test_natpmp_lease_reads_a_pcp_announcement_of_a_reboot() -> None:
    """miniupnpd announces its restart with PCP only, on the epoch both protocols share."""
    lease = natpmp_lease()
    natpmp_mapped(lease, epoch=1000)
    assert len(lease.receive(MINIUPNPD_PCP_ANNOUNCE, 20.0)) == 2  # epoch 10 < 1000: reboot
    assert lease.gateway_resets == 1


def test_natpmp_lease_deletes_a_mapping_it_never_held() -> None:
    """After kill -9 the next run removes the old NAT-PMP mapping (no nonce needed)."""
    lease = natpmp_lease()
    assert lease.delete(0.0) == [pm.encode_natpmp_map(WG_PORT, 0)]
    lease.receive(natpmp_map_reply(external=0, lifetime=0), 0.1)
    assert lease.events() == [pm.Removed(WG_PORT)]


def test_lease_refuses_bad_arguments() -> None:
    with pytest.raises(pm.PortmapError):
        pcp_lease(nonce=b"")
    with pytest.raises(pm.PortmapError):
        natpmp_lease(lifetime=0)
    with pytest.raises(pm.PortmapError):
        natpmp_lease(protocol=1)
    lease = natpmp_lease()
    lease.start(0.0)
    with pytest.raises(pm.PortmapError, match="already mapping"):
        lease.start(1.0)


# ------------------------------------------------------------------ fuzzing


@given(st.binary(max_size=1200))
def test_fuzz_pcp_decoder(data: bytes) -> None:
    try:
        msg = pm.decode_pcp(data)
    except pm.PortmapError:
        return
    assert msg.version in (0, 2) or msg.result == 1
    assert 24 <= len(data) <= pm.PCP_MAX_LEN or msg.version == 0


@given(st.binary(max_size=40))
def test_fuzz_natpmp_decoder(data: bytes) -> None:
    try:
        msg = pm.decode_natpmp(data)
    except pm.PortmapError:
        return
    assert 8 <= len(data) <= 16 and msg.opcode < 128


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut else out)


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), max_size=4),
       st.integers(0, 64))
def test_fuzz_mutated_replies_never_give_a_wrong_endpoint(
        flips: list[tuple[int, int]], cut: int) -> None:
    pcp = pcp_tx().receive(_mutate(pcp_map_reply(lifetime=600), flips, cut))
    if isinstance(pcp, pm.Mapping):
        assert pcp.lifetime > 0 and pcp.external[1] > 0 and pcp.internal_port == WG_PORT
        ip = ipaddress.ip_address(pcp.external[0])
        assert ip.version == 4 and not (ip.is_unspecified or ip.is_loopback or ip.is_multicast)
    tx = natpmp_tx()
    tx.receive(natpmp_address_reply())
    pmp = tx.receive(_mutate(natpmp_map_reply(), flips, cut))
    if isinstance(pmp, pm.Mapping):
        assert pmp.lifetime > 0 and pmp.external[0] == WAN_IP and pmp.external[1] > 0
        assert pmp.internal_port == WG_PORT


@given(st.lists(st.binary(max_size=80), max_size=8), st.sampled_from(["pcp", "natpmp"]))
def test_fuzz_lease_survives_any_datagrams(datagrams: list[bytes], method: str) -> None:
    lease = pcp_lease() if method == "pcp" else natpmp_lease()
    lease.start(0.0)
    for i, data in enumerate(datagrams):
        lease.receive(data, float(i))
        lease.on_timeout(float(i))
    for event in lease.events():
        if isinstance(event, pm.Mapped):
            assert event.mapping.lifetime > 0 and event.mapping.external[1] > 0
