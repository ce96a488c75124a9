"""A whole mesh in a lab: control service, meshed relays, and node agents behind NATs.

This is what the demo, the connectivity grid, the notebook and the end-to-end
tests share. Every server and node is a real process (``wgmesh control serve``,
``wgmesh relay serve``, ``wgmesh up``) in its own namespace; nodes are queried
over their local API sockets, exactly as ``wgmesh status`` does::

    with Lab() as lab:
        mesh = MeshLab(lab)
        a = mesh.add_node("a", "eim")
        b = mesh.add_node("b", "symmetric")
        mesh.wait_connected()
        print(a.status())
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wgmesh.lab.network import TIME_SCALE, Host, Lab, LabError, Process
from wgmesh.node.localapi import call

__all__ = ["MeshLab", "MeshNode"]

CONTROL_PORT = 8420
RELAY_PORT = 3340
STUN_PORT = 3478


class MeshNode:
    """One ``wgmesh up`` agent in a lab host."""

    def __init__(self, mesh: MeshLab, name: str, kind: str, host: Host, backend: str,
                 proc: Process, socket: str) -> None:
        self.mesh, self.name, self.kind, self.host = mesh, name, kind, host
        self.backend, self.proc, self.socket = backend, proc, socket

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 30) -> Any:
        if self.proc.poll() is not None:
            raise LabError(f"node {self.name} exited {self.proc.poll()}: "
                           f"{self.proc.stderr[-3000:]}")
        return call(method, params, path=self.socket, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def ping(self, peer: str, timeout: float = 3.0) -> dict[str, Any]:
        return self.call("ping", {"peer": peer, "timeout": timeout}, timeout=timeout + 10)

    def peer(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.status()["peers"] if p["name"] == name), None)

    @property
    def ipv4(self) -> str:
        return self.status()["ipv4"]

    def stop(self) -> None:
        self.proc.stop()

    def __repr__(self) -> str:
        return f"<MeshNode {self.name} behind {self.kind} ({self.backend})>"


class MeshLab:
    """Control + ``relays`` meshed relays of one region on the lab's internet."""

    def __init__(self, lab: Lab, *, relays: int = 2, backend: str = "userspace",
                 policy: dict[str, Any] | None = None) -> None:
        self.lab = lab
        self.backend = backend
        self.dir = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-mesh-"))
        self.nodes: dict[str, MeshNode] = {}
        self.control = lab.add_public_host("control")
        self.control_url = f"http://{self.control.ip}:{CONTROL_PORT}"
        self.relay_hosts = [lab.add_public_host(f"relay{i + 1}") for i in range(relays)]
        relay_map = {"regions": [{"region_id": 1, "code": "lab", "name": "lab internet",
                                  "nodes": [{"name": h.name,
                                             "url": f"http://{h.ip}:{RELAY_PORT}",
                                             "stun_port": STUN_PORT}
                                            for h in self.relay_hosts]}]}
        (self.dir / "relays.json").write_text(json.dumps(relay_map))
        (self.dir / "mesh.key").write_text(secrets.token_hex(32))
        self.api_key_file = self.dir / "api.key"
        self.control_proc = lab.python(
            self.control, "-m", "wgmesh", "control", "serve",
            "--listen", f"{self.control.ip}:{CONTROL_PORT}",
            "--state-dir", str(self.dir / "control"), "--api-key-file", str(self.api_key_file),
            "--relay-map", str(self.dir / "relays.json"))
        self.relay_procs = []
        for h in self.relay_hosts:
            others = [f"http://{o.ip}:{RELAY_PORT}" for o in self.relay_hosts if o is not h]
            argv = ["-m", "wgmesh", "relay", "serve", "--listen", f"0.0.0.0:{RELAY_PORT}",
                    "--stun-port", str(STUN_PORT), "--key-file", str(self.dir / f"{h.name}.key"),
                    "--mesh-key-file", str(self.dir / "mesh.key")]
            if others:
                argv += ["--mesh-peer", *others]
            self.relay_procs.append(lab.python(h, *argv))
        self.control_proc.wait_for_output("listening", timeout=60)
        for p in self.relay_procs:
            p.wait_for_output("listening", timeout=60)
        if policy is not None:
            self.set_policy(policy)
        self._authkey: str | None = None

    def admin(self, *args: str) -> str:
        """Run ``wgmesh control ...`` against this lab's control service."""
        cp = self.lab.run(self.control, [sys.executable, "-m", "wgmesh", "control", *args,
                                         "--server", self.control_url,
                                         "--api-key-file", str(self.api_key_file)])
        return cp.stdout

    def authkey(self, *, reusable: bool = True, tags: tuple[str, ...] = ()) -> str:
        args = ["authkey", "create", "--expiry", "1d"] + (["--reusable"] if reusable else [])
        for t in tags:
            args += ["--tag", t]
        return self.admin(*args).strip().splitlines()[-1]

    def set_policy(self, policy: dict[str, Any]) -> None:
        path = self.dir / f"policy-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(policy))
        self.admin("policy", "set", str(path))

    def add_node(self, name: str, kind: str, *, backend: str | None = None,
                 tags: tuple[str, ...] = (), hairpin: bool = False,
                 verbose: bool = False) -> MeshNode:
        """A host behind a NAT of ``kind`` (``symmetric+pcp``: with port mapping) running
        ``wgmesh up``."""
        backend = backend or self.backend
        host = self.lab.add_node_host(name, kind, hairpin=hairpin)
        key = self.authkey(tags=tags) if tags else (self._authkey or self.authkey())
        if not tags:
            self._authkey = key
        sock = f"/run/wgmesh/{self.lab.prefix}-{name}.sock"
        argv = ["-m", "wgmesh", "up", "--control", self.control_url, "--authkey", key,
                "--state-dir", str(self.dir / "nodes" / name), "--hostname", name,
                "--ifname", f"wg{name}"[:15], "--backend", backend, "--socket", sock]
        if verbose:
            argv.append("-v")
        proc = self.lab.python(host, *argv, env={"WGMESH_DEBUG": "1"} if verbose else None)
        node = MeshNode(self, name, kind, host, backend, proc, sock)
        self.nodes[name] = node
        return node

    def wait_up(self, timeout: float = 60) -> None:
        """Every node's agent answers and has its address."""
        for n in self.nodes.values():
            n.proc.wait_for_output("wgmesh up:", timeout=timeout)

    def wait_connected(self, timeout: float = 60) -> None:
        """Every node sees every other node (policy permitting) in its netmap."""
        self.wait_up(timeout)
        deadline = time.monotonic() + timeout * TIME_SCALE
        names = set(self.nodes)
        while True:
            missing = {n.name: names - {n.name} - {p["name"] for p in n.status()["peers"]}
                       for n in self.nodes.values()}
            if not any(missing.values()):
                return
            if time.monotonic() > deadline:
                raise LabError(f"peers missing from netmaps after {timeout}s: {missing}")
            time.sleep(0.1)

    def paths(self) -> list[tuple[str, str, str, float | None]]:
        """(a, b, direct|relay, rtt ms) for every pair, as node ``a`` sees it."""
        out = []
        names = list(self.nodes)
        for i, a in enumerate(names):
            for p in self.nodes[a].status()["peers"]:
                if p["name"] in names[i + 1:]:
                    out.append((a, p["name"], p["path"], p["rtt_ms"]))
        return out

    def plot(self) -> object:
        """The lab's topology with every pair's current path and latency."""
        return self.lab.plot(self.paths())

    def close(self) -> None:
        for n in self.nodes.values():
            n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
