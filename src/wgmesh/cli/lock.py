"""``wgmesh lock ...``: lock the mesh and admit or revoke nodes with admin-held lock keys.

The private lock key never goes to the control service: this command reads it from
``--key-file`` (mode 0600) or ``$WGMESH_LOCK_KEY``, fetches the chain, verifies it
itself, signs the next update here and hands control only the signed bytes. Control
and API key options are those of ``wgmesh control`` (``--server``, ``--api-key-file``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from wgmesh import lock
from wgmesh.cli.control import client as admin_client
from wgmesh.cli.control import control_options
from wgmesh.cli.output import print_table
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, KeyFormatError

__all__ = ["add_parser"]

_APPEND_TRIES = 3  # another admin's update can land between our read and our append


def _private_key(a: argparse.Namespace) -> lock.LockPrivateKey:
    text = os.environ.get("WGMESH_LOCK_KEY")
    if a.key_file:
        path = Path(a.key_file)
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise WgmeshError(f"{path}: a lock key file must not be readable by others "
                                  "(chmod 600)")
            text = path.read_text()
        except OSError as e:
            raise WgmeshError(f"cannot read the lock key: {e}") from None
    if not text:
        raise WgmeshError("no lock key: pass --key-file or set WGMESH_LOCK_KEY")
    try:
        return lock.LockPrivateKey.parse(text)
    except KeyFormatError as e:
        raise WgmeshError(f"lock key: {e}") from None


def _chain(client: Any) -> tuple[list[lock.Update], lock.LockState | None]:
    """The chain as control serves it, verified here (control is not trusted with it)."""
    updates = [lock.decode_update(base64.b64decode(u)) for u in client.lock_chain()["updates"]]
    return updates, (lock.verify(updates) if updates else None)


def _append(a: argparse.Namespace, build: Any) -> int:
    """Build the update on the current head (``build(state, key, now)``) and append it."""
    from wgmesh.control.errors import ControlAPIError

    client, key = admin_client(a), _private_key(a)
    for attempt in range(_APPEND_TRIES):
        _, state = _chain(client)
        update = build(state, key, int(time.time()))
        try:
            out = client.lock_append(update.encode())
        except ControlAPIError as e:
            if e.status == 409 and attempt + 1 < _APPEND_TRIES:
                continue
            raise
        print(f"{update.describe()}: lock head {out['head'][:16]} (update #{out['seq']})")
        return 0
    return 1


def _locked(state: lock.LockState | None) -> lock.LockState:
    if state is None:
        raise WgmeshError("the mesh is not locked: run `wgmesh lock init` first")
    return state


def _node_key(a: argparse.Namespace) -> Key:
    """A node by its WireGuard key, or by id or name through the admin API."""
    try:
        return Key(a.node)
    except KeyFormatError:
        pass
    for n in admin_client(a).nodes():
        if a.node in (str(n["id"]), n["name"], f"id:{n['id']}", f"name:{n['name']}"):
            return Key(n["node_key"])
    raise WgmeshError(f"no node {a.node!r}")


def _lock_key(text: str) -> lock.LockPublicKey:
    try:
        return lock.LockPublicKey.parse(text)
    except KeyFormatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _keygen(a: argparse.Namespace) -> int:
    key = lock.LockPrivateKey(secrets.token_bytes(lock.KEY_LEN))
    if a.out:
        try:
            fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise WgmeshError(f"cannot create {a.out}: {e}") from None
        with os.fdopen(fd, "w") as f:
            f.write(key.text() + "\n")
    else:
        print(key.text())
    print(key.public)
    return 0


def _init(a: argparse.Namespace) -> int:
    def build(state: lock.LockState | None, key: lock.LockPrivateKey, now: int) -> lock.Update:
        if state is not None:
            raise WgmeshError(f"the mesh is already locked (lock id {state.lock_id.hex()[:16]})")
        keys = [key.public, *(k for k in a.trust if k != key.public)]
        return lock.genesis(keys, key, nonce=secrets.token_bytes(lock.NONCE_LEN), time=now)
    return _append(a, build)


def _sign(a: argparse.Namespace) -> int:
    node = _node_key(a)
    return _append(a, lambda s, k, now: lock.sign_node(_locked(s), node, k, time=now))


def _revoke(a: argparse.Namespace) -> int:
    node = _node_key(a)
    return _append(a, lambda s, k, now: lock.revoke_node(_locked(s), node, k, time=now))


def _add_key(a: argparse.Namespace) -> int:
    return _append(a, lambda s, k, now: lock.add_key(_locked(s), a.key, k, time=now))


def _remove_key(a: argparse.Namespace) -> int:
    return _append(a, lambda s, k, now: lock.remove_key(_locked(s), a.key, k, time=now))


def _status(a: argparse.Namespace) -> int:
    client = admin_client(a)
    updates, state = _chain(client)
    nodes = client.nodes()
    if state is None:
        out: dict[str, Any] = {"locked": False, "nodes": []}
    else:
        out = {"locked": True, "lock_id": state.lock_id.hex(), "head": state.head.hex(),
               "updates": len(updates), "trusted_keys": sorted(str(k) for k in state.trusted),
               "nodes": [{"id": n["id"], "name": n["name"], "node_key": n["node_key"],
                          "lock": state.label(Key(n["node_key"]))} for n in nodes]}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    if state is None:
        print("mesh lock: off (run `wgmesh lock init`)")
        return 0
    print(f"mesh lock: on, lock id {out['lock_id'][:16]}, head {out['head'][:16]} "
          f"({out['updates']} updates, verified here)")
    for k in out["trusted_keys"]:
        print(f"trusted lock key {k}")
    print_table([{**n, "key": n["node_key"][:8]} for n in out["nodes"]],
                ["id", "name", "key", "lock"])
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``wgmesh lock``."""
    lk = sub.add_parser("lock", help="mesh lock: admin-signed membership control cannot forge")
    ls = lk.add_subparsers(dest="lock_cmd", required=True, metavar="COMMAND")
    common = control_options()
    signing = argparse.ArgumentParser(add_help=False, parents=[common])
    signing.add_argument("--key-file", help="the private lock key (mode 0600; env "
                                            "WGMESH_LOCK_KEY holds the key itself)")

    p = ls.add_parser("keygen", help="make a lock key: private to --out (0600) or stdout, "
                                     "then the public key")
    p.add_argument("--out", help="file for the private key (created 0600, never overwritten)")
    p.set_defaults(func=_keygen)
    p = ls.add_parser("init", help="lock the mesh under this key (and --trust keys)",
                      parents=[signing])
    p.add_argument("--trust", action="append", default=[], type=_lock_key, metavar="LOCKPUB",
                   help="another admin's lock key to trust from the start (repeatable)")
    p.set_defaults(func=_init)
    for name, help_, func in (("sign", "admit a node (id, name or node key)", _sign),
                              ("revoke", "take a node out for good", _revoke)):
        p = ls.add_parser(name, help=help_, parents=[signing])
        p.add_argument("node")
        p.set_defaults(func=func)
    for name, help_, func in (("add-key", "trust another lock key", _add_key),
                              ("remove-key", "stop trusting a lock key (its signatures "
                                             "lapse)", _remove_key)):
        p = ls.add_parser(name, help=help_, parents=[signing])
        p.add_argument("key", type=_lock_key, metavar="LOCKPUB")
        p.set_defaults(func=func)
    p = ls.add_parser("status", help="trusted keys, head, and each node: signed, needs "
                                     "signature or revoked", parents=[common])
    p.set_defaults(func=_status)
