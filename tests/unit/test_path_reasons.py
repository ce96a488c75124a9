"""Paths that explain themselves and can be pinned, on the traversal simulator's fake clock;
and the node's own life-cycle state (pending, expired, key expiring)."""

from __future__ import annotations

from typing import Any

import pytest
from test_traversal_sim import USER, Sim, SimNode, both_direct

from wgmesh import traversal as tr
from wgmesh.keys import PrivateKey
from wgmesh.netmap import NodeInfo
from wgmesh.node.lifecycle import self_state, warn_at
from wgmesh.node.status import PeerStatus, path_reason, tried_json

pytestmark = pytest.mark.unit


def _record(node: SimNode) -> list[Any]:
    """Keep the actions the simulator does not act on (PinFailed)."""
    seen: list[Any] = []
    do = node.do

    def do_and_keep(actions: list[Any]) -> None:
        seen.extend(actions)
        do(actions)

    node.do = do_and_keep  # type: ignore[method-assign]
    return seen


def _info(a: SimNode, b: SimNode) -> tr.PathInfo:
    info = a.t.path(b.key)
    assert info is not None
    return info


def test_a_new_peer_is_still_probing_then_direct_with_its_candidates_listed() -> None:
    sim = Sim()
    a, b = sim.add("a", "eim"), sim.add("b", "eim")
    sim.connect(a, b)
    assert _info(a, b).reason == tr.REASON_PROBING
    assert sim.run_until(both_direct(a, b), 5) is not None
    info = _info(a, b)
    assert info.reason == tr.REASON_DIRECT
    results = {c.addr: c.result for c in info.tried}
    assert results[info.endpoint] == "answered"  # type: ignore[index]
    assert {"netmap"} <= {s for c in info.tried for s in c.sources}
    assert {c["result"] for c in tried_json(info)} <= {"answered", "no answer", "not tried"}


def _symmetric_pair_info() -> tr.PathInfo:
    """What a knows of b, both behind endpoint-dependent NATs, after 30 s."""
    sim = Sim()
    a, b = sim.add("a", "symmetric"), sim.add("b", "symmetric")
    sim.connect(a, b)
    sim.run(30)
    return _info(a, b)


def test_endpoint_dependent_nat_on_both_sides_is_named() -> None:
    info = _symmetric_pair_info()
    assert info.state is tr.PathState.RELAY and info.reason == tr.REASON_HARD_BOTH
    assert info.tried and all(c.result == "no answer" for c in info.tried)


def test_local_udp_blocked_is_named() -> None:
    sim = Sim()
    a, b = sim.add("a", "eim"), sim.add("b", "eim")
    sim.connect(a, b)
    a.nat.blocked = True
    a.do(a.t.set_local(a.publish(), sim.now, udp=False))
    sim.run(30)
    assert a.path(b) == "relay" and _info(a, b).reason == tr.REASON_UDP_BLOCKED


def test_no_common_address_family_is_named() -> None:
    sim = Sim()
    a, b = sim.add("a", "eim"), sim.add("b", "eim")
    sim.connect(a, b)
    a.do(a.t.set_local([("2001:db8::1", 41641)], sim.now))  # a has IPv6 only, b IPv4 only
    a.nat.blocked = True
    sim.run(30)
    assert _info(a, b).reason == tr.REASON_NO_FAMILY


def test_pin_relay_holds_through_reprobes_and_unpin_goes_direct_again() -> None:
    sim = Sim()
    a, b = sim.add("a", "eim"), sim.add("b", "eim")
    sim.connect(a, b)
    assert sim.run_until(both_direct(a, b), 5) is not None
    a.do(a.t.pin(b.key, "relay", sim.now))
    assert a.path(b) == "relay"
    assert a.events[-1][1].path == "relay" and a.events[-1][1].reason == "pinned"
    sim.run(sim.now + 130)  # two re-probe rounds answer, and change nothing
    info = _info(a, b)
    assert info.state is tr.PathState.RELAY and info.reason == tr.REASON_PINNED
    assert info.pinned == "relay"
    assert b.path(a) == "relay"  # unanswered, the peer follows onto the relay
    assert _info(b, a).reason == tr.REASON_NO_ANSWER
    a.do(a.t.pin(b.key, None, sim.now))
    assert sim.run_until(both_direct(a, b), sim.now + 65) is not None
    assert _info(a, b).reason == tr.REASON_DIRECT


def test_a_direct_pin_that_cannot_be_had_reports_pin_failed() -> None:
    sim = Sim()
    a, b = sim.add("a", "symmetric", USER), sim.add("b", "symmetric", USER)
    seen = _record(a)
    sim.connect(a, b)
    a.do(a.t.pin(b.key, "direct", sim.now))
    sim.run(10)
    failed = [x for x in seen if isinstance(x, tr.PinFailed)]
    assert failed and failed[0].mode == "direct" and failed[0].key == b.key
    assert failed[0].reason == tr.REASON_HARD_BOTH
    assert a.path(b) == "relay"  # the relay keeps the peer reachable meanwhile
    with pytest.raises(ValueError):
        a.t.pin(b.key, "sideways", sim.now)


def test_status_says_offline_and_tells_the_story() -> None:
    info = _symmetric_pair_info()
    assert path_reason(info, online=False) == tr.REASON_OFFLINE
    assert path_reason(None, online=True) == "not configured yet"
    ps = PeerStatus(name="b", ipv4="100.64.0.2", ipv6="fd00::2", key="k", online=True,
                    path="relay", endpoint=None, relay_region=1, rtt_ms=None,
                    last_handshake=None, rx_bytes=0, tx_bytes=0,
                    reason=path_reason(info, True), candidates=tried_json(info), pinned=None)
    story = ps.explain()
    assert story.startswith("b (100.64.0.2): relay region 1, because: "
                            "endpoint-dependent NAT on both sides")
    assert "candidates tried:" in story and "no answer" in story


def _me(**kw: Any) -> NodeInfo:
    k = PrivateKey.generate().public
    return NodeInfo(id=1, name="a", node_key=k, disco_key=k, ipv4="100.64.0.1",
                    ipv6="fd7a::1", **kw)


def test_self_state_pending_expired_running() -> None:
    assert self_state(_me(approved=False), 100.0)[0] == "pending"
    state, why = self_state(_me(key_expiry=50.0), 100.0)
    assert state == "expired" and "re-authenticate" in why
    assert self_state(_me(key_expiry=150.0), 100.0) == ("running", "")
    assert self_state(_me(key_expiry=0.0), 100.0) == ("running", "")


def test_key_expiring_warns_seven_days_ahead_or_a_tenth_of_what_is_left() -> None:
    day = 86400.0
    assert warn_at(0.0, 0.0) is None
    assert warn_at(180 * day, 0.0) == 173 * day
    assert warn_at(3600.0, 0.0) == 3600.0 - 360.0


def test_key_expiry_watch_emits_once_ahead_of_the_expiry() -> None:
    import asyncio
    import time

    from wgmesh.node.lifecycle import KeyExpiryWatch

    async def run() -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        fired = asyncio.Event()

        def emit(name: str, data: dict[str, Any]) -> None:
            got.append((name, data))
            fired.set()

        watch = KeyExpiryWatch(emit)
        expiry = time.time() + 1.0
        watch.update(expiry)
        watch.update(expiry)  # unchanged: no second timer
        await asyncio.wait_for(fired.wait(), 5)
        watch.update(0.0)  # never expires: nothing more
        watch.close()
        return got

    got = asyncio.run(run())
    assert [name for name, _ in got] == ["key_expiring"]
    assert 0 < got[0][1]["in_s"] <= 0.2
