"""The authenticated control channel: the control key, signed answers, sealed streams, TLS.

The netns tier (tests/netns/test_control_trust.py) puts a machine in the middle; here
the pieces are checked against a real server on loopback.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

import wgmesh
from wgmesh import netmap as nm
from wgmesh.cli.main import main as cli_main
from wgmesh.control import ControlClient, ControlError, ControlServer
from wgmesh.control.envelope import ControlKey, ControlKeyMismatch, ControlSigner
from wgmesh.errors import WgmeshError
from wgmesh.keys import PrivateKey
from wgmesh.lab.tls import LabCA
from wgmesh.node.api import AsyncNode

pytestmark = pytest.mark.service


def first_map(c: ControlClient) -> nm.Netmap:
    for msg in c.stream():
        if isinstance(msg, nm.Netmap):
            return msg
    raise AssertionError("no netmap")


def test_control_key_is_made_0600_printed_and_shared_by_replicas(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "control.db")
    audit = {"audit_key_file": tmp_path / "audit.key"}  # shared, as replicas must
    with ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "a", **audit) as srv:
        assert srv.signer is not None
        key = srv.signer.public
        path = tmp_path / "a" / "control.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert requests.get(f"{srv.url}/v1/health", timeout=5).json()["control_key"] == str(key)
    assert cli_main(["control", "key", "--state-dir", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip() == str(key)
    # A replica on the same database with its own key is refused; with the shared file it runs.
    with pytest.raises(ControlError, match="replicas must share one control key file"), \
            ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "b", **audit):
        pass
    with ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "c", control_key_file=path,
                       **audit) as srv:
        assert srv.signer is not None and srv.signer.public == key
    # A database from before control keys upgrades in place: it records the key it meets.
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'control_key'")
    with ControlServer(db, "127.0.0.1:0", state_dir=tmp_path / "b", **audit):
        pass
    with sqlite3.connect(db) as conn:
        (fp,) = conn.execute("SELECT value FROM meta WHERE key = 'control_key'").fetchone()
    assert fp == ControlSigner.from_text((tmp_path / "b" / "control.key").read_text()
                                         ).public.fingerprint


def test_authkey_string_carries_the_control_key(server: ControlServer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert server.signer is not None
    assert cli_main(["control", "authkey", "create", "--server", server.url,
                     "--api-key-file", str(server.api_key_file)]) == 0
    text = capsys.readouterr().out.strip()
    authkey, _, key = text.partition("#")
    assert authkey.startswith("wgk_") and key == str(server.signer.public)
    # The same string with another key in it: refused when control signs the challenge,
    # before the (single-use) auth key is sent, so it is still unused afterwards.
    forged = f"{authkey}#{ControlSigner(os.urandom(32)).public}"
    with pytest.raises(ControlKeyMismatch, match="not the pinned key"):
        ControlClient(server.url).register(PrivateKey.generate(),
                                           PrivateKey.generate().public, "two", auth_key=forged)
    c = ControlClient(server.url)
    c.register(PrivateKey.generate(), PrivateKey.generate().public, "one", auth_key=text)
    assert c.control_key == server.signer.public


def test_registration_and_stream_are_bound_to_the_key(server: ControlServer,
                                                      authkey: str) -> None:
    assert server.signer is not None
    c = ControlClient(server.url)  # trust on first use
    reg = c.register(PrivateKey.generate(), PrivateKey.generate().public, "n1",
                     auth_key=authkey)
    assert c.control_key == server.signer.public
    assert first_map(c).self_node.ipv4 == reg.node.ipv4
    # On the wire: a signed session line, then each line followed by its MAC.
    nonce = base64.urlsafe_b64encode(os.urandom(32)).decode()
    r = requests.get(f"{server.url}/v1/netmap", params={"nonce": nonce}, stream=True,
                     headers={"Authorization": f"Bearer {c.node_token}"}, timeout=5)
    lines = r.iter_lines()
    assert b'"type":"session"' in next(lines)
    assert next(lines).startswith(b'{"type":"netmap"')
    assert next(lines).startswith(b'{"mac":"')
    r.close()
    # A client pinned to another key refuses the stream with one clear line.
    other = ControlSigner(os.urandom(32)).public
    wrong = ControlClient(server.url, node_token=c.node_token, node_key=c.node_key,
                          control_key=other)
    with pytest.raises(ControlKeyMismatch) as e:
        first_map(wrong)
    assert "\n" not in str(e.value) and str(other) in str(e.value)


def test_tls_with_a_private_ca(tmp_path: Path, authkey: str) -> None:
    ca = LabCA(tmp_path / "ca")
    cert, key = ca.issue("control", "127.0.0.1")
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path / "s", tls_cert=cert,
                       tls_key=key) as srv:
        assert srv.url.startswith("https://")
        admin = ControlClient(srv.url, api_key=srv.admin_key, ca=str(ca.path))
        ak = admin.create_auth_key()["key"]
        c = ControlClient(srv.url, ca=str(ca.path))
        c.register(PrivateKey.generate(), PrivateKey.generate().public, "tls", auth_key=ak)
        assert first_map(c).self_node.name == "tls"
        with pytest.raises(WgmeshError, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
            ControlClient(srv.url, api_key=srv.admin_key).nodes()


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    for url in ("http://192.0.2.1:8420", "http://control.example:8420", "ftp://x"):
        with pytest.raises(WgmeshError, match=r"refusing plain http|expected https"):
            ControlClient(url)
    ControlClient("http://127.0.0.1:8420")  # local use and tests
    ControlClient("http://[::1]:8420")
    threads = threading.active_count()
    with pytest.raises(WgmeshError, match="refusing plain http"):
        wgmesh.Node("http://192.0.2.1:8420", state_dir=tmp_path / "n")
    assert threading.active_count() == threads  # refused before its loop thread started
    cp = subprocess.run([sys.executable, "-m", "wgmesh", "up", "--control",
                         "http://192.0.2.1:8420", "--authkey", "wgk_x", "--state-dir",
                         str(tmp_path / "st"), "--socket", str(tmp_path / "a.sock")],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "WGMESH_DEBUG": ""})
    assert cp.returncode == 1 and cp.stderr.strip().count("\n") == 0, cp.stderr
    assert "refusing plain http:// to control at 192.0.2.1" in cp.stderr


def test_a_state_dir_from_before_control_keys_re_pins(server: ControlServer, authkey: str,
                                                      tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An old node has a token and identity but no pinned key: its first verified stream
    names the key, which it pins with a clear message (no crash, no re-registration)."""
    assert server.signer is not None
    node = AsyncNode(server.url, state_dir=tmp_path / "node")
    old = ControlClient(server.url)
    reg = old.register(node.state.node_key, node.state.disco_key.public, "old",
                       auth_key=authkey)
    assert node.state.load_control_key(server.url) is None
    node._control = ControlClient(server.url, node_token=reg.node_token,
                                  node_key=node.state.node_key)
    first_map(node._control)
    with caplog.at_level(logging.WARNING, "wgmesh.node.api"):
        node._pin_control_key(None, had_token=True)
    assert "registered before control keys existed; now pinning" in caplog.text
    assert node.state.load_control_key(server.url) == server.signer.public
    assert node.state.load_control_key("https://elsewhere:8420") is None
    assert ControlKey.parse(str(server.signer.public)) == server.signer.public
