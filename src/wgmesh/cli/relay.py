"""``wgmesh relay serve``: run a relay (and its STUN server) in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import ssl as _ssl
from pathlib import Path

from wgmesh import stun
from wgmesh.errors import WgmeshError
from wgmesh.keys import load_or_create_private_key
from wgmesh.libc import steady_heap

__all__ = ["add_parser"]

def _serve(a: argparse.Namespace) -> int:
    from wgmesh.relaynet.admission import Admission
    from wgmesh.relaynet.mesh import load_mesh_key
    from wgmesh.relaynet.server import RelayServer

    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one fd per connection
    want = a.max_connections + 256  # the cap, plus mesh links, STUN and the control poll
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want if hard == resource.RLIM_INFINITY else min(hard, want), hard))
    steady_heap()  # before the workers fork: they inherit it
    key = load_or_create_private_key(a.key_file)
    mesh_key = load_mesh_key(a.mesh_key_file) if a.mesh_key_file else None
    credential = (Path(a.relay_credential_file).read_text().strip()
                  if a.relay_credential_file else None)
    ssl_ctx = None
    if a.tls_cert or a.tls_key:
        if not (a.tls_cert and a.tls_key):
            raise WgmeshError("--tls-cert and --tls-key go together")
        ssl_ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(a.tls_cert, a.tls_key)
    mesh_ssl = _ssl.create_default_context(cafile=a.mesh_ca) if a.mesh_ca else None
    control_ssl = _ssl.create_default_context(cafile=a.control_ca) if a.control_ca else None
    host, _, port = a.listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    stun_port = None if a.stun_port < 0 else a.stun_port

    def make_server(admission: Admission | None = None) -> RelayServer:
        return RelayServer(key, host=host, port=int(port), ssl=ssl_ctx, stun_port=stun_port,
                           mesh_key=mesh_key, mesh_peers=a.mesh_peer, mesh_ssl=mesh_ssl,
                           control_url=a.control, relay_credential=credential,
                           control_ssl=control_ssl,
                           rate_limit_bps=a.rate_limit * 1e6 if a.rate_limit else None,
                           max_connections=a.max_connections, max_per_source=a.max_per_source,
                           metrics_allow=a.metrics_allow.split(",") if a.metrics_allow else None,
                           admission=admission, affinity_packets=a.affinity_packets)

    def listening(port: int, stun: int | None, **extra: object) -> None:
        print(json.dumps({"listening": f"{host}:{port}", "stun_port": stun,
                          "server_key": key.public.b64(), "tls": ssl_ctx is not None, **extra}),
              flush=True)

    if a.workers > 1:
        from wgmesh.relaynet.workers import RelayWorkers

        pool = RelayWorkers(a.workers, make_server, host=host, port=int(port),
                            stun_port=stun_port, max_connections=a.max_connections,
                            max_per_source=a.max_per_source)
        pool.start()
        listening(pool.port, pool.stun_port or 0, workers=a.workers, pids=pool.pids)
        pool.run()
        return 0

    async def run() -> None:
        srv = make_server()
        await srv.start()
        listening(srv.port, srv.stun_port)
        try:
            await asyncio.Event().wait()
        finally:
            await srv.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wgmesh relay serve``."""
    relay = sub.add_parser("relay", help="encrypted-packet relay server (DERP-like) with STUN")
    rs = relay.add_subparsers(dest="relay_cmd", required=True)
    s = rs.add_parser("serve", help="run a relay (and STUN server) in the foreground")
    s.add_argument("--listen", default="0.0.0.0:3340", metavar="HOST:PORT",
                   help="TCP address for the relay and /metrics (default %(default)s)")
    s.add_argument("--stun-port", type=int, default=stun.DEFAULT_PORT,
                   help="UDP port for STUN on the same host (-1: off; default %(default)s)")
    s.add_argument("--key-file", default="/var/lib/wgmesh/relay.key",
                   help="the relay's long-term private key, created 0600 if missing")
    s.add_argument("--tls-cert", help="PEM certificate chain: serve https (e.g. on 443)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--mesh-key-file", help="hex mesh key shared by the relays of this region")
    s.add_argument("--mesh-peer", nargs="+", action="extend", default=[], metavar="URL",
                   help="the other relays of this region, e.g. http://203.0.113.11:3340"
                        " (list every other one: each relay dials each); URL#KEY also"
                        " requires that relay to prove its public key KEY")
    s.add_argument("--mesh-ca", help="CA bundle to verify https mesh peers")
    s.add_argument("--control", metavar="URL",
                   help="control service: accept only the nodes it lists")
    s.add_argument("--relay-credential-file", help="bearer credential for --control")
    s.add_argument("--control-ca", metavar="FILE",
                   help="CA bundle to verify an https --control with a private CA")
    s.add_argument("--rate-limit", type=float, metavar="MBIT/S",
                   help="per-node send limit in Mbit/s (default: none)")
    s.add_argument("--max-connections", type=int, default=10_000, metavar="N",
                   help="connections in total (default %(default)s)")
    s.add_argument("--max-per-source", type=int, default=1024, metavar="N",
                   help="connections per source address, IPv6 per /64 (default %(default)s)")
    s.add_argument("--metrics-allow", metavar="CIDR,...",
                   help="networks that may read /metrics (default: this host only)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on the one port (SO_REUSEPORT), meshed as one"
                        " relay: one per core (default %(default)s)")
    s.add_argument("--affinity-packets", type=int, default=500, metavar="N",
                   help="with --workers: move a node's connection to the worker of the node"
                        " it exchanges N packets a second with, mostly (0: never; default"
                        " %(default)s)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=_serve)
