"""``wgmesh control ...``: run the server and administer it over its HTTP API.

Admin commands find the server in ``--server`` / ``$WGMESH_CONTROL_URL``
(default http://127.0.0.1:8420) and the API key in ``$WGMESH_API_KEY``, else
the file ``--api-key-file`` / ``$WGMESH_API_KEY_FILE``, else the bootstrap
file ``<state dir>/admin.key`` that ``serve`` writes on first start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from wgmesh.cli.output import print_table
from wgmesh.errors import WgmeshError

__all__ = ["add_parser", "client", "control_options"]

DEFAULT_LISTEN = "127.0.0.1:8420"


def _duration(text: str) -> float:
    """``3600``, ``90s``, ``30m``, ``12h``, ``7d``; ``0`` means never."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 3600, 30m, 12h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _date(text: str) -> float:
    """An ISO 8601 date or time (UTC unless it names a zone), as a unix time."""
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad date {text!r} (e.g. 2027-01-31 or 2027-01-31T12:00+02:00)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def client(a: argparse.Namespace) -> Any:
    """The admin client the options name (also for ``wgmesh lock``)."""
    from wgmesh.control.client import ControlClient
    from wgmesh.control.server import default_state_dir

    key = os.environ.get("WGMESH_API_KEY")
    if not key:
        path = Path(a.api_key_file or os.environ.get("WGMESH_API_KEY_FILE")
                    or default_state_dir() / "admin.key")
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise WgmeshError(f"no API key: set WGMESH_API_KEY or --api-key-file ({e})") from None
    return ControlClient(a.server, api_key=key,
                         ca=a.control_ca or os.environ.get("WGMESH_CONTROL_CA"))


def _out(a: argparse.Namespace, obj: Any, rows: list[dict[str, Any]] | None = None,
         columns: list[str] | None = None) -> None:
    if a.json or rows is None or columns is None:
        print(json.dumps(obj, indent=2))
    else:
        print_table(rows, columns)


def _ts(t: float) -> str:
    return "never" if not t else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def _redact(db: str) -> str:
    """A DSN without its password, for logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", db)


def _serve(a: argparse.Namespace) -> int:
    import asyncio

    from wgmesh.control.server import ControlServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    srv = ControlServer(a.db, a.listen, state_dir=a.state_dir, api_key_file=a.api_key_file,
                        audit_key_file=a.audit_key_file, relay_map_file=a.relay_map,
                        key_expiry_s=a.key_expiry_days * 86400, keepalive_s=a.keepalive,
                        challenge_rate=a.challenge_rate, challenge_burst=a.challenge_burst,
                        approval=a.approval, ephemeral_grace_s=a.ephemeral_grace,
                        metrics_allow=a.metrics_allow.split(",") if a.metrics_allow else None,
                        control_key_file=a.control_key_file, tls_cert=a.tls_cert,
                        tls_key=a.tls_key, mesh_domain=a.mesh_domain)

    async def main() -> None:
        import signal

        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await srv.start()
        assert srv.signer is not None
        print(f"wgmesh control: listening on {srv.url}, db {_redact(srv.db)}, "
              f"admin key file {srv.api_key_file}, control key {srv.signer.public}", flush=True)
        try:
            await done.wait()
        finally:
            await srv.stop()

    asyncio.run(main())
    return 0


def _authkey_create(a: argparse.Namespace) -> int:
    """Prints ``wgk_...#ctrlkey:...``: one string that also pins the control key."""
    c = client(a)
    out = c.create_auth_key(reusable=a.reusable, tags=a.tag, expiry_s=a.expiry,
                            description=a.description, ephemeral=a.ephemeral,
                            preapproved=a.preapproved)
    control_key = c.server_control_key()
    if a.json:
        print(json.dumps({**out, "control_key": control_key}, indent=2))
    else:
        print(out["key"] if control_key is None else f"{out['key']}#{control_key}")
    return 0


def _key(a: argparse.Namespace) -> int:
    from wgmesh.control.server import default_state_dir, load_control_key

    path = Path(a.control_key_file or Path(a.state_dir or default_state_dir()) / "control.key")
    print(load_control_key(path).public)
    return 0


def _authkey_list(a: argparse.Namespace) -> int:
    keys = client(a).list_auth_keys()
    rows = [{**k, "tags": ",".join(k["tags"]), "expires": _ts(k["expires_at"])} for k in keys]
    _out(a, keys, rows, ["id", "reusable", "tags", "uses", "revoked", "expires", "description"])
    return 0


def _authkey_revoke(a: argparse.Namespace) -> int:
    client(a).revoke_auth_key(a.id)
    print(f"revoked auth key {a.id}")
    return 0


def _apikey_create(a: argparse.Namespace) -> int:
    out = client(a).create_api_key(a.role, a.description)
    print(json.dumps(out, indent=2) if a.json else out["key"])
    return 0


def _apikey_list(a: argparse.Namespace) -> int:
    keys = client(a).list_api_keys()
    _out(a, keys, keys, ["id", "role", "revoked", "description"])
    return 0


def _apikey_revoke(a: argparse.Namespace) -> int:
    client(a).revoke_api_key(a.id)
    print(f"revoked API key {a.id}")
    return 0


def _nodes_list(a: argparse.Namespace) -> int:
    nodes = client(a).nodes()
    rows = [{**n, "tags": ",".join(n["tags"]), "key": n["node_key"][:8],
             "expiry": "EXPIRED" if n["expired"] else _ts(n["key_expiry"]),
             "endpoints": len(n["endpoints"]),
             "state": ",".join(f for f, on in (("pending", not n.get("approved", True)),
                                               ("ephemeral", n.get("ephemeral"))) if on) or "-"}
            for n in nodes]
    _out(a, nodes, rows, ["id", "name", "ipv4", "ipv6", "key", "tags", "online", "expiry",
                          "endpoints", "state"])
    return 0


def _nodes_approve(a: argparse.Namespace) -> int:
    n = client(a).approve_node(a.node)
    print(f"approved node {n['id']} ({n['name']})")
    return 0


def _nodes_expiry(a: argparse.Namespace) -> int:
    n = client(a).set_node_expiry(a.node, 0.0 if a.disable else a.set)
    print(f"node {n['id']} ({n['name']}) key expires {_ts(n['key_expiry'])}")
    return 0


def _nodes_expire(a: argparse.Namespace) -> int:
    n = client(a).expire_node(a.node)
    print(f"expired node {n['id']} ({n['name']})")
    return 0


def _nodes_extend(a: argparse.Namespace) -> int:
    n = client(a).extend_node(a.node, a.by)
    print(f"node {n['id']} ({n['name']}) key expires {_ts(n['key_expiry'])}")
    return 0


def _nodes_delete(a: argparse.Namespace) -> int:
    client(a).delete_node(a.node)
    print(f"deleted node {a.node}")
    return 0


def _nodes_rename(a: argparse.Namespace) -> int:
    n = client(a).rename_node(a.node, a.name)
    print(f"node {n['id']} is now {n['name']} (assigned: policy selectors match it)")
    return 0


def _nodes_tag(a: argparse.Namespace) -> int:
    n = client(a).tag_node(a.node, a.tags)
    print(f"node {n['id']} ({n['name']}) tags: {','.join(n['tags']) or '-'}")
    return 0


def _routes_list(a: argparse.Namespace) -> int:
    nodes = client(a).list_routes()
    rows = [{**n, **{k: ",".join(n[k]) or "-" for k in ("advertised", "approved", "enabled",
                                                        "primary")}} for n in nodes]
    _out(a, {"nodes": nodes}, rows,
         ["id", "name", "online", "advertised", "approved", "enabled", "primary"])
    return 0


def _routes_decide(a: argparse.Namespace) -> int:
    n = client(a).approve_routes(a.node, a.routes, approve=a.routes_cmd == "approve")
    print(f"node {n['id']} ({n['name']}) approved routes: "
          f"{','.join(n['approved_routes']) or '-'}")
    return 0


def _read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise WgmeshError(f"{path}: {e}") from None


def _policy_get(a: argparse.Namespace) -> int:
    out = client(a).get_policy()
    print(json.dumps(out if a.json else out["policy"], indent=2))
    return 0


def _policy_set(a: argparse.Namespace) -> int:
    from wgmesh.control.errors import ControlAPIError

    try:
        version = client(a).set_policy(_read_json(a.file), a.if_version)
    except ControlAPIError as e:
        if not e.details:
            raise
        # Every problem, on the one line an error gets.
        raise WgmeshError(f"{e.message}: " + "; ".join(
            f"{d.get('path') or '(top)'}: {d.get('message')}" for d in e.details)) from None
    print(f"policy version {version}")
    return 0


def _relay_map_get(a: argparse.Namespace) -> int:
    from wgmesh import netmap as nm

    print(json.dumps(nm.to_json(client(a).get_relay_map()), indent=2))
    return 0


def _relay_map_set(a: argparse.Namespace) -> int:
    client(a).set_relay_map(_read_json(a.file))
    print("relay map updated")
    return 0


def _audit_list(a: argparse.Namespace) -> int:
    entries = client(a).audit(a.after, a.limit)
    rows = [{**e, "when": _ts(e["ts"]), "detail": json.dumps(e["detail"])[:60]}
            for e in entries]
    _out(a, entries, rows, ["seq", "when", "actor", "action", "target", "detail"])
    return 0


def _audit_key_for(a: argparse.Namespace) -> bytes | None:
    """The audit key for ``--db``: ``--audit-key-file``, else next to a SQLite file or in the
    default state dir; ``None`` if there is none (keyed entries then cannot be verified)."""
    from wgmesh.control.server import default_state_dir

    if a.audit_key_file:
        paths = [Path(a.audit_key_file)]
    else:
        paths = [default_state_dir() / "audit.key"]
        if "://" not in a.db or a.db.startswith("sqlite://"):
            paths.insert(0, Path(a.db.removeprefix("sqlite://")).with_name("audit.key"))
    for p in paths:
        try:
            return bytes.fromhex(p.read_text().strip())
        except FileNotFoundError:
            if a.audit_key_file:
                raise WgmeshError(f"{p}: no such audit key file") from None
        except (OSError, ValueError) as e:
            raise WgmeshError(f"{p}: not a readable audit key ({e})") from None
    return None


def _audit_verify(a: argparse.Namespace) -> int:
    if a.db:
        from wgmesh.control.audit import verify
        from wgmesh.control.store import open_store

        key = _audit_key_for(a)
        store = open_store(a.db)
        try:
            result = verify(store.audit_entries(), key).to_json()
        finally:
            store.close()
    else:
        result = client(a).audit_verify()
    keyed = result.get("keyed_from")
    if a.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        span = ("" if keyed is None else "; keyed from seq 1" if keyed == 1 else
                f"; seqs 1-{keyed - 1} unkeyed (from before the audit key), keyed from seq "
                f"{keyed}")
        print(f"audit chain OK: {result['entries']} entries{span}, head {result['head']}")
    elif "needs the audit key" in result["reason"]:
        print(f"audit chain UNVERIFIED from seq {result['first_bad_seq']}: its entries are "
              f"keyed and no audit key was found (--audit-key-file)")
    else:
        print(f"audit chain BROKEN at seq {result['first_bad_seq']}: {result['reason']} "
              f"({result['entries']} entries verified before it)")
    return 0 if result["ok"] else 1


def control_options() -> argparse.ArgumentParser:
    """``--server``, ``--api-key-file``, ``--json``: what every admin command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("WGMESH_CONTROL_URL",
                                                           f"http://{DEFAULT_LISTEN}"),
                        help="control URL (env WGMESH_CONTROL_URL)")
    common.add_argument("--api-key-file", help="admin API key file (env WGMESH_API_KEY "
                                               "holds the key itself)")
    common.add_argument("--control-ca", metavar="FILE",
                        help="CA bundle for a control service with a private CA "
                             "(env WGMESH_CONTROL_CA)")
    common.add_argument("--json", action="store_true", help="print JSON")
    return common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``wgmesh control``."""
    ctl = sub.add_parser("control", help="coordination server: serve and administer")
    cs = ctl.add_subparsers(dest="control_cmd", required=True, metavar="COMMAND")

    s = cs.add_parser("serve", help="run the control server (SQLite in the state dir by default)")
    s.add_argument("--db", help="SQLite path or postgresql://... DSN "
                                "(default: <state dir>/control.db)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help=f"host:port (default {DEFAULT_LISTEN})")
    s.add_argument("--state-dir", help="default: $WGMESH_STATE_DIR/control, "
                                       "/var/lib/wgmesh/control as root")
    s.add_argument("--api-key-file", help="admin API key file: imported if it exists, "
                                          "else the first key is written there (0600)")
    s.add_argument("--audit-key-file", help="audit chain HMAC key (default: <state dir>/"
                                            "audit.key, created 0600); replicas share one")
    s.add_argument("--relay-map", metavar="FILE", help="relay map JSON to publish to nodes")
    s.add_argument("--key-expiry-days", type=float, default=180,
                   help="node key lifetime after registration (0: never expire)")
    s.add_argument("--mesh-domain", default="", metavar="DOMAIN",
                   help="DNS domain of mesh names, NAME.DOMAIN (default: the nodes' "
                        "wgmesh.internal)")
    s.add_argument("--keepalive", type=float, default=15.0,
                   help="seconds between keepalives on idle netmap streams")
    s.add_argument("--challenge-rate", type=float, default=10.0,
                   help="registration challenges per second per source address "
                        "(IPv6: per /64); 0 disables the limit")
    s.add_argument("--challenge-burst", type=int, default=60,
                   help="registration challenges a source may make at once")
    s.add_argument("--approval", choices=["open", "required"], default="open",
                   help="required: new nodes wait as pending until `nodes approve` "
                        "(unless their auth key is pre-approved)")
    s.add_argument("--ephemeral-grace", type=_duration, default=60.0,
                   help="how long an ephemeral node may be offline before it is removed "
                        "(default 60s)")
    s.add_argument("--metrics-allow", metavar="CIDR,...",
                   help="networks that may read /metrics without an admin API key "
                        "(default: loopback)")
    s.add_argument("--control-key-file", help="the control key nodes pin (default: <state "
                                              "dir>/control.key, created 0600); replicas "
                                              "share one")
    s.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    s.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    s.set_defaults(func=_serve)

    k = cs.add_parser("key", help="print the control key that nodes pin (ctrlkey:...); "
                                  "made (0600) if absent, as serve would")
    k.add_argument("--state-dir", help="the control state dir (as for serve)")
    k.add_argument("--control-key-file", help="default: <state dir>/control.key")
    k.set_defaults(func=_key)

    common = control_options()

    def group(name: str, help_: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        g = cs.add_parser(name, help=help_)
        return g.add_subparsers(dest=f"{name}_cmd", required=True, metavar="COMMAND")

    def leaf(g: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
             func: Any) -> argparse.ArgumentParser:
        p = g.add_parser(name, help=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    ak = group("authkey", "auth keys nodes register with")
    p = leaf(ak, "create", "create an auth key (printed once)", _authkey_create)
    p.add_argument("--reusable", action="store_true", help="allow many registrations")
    p.add_argument("--tag", action="append", default=[], help="tag:NAME given to its nodes")
    p.add_argument("--expiry", type=_duration, default=3600.0,
                   help="lifetime, e.g. 3600, 30m, 7d; 0 never expires (default 1h)")
    p.add_argument("--description", default="")
    p.add_argument("--ephemeral", action="store_true",
                   help="its nodes are removed a grace period after they go offline")
    p.add_argument("--preapproved", action="store_true",
                   help="its nodes need no approval (with serve --approval required)")
    leaf(ak, "list", "list auth keys", _authkey_list)
    leaf(ak, "revoke", "revoke an auth key", _authkey_revoke).add_argument("id")

    api = group("apikey", "API keys for admins and relays")
    p = leaf(api, "create", "create an API key (printed once)", _apikey_create)
    p.add_argument("--role", choices=["admin", "relay"], default="admin")
    p.add_argument("--description", default="")
    leaf(api, "list", "list API keys", _apikey_list)
    leaf(api, "revoke", "revoke an API key", _apikey_revoke).add_argument("id")

    nodes = group("nodes", "registered nodes")
    ref = "id:N, name:NAME, or a bare id or name (refused if it could mean either)"
    leaf(nodes, "list", "list nodes", _nodes_list)
    leaf(nodes, "expire", "expire a node's key now", _nodes_expire).add_argument(
        "node", help=ref)
    p = leaf(nodes, "extend", "renew a node's key lifetime from now (rotation does not)",
             _nodes_extend)
    p.add_argument("node", help=ref)
    p.add_argument("--by", type=_duration, help="e.g. 90d; 0 never expires "
                                                "(default: the server's key lifetime)")
    p = leaf(nodes, "expiry", "set a node's key expiry to a date, or disable it",
             _nodes_expiry)
    p.add_argument("node", help=ref)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--set", type=_date, metavar="DATE",
                     help="ISO date or time, UTC unless a zone is given")
    how.add_argument("--disable", action="store_true", help="the key never expires")
    leaf(nodes, "approve", "let a pending node into the mesh", _nodes_approve).add_argument(
        "node", help=ref)
    leaf(nodes, "delete", "delete a node", _nodes_delete).add_argument("node", help=ref)
    p = leaf(nodes, "rename", "assign a node's name (the only names policy selectors match)",
             _nodes_rename)
    p.add_argument("node", help=ref)
    p.add_argument("name", help="a DNS label; a node that only chose it moves to NAME-2")
    p = leaf(nodes, "tag", "replace a node's tags", _nodes_tag)
    p.add_argument("node", help=ref)
    p.add_argument("tags", nargs="*", help="tag:NAME ... (none clears)")

    rt = group("routes", "subnet routes and exit nodes that nodes advertise")
    leaf(rt, "list", "advertised, approved, enabled and primary routes per node", _routes_list)
    for verb, what in (("approve", "approve a node's advertised routes"),
                       ("reject", "withdraw the approval of a node's routes")):
        p = leaf(rt, verb, what, _routes_decide)
        p.add_argument("node", help=ref)
        p.add_argument("routes", nargs="+", metavar="CIDR",
                       help="e.g. 198.51.100.0/24; 0.0.0.0/0 ::/0 for an exit node")

    pol = group("policy", "ACL policy")
    leaf(pol, "get", "print the current policy", _policy_get)
    p = leaf(pol, "set", "validate and install a policy", _policy_set)
    p.add_argument("file", help="policy JSON file, or - for stdin")
    p.add_argument("--if-version", type=int, help="fail unless the current version is this")

    rm = group("relay-map", "relay regions published to nodes")
    leaf(rm, "get", "print the relay map", _relay_map_get)
    leaf(rm, "set", "replace the relay map", _relay_map_set).add_argument("file")

    au = group("audit", "the hash-chained audit trail")
    p = leaf(au, "list", "list audit entries", _audit_list)
    p.add_argument("--after", type=int, default=0, help="entries after this seq")
    p.add_argument("--limit", type=int, default=100)
    p = leaf(au, "verify", "check the hash chain (exit 1 if broken)", _audit_verify)
    p.add_argument("--db", help="verify straight from this database instead of via the server")
    p.add_argument("--audit-key-file", help="with --db: the audit key (default: audit.key "
                                            "next to a SQLite file, else in the state dir)")
