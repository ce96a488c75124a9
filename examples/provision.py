"""Provision a node: mint an auth key through the admin API, then bring the node up with it.

    python examples/provision.py --control https://control:8420 --api-key-file admin.key \\
        --state-dir /var/lib/wgmesh --hostname web-1 --tag tag:web

The admin API key stays with the provisioning tool; the node receives only a
short-lived, single-use auth key, and its private key is made on the node; it
pins the control key the admin connection reports (``--control-ca``: a private CA).
``--once`` brings the node up, prints its status and takes it down again.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

import wgmesh
from wgmesh.control.client import ControlClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--control", required=True)
    ap.add_argument("--control-ca", help="CA bundle for a control service with a private CA")
    ap.add_argument("--api-key-file", required=True, type=Path)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--hostname", required=True)
    ap.add_argument("--tag", action="append", default=[])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--once", action="store_true", help="up, print status, down")
    a = ap.parse_args()

    with ControlClient(a.control, api_key=a.api_key_file.read_text().strip(),
                       ca=a.control_ca) as admin:
        minted = admin.create_auth_key(reusable=False, tags=a.tag, expiry_s=600,
                                       description=f"provision {a.hostname}")
        control_key = admin.server_control_key()
    node = wgmesh.Node(a.control, authkey=minted["key"], state_dir=a.state_dir,
                       hostname=a.hostname, backend=a.backend, ifname="wgmesh0",
                       control_key=control_key, control_ca=a.control_ca)
    status = node.up()
    print(status)
    if not a.once:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    node.down()


if __name__ == "__main__":
    main()
