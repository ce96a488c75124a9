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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from wgmesh.control.client import ControlClient
from wgmesh.keys import PrivateKey
from wgmesh.lab.network import TIME_SCALE, Host, Lab, LabError, Process
from wgmesh.lab.tls import LabCA
from wgmesh.node.localapi import call
from wgmesh.wireguard.netns import call_in

__all__ = ["MeshLab", "MeshNode"]

CONTROL_PORT = 8420
RELAY_PORT = 3340
STUN_PORT = 3478
T = TypeVar("T")


def relay_map(hosts: Sequence[Host], ipv6: bool) -> dict[str, Any]:
    """One region of ``hosts``. With ``ipv6`` each relay is listed twice, IPv4 URL then
    IPv6 URL (``<name>-v6``; STUN at the URL's host, so each family's STUN too). A node
    dials a region's URLs in order and moves the ones that failed last, so a single-stack
    node settles on its family with no change to the relay map's schema, and interleaving
    keeps every node on the same first relay it can reach."""
    nodes = []
    for h in hosts:
        nodes.append({"name": h.name, "url": f"http://{h.ip}:{RELAY_PORT}",
                      "stun_port": STUN_PORT})
        if ipv6:
            nodes.append({"name": f"{h.name}-v6", "url": f"http://[{h.ip6}]:{RELAY_PORT}",
                          "stun_port": STUN_PORT})
    return {"regions": [{"region_id": 1, "code": "lab", "name": "lab internet",
                         "nodes": nodes}]}


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
        # The agent answers once the echo is done (timeout), later on a busy VM.
        return self.call("ping", {"peer": peer, "timeout": timeout},
                         timeout=timeout + 10 * TIME_SCALE)

    def peer(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.status()["peers"] if p["name"] == name), None)

    @property
    def ipv4(self) -> str:
        return self.status()["ipv4"]

    def stop(self) -> None:
        self.proc.stop()

    def restart(self) -> None:
        """Start the agent again (same state dir, so the same node) once it has exited."""
        self.proc.stop()
        self.proc = self.mesh.lab.spawn(self.host, self.proc.argv)

    def __repr__(self) -> str:
        return f"<MeshNode {self.name} behind {self.kind} ({self.backend})>"


class MeshLab:
    """Control + ``relays`` meshed relays of one region on the lab's internet."""

    def __init__(self, lab: Lab, *, relays: int = 2, backend: str = "userspace",
                 policy: dict[str, Any] | None = None, metrics_allow: str | None = None,
                 control_args: Sequence[str] = (), ipv6: bool = False) -> None:
        """``metrics_allow``: CIDRs that may read control's and the relays' ``/metrics``;
        ``control_args``: more ``wgmesh control serve`` flags; ``ipv6``: control and the
        relays also serve IPv6 (dual-stack), so IPv6-only nodes (``add_node(ipv4=False)``)
        reach them: the relay map lists each relay once per family (see :func:`relay_map`)."""
        self.lab = lab
        self.backend = backend
        self.dir = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-mesh-"))
        self.nodes: dict[str, MeshNode] = {}
        self.control = lab.add_public_host("control")
        # Nodes refuse plain http off loopback: control serves HTTPS under a per-lab CA.
        self.ca = LabCA(self.dir / "tls")
        self.control_ca = str(self.ca.path)
        self.ipv6 = ipv6
        cert, tls_key = self.ca.issue("control", self.control.ip,
                                      *([self.control.ip6 or ""] if ipv6 else []))
        self.control_url = f"https://{self.control.ip}:{CONTROL_PORT}"
        self.control_url6 = f"https://[{self.control.ip6}]:{CONTROL_PORT}"
        self.relay_hosts = [lab.add_public_host(f"relay{i + 1}") for i in range(relays)]
        (self.dir / "relays.json").write_text(json.dumps(relay_map(self.relay_hosts, ipv6)))
        listen = "[::]" if ipv6 else self.control.ip
        (self.dir / "mesh.key").write_text(secrets.token_hex(32))
        self.api_key_file = self.dir / "api.key"
        self.control_proc = lab.python(
            self.control, "-m", "wgmesh", "control", "serve",
            "--listen", f"{listen}:{CONTROL_PORT}",
            "--state-dir", str(self.dir / "control"), "--api-key-file", str(self.api_key_file),
            "--tls-cert", str(cert), "--tls-key", str(tls_key),
            "--relay-map", str(self.dir / "relays.json"),
            *(["--metrics-allow", metrics_allow] if metrics_allow else []), *control_args)
        self.relay_procs = []
        for h in self.relay_hosts:
            others = [f"http://{o.ip}:{RELAY_PORT}" for o in self.relay_hosts if o is not h]
            argv = ["-m", "wgmesh", "relay", "serve",
                    "--listen", f"{'[::]' if ipv6 else '0.0.0.0'}:{RELAY_PORT}",
                    "--stun-port", str(STUN_PORT), "--key-file", str(self.dir / f"{h.name}.key"),
                    "--mesh-key-file", str(self.dir / "mesh.key")]
            if others:
                argv += ["--mesh-peer", *others]
            if metrics_allow:
                argv += ["--metrics-allow", metrics_allow]
            self.relay_procs.append(lab.python(h, *argv))
        self.control_proc.wait_for_output("listening", timeout=60)
        for p in self.relay_procs:
            p.wait_for_output("listening", timeout=60)
        if policy is not None:
            self.set_policy(policy)
        self._authkey: str | None = None

    def restart_control(self) -> None:
        """Start control again (same state, database, port and keys) once it has exited."""
        self.control_proc.stop()
        self.control_proc = self.lab.spawn(self.control, self.control_proc.argv)
        self.control_proc.wait_for_output("listening", timeout=60)

    def admin(self, *args: str) -> str:
        """Run ``wgmesh control ...`` against this lab's control service."""
        cp = self.lab.run(self.control, [sys.executable, "-m", "wgmesh", "control", *args,
                                         "--server", self.control_url,
                                         "--control-ca", self.control_ca,
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

    def control_call(self, fn: Callable[[ControlClient], T], *,
                     node_token: str | None = None) -> T:
        """``fn(client)``, a :class:`ControlClient` holding the admin key (and ``node_token``
        for node calls), run on a thread inside the control host's namespace: the lab's
        addresses are reachable only from inside the lab."""
        def run() -> T:
            with ControlClient(self.control_url, node_token=node_token, ca=self.control_ca,
                               api_key=self.api_key_file.read_text().strip()) as client:
                return fn(client)

        return call_in(self.control.ns, run)

    def seed_nodes(self, count: int, prefix: str = "seed") -> list[str]:
        """Put ``count`` nodes (``{prefix}{i}``, no endpoints) straight into control's store,
        for scale experiments: registering hundreds through the API would take minutes. The
        running service takes them in at its next poll of the store (about a second).
        Returns their node tokens, in order."""
        from wgmesh.control.store import open_store

        disco = PrivateKey.generate().public
        specs = [(PrivateKey.generate().public, disco, f"{prefix}{i}", ())
                 for i in range(count)]
        state = self.dir / "control"
        store = open_store(str(state / "control.db"))
        try:
            store.use_audit_key(bytes.fromhex((state / "audit.key").read_text().strip()))
            return store.seed_nodes(specs)
        finally:
            store.close()

    def add_node(self, name: str, kind: str, *, backend: str | None = None,
                 tags: tuple[str, ...] = (), hairpin: bool = False,
                 verbose: bool = False, metrics_port: int | None = None,
                 ipv6: bool = False, ipv4: bool = True, args: Sequence[str] = (),
                 host: Host | None = None) -> MeshNode:
        """A host behind a NAT of ``kind`` (``symmetric+pcp``: with port mapping) running
        ``wgmesh up`` (serving Prometheus metrics on its LAN address and ``metrics_port``);
        ``ipv6``: the host also has global IPv6 behind its router's stateful firewall;
        ``ipv4=False`` (with ``ipv6``, on a dual-stack mesh): IPv6 only, control over IPv6.
        ``args``: more ``wgmesh up`` flags; ``host``: a host made already (else a new one)."""
        if not ipv4 and not self.ipv6:
            raise LabError("an IPv6-only node needs MeshLab(ipv6=True)")
        backend = backend or self.backend
        host = host or self.lab.add_node_host(name, kind, hairpin=hairpin, ipv6=ipv6,
                                              ipv4=ipv4)
        key = self.authkey(tags=tags) if tags else (self._authkey or self.authkey())
        if not tags:
            self._authkey = key
        sock = f"/run/wgmesh/{self.lab.prefix}-{name}.sock"
        control = self.control_url if ipv4 else self.control_url6
        argv = ["-m", "wgmesh", "up", "--control", control, "--authkey", key,
                "--control-ca", self.control_ca,
                "--state-dir", str(self.dir / "nodes" / name), "--hostname", name,
                "--ifname", f"wg{name}"[:15], "--backend", backend, "--socket", sock]
        if verbose:
            argv.append("-v")
        if metrics_port:
            argv += ["--metrics-listen", f"{host.ip}:{metrics_port}"]
        argv += args
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
