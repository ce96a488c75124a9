"""The node's side of routes and names, without a network: which allowed IPs a peer gets,
the host-change journal's undo (from its file, as after a crash), the hosts block, and
the mesh domain on the wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wgmesh import netmap as nm
from wgmesh.control.store import NodeRecord
from wgmesh.control.world import World
from wgmesh.keys import Key
from wgmesh.node.names import DEFAULT_DOMAIN, MeshNames, hosts_block, nameservers
from wgmesh.node.routes import Journal, peer_allowed_ips

pytestmark = pytest.mark.unit

LAN = "198.18.0.0/24"


def _peer(pid: int, **kw: object) -> nm.Peer:
    return nm.Peer(id=pid, name=f"n{pid}", node_key=Key.from_raw(bytes([pid]) * 32),
                   disco_key=Key.from_raw(bytes([pid + 100]) * 32), ipv4=f"100.64.0.{pid}",
                   ipv6=f"fd7a::{pid}", **kw)  # type: ignore[arg-type]


def _me() -> nm.NodeInfo:
    return nm.NodeInfo(id=1, name="me", node_key=Key.from_raw(b"\1" * 32),
                       disco_key=Key.from_raw(b"\2" * 32), ipv4="100.64.0.1", ipv6="fd7a::1")


def test_allowed_ips_take_routes_only_when_accepted_and_exit_only_when_chosen() -> None:
    p = _peer(2, routes=(LAN, "0.0.0.0/0", "::/0"))
    own = ("100.64.0.2/32", "fd7a::2/128")
    assert peer_allowed_ips(p, accept_routes=False, exit_node=None) == own
    assert peer_allowed_ips(p, accept_routes=True, exit_node=None) == (*own, LAN)
    assert peer_allowed_ips(p, accept_routes=False, exit_node=2) == (*own, "0.0.0.0/0", "::/0")
    assert peer_allowed_ips(p, accept_routes=False, exit_node=3) == own


def test_journal_undoes_files_from_its_record_after_a_crash(tmp_path: Path) -> None:
    target, created = tmp_path / "resolv.conf", tmp_path / "new"
    target.write_text("nameserver 192.0.2.53\n")
    j = Journal(tmp_path / "host-dns.json")
    j.replace_file(target, "nameserver 100.64.0.1\n")
    j.replace_file(target, "nameserver 100.64.0.9\n")  # the original is recorded once
    j.replace_file(created, "x")
    j.command(["true"], ["touch", str(tmp_path / "undone")])
    assert json.loads((tmp_path / "host-dns.json").read_text())[0]["content"] \
        == "nameserver 192.0.2.53\n"
    Journal(tmp_path / "host-dns.json").undo()  # a new process: reads the file
    assert target.read_text() == "nameserver 192.0.2.53\n"
    assert not created.exists() and (tmp_path / "undone").exists()
    assert not (tmp_path / "host-dns.json").exists()


def test_names_from_the_netmap_and_the_hosts_block(tmp_path: Path) -> None:
    m = nm.Netmap(seq=1, self_node=_me(), peers={2: _peer(2)}, domain="corp.test")
    assert MeshNames(tmp_path, "wg0").resolve(m, "n2.corp.test") == ["100.64.0.2", "fd7a::2"]
    assert MeshNames(tmp_path, "wg0").resolve(m, "n9") == []
    block = hosts_block(m, "corp.test")
    assert "100.64.0.2 n2.corp.test n2\n" in block and block.startswith("# BEGIN wgmesh")
    assert nameservers("# x\nnameserver 192.0.2.1\nnameserver ::1\nsearch a\n") == [
        ("192.0.2.1", 53), ("::1", 53)]
    default = nm.Netmap(seq=1, self_node=_me(), peers={2: _peer(2)})
    assert MeshNames(tmp_path, "wg0").resolve(default, f"n2.{DEFAULT_DOMAIN}")


def test_mesh_domain_is_in_the_full_map_and_validated() -> None:
    rec = NodeRecord(id=1, name="me", node_key=Key.from_raw(b"\1" * 32),
                     disco_key=Key.from_raw(b"\2" * 32), addr_index=1, ipv4="100.64.0.1",
                     ipv6="fd7a::1", tags=(), created_at=0.0, key_expiry=0.0)
    w = World("fd7a::/48", clock=lambda: 1.0, domain="corp.test")
    w.load([rec], 1, json.dumps({"rules": []}), nm.RelayMap(), 1)
    m = nm.decode(b"".join(w.attach(1, None, lambda: None)))
    assert isinstance(m, nm.Netmap) and m.domain == "corp.test"
    assert nm.apply(m, nm.NetmapDelta(seq=2)).domain == "corp.test"
    assert "domain" not in nm.to_json(nm.Netmap(seq=1, self_node=_me()))
    with pytest.raises(nm.NetmapFormatError, match="domain"):
        nm.from_json({**nm.to_json(m), "domain": "Bad Domain"})
