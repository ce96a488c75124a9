"""A node with 500 peers (issue 14, Load): a netmap change is applied as a diff.

A real ``wgmesh up`` gets a real 500-peer netmap from control (500 nodes seeded into its
store, as ``benchmarks/node_scale.py`` does) plus one real peer it has a WireGuard
session with. Then one peer's endpoints change, one peer is deleted and one registers.
After each change the backend (read with ``wg show dump``, not through the agent) holds
exactly the netmap's peers, the agent reports a diff of one peer (or none, for an
endpoint: traversal takes it), and the real peer's session was never torn down: a
wholesale reconfiguration would drop its handshake and reset its counters, and so does a
path switch on kernel WireGuard (it re-adds the peer to force a handshake), which a data
plane too busy to read disco pongs in time used to make at random. Takes the backend as a
parameter for the kernel twin (an opt-in soak test: docs/reliability.md); the benchmark
has the timings."""

from __future__ import annotations

import itertools
import secrets
from typing import Any

from polling import wait_for

from wgmesh.keys import PrivateKey
from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import TIME_SCALE, Lab

SEEDED = 500


def _wg_peers(node: MeshNode, ifname: str) -> dict[str, tuple[int, int, int]]:
    """The backend's own view: peer key -> (latest handshake, rx, tx)."""
    lines = node.host.run(["wg", "show", ifname, "dump"]).stdout.splitlines()[1:]
    return {f[0]: (int(f[4]), int(f[5]), int(f[6])) for f in (ln.split("\t") for ln in lines)}


def _peers(node: MeshNode) -> list[dict[str, Any]]:
    """The agent's status peers (500 of them take a while under the VM's emulation)."""
    peers: list[dict[str, Any]] = node.call("status", timeout=30 * TIME_SCALE)["peers"]
    return peers


def _netmap_events(node: MeshNode) -> list[dict[str, Any]]:
    return [e["data"] for e in node.call("events", {"name": "netmap"}, timeout=30 * TIME_SCALE)]


def check_a_change_is_applied_as_a_diff(lab: Lab, backend: str) -> None:
    """The whole check on ``backend`` (the suite runs it on userspace)."""
    mesh = MeshLab(lab, relays=0, backend=backend)
    # Names of their own: the UAPI socket path is shared with other labs on this host.
    tag = secrets.token_hex(2)
    a = mesh.add_node(f"big{tag}", "none")
    b = mesh.add_node(f"pal{tag}", "none")
    ifname = f"wg{a.name}"
    mesh.wait_connected(60)
    wait_for(lambda: a.ping(b.name)["rtt_ms"] is not None, 30 * TIME_SCALE,
             "a ping through the tunnel to b")
    b_key = a.peer(b.name)["key"]  # type: ignore[index]
    session = _wg_peers(a, ifname)[b_key]
    assert session[0] > 0, "a has a WireGuard session with b before the changes"
    seen = [session]  # b's (handshake, rx, tx) at every read of a's backend from here on

    mesh.seed_nodes(SEEDED)

    def settled(want: int) -> dict[str, tuple[int, int, int]] | None:
        """The backend's peers once they are the netmap's ``want`` peers."""
        in_netmap = {p["key"] for p in _peers(a)}
        in_backend = _wg_peers(a, ifname)
        seen.append(in_backend.get(b_key, (0, 0, 0)))
        return in_backend if len(in_netmap) == want and set(in_backend) == in_netmap else None

    wait_for(lambda: settled(SEEDED + 1), 90 * TIME_SCALE,
             f"{SEEDED + 1} peers in netmap and backend")

    def change(do: Any, want: int, **kw: Any) -> tuple[int, int, int]:
        """Make one change through control; once the backend holds the new netmap's peers,
        the backend peers added, updated and removed by every netmap since (another
        delta, such as a peer coming online, may come in between; it touches none)."""
        seq = _netmap_events(a)[-1]["seq"]
        mesh.control_call(do, **kw)
        wait_for(lambda: any(e["seq"] > seq for e in _netmap_events(a)), 30 * TIME_SCALE,
                 "the change's netmap on a")
        wait_for(lambda: settled(want), 30 * TIME_SCALE,
                 f"{want} peers in netmap and backend")
        since = [e for e in _netmap_events(a) if e["seq"] > seq]
        return (sum(e["added"] for e in since), sum(e["updated"] for e in since),
                sum(e["removed"] for e in since))

    tokens = mesh.seed_nodes(2, prefix="more")  # two more, one of them to change
    wait_for(lambda: settled(SEEDED + 3), 60 * TIME_SCALE,
             "the two more in netmap and backend")

    assert change(lambda c: c.update(endpoints=["198.51.100.7:4242"]), SEEDED + 3,
                  node_token=tokens[0]) == (0, 0, 0)
    wait_for(lambda: "198.51.100.7:4242" in str([p for p in _peers(a) if p["name"] == "more0"]),
             30 * TIME_SCALE,
             "the new endpoint among the peer's candidates")

    assert change(lambda c: c.delete_node("name:more1"), SEEDED + 2) == (0, 0, 1)

    authkey = mesh.authkey()
    assert change(lambda c: c.register(PrivateKey.generate(), PrivateKey.generate().public,
                                       "newcomer", auth_key=authkey), SEEDED + 3) == (1, 0, 0)

    seen.append(_wg_peers(a, ifname)[b_key])
    # A peer removed and added again starts from no handshake and zero counters, which
    # grow back: so every read counts, not just the last. A rekey (WireGuard's own, every
    # 2 minutes while traffic flows: the VM run takes longer) keeps the counters.
    went_back = [(x, y) for x, y in itertools.pairwise(seen)
                 if y[0] < x[0] or y[1] < x[1] or y[2] < x[2]]
    moves = [(e["data"]["path"], e["data"]["endpoint"], e["data"]["reason"])
             for e in a.call("events", {"name": "peer_path_changed"}, timeout=30 * TIME_SCALE)
             if e["data"]["key"] == b_key]
    assert not went_back, (f"b's session was torn down (handshake, rx, tx went back) "
                           f"{len(went_back)} time(s), e.g. {went_back[0]}; "
                           f"b's path changes: {moves}")
    wait_for(lambda: a.ping(b.name)["rtt_ms"] is not None, 30 * TIME_SCALE,
             "a ping through the tunnel to b, after the changes")
    # The figures for docs/reliability.md (shown with -rA; the VM tier keeps them with
    # WGMESH_VM_OUTPUT): how long each netmap's apply held a's loop.
    print("netmaps on a (seq, added, updated, removed, apply_s):",
          [(e["seq"], e["added"], e["updated"], e["removed"], e["apply_s"])
           for e in _netmap_events(a)])
