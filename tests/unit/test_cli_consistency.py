"""The CLI as a new user meets it: every agent command takes --socket (and WGMESH_SOCKET),
--json wherever a table is printed, one-line errors, and file receive makes its DIR."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wgmesh.cli.main import build_parser
from wgmesh.node.agent import local_methods
from wgmesh.node.api import AsyncNode
from wgmesh.node.events import Event
from wgmesh.node.localapi import LocalAPIServer

pytestmark = pytest.mark.unit

#: Commands that talk to the running agent over its local API.
AGENT_COMMANDS = [("status",), ("ping",), ("down",), ("pin",), ("unpin",), ("netcheck",),
                  ("file", "send"), ("events",)]
#: Commands that print a table.
TABLE_COMMANDS = [("status",), ("file", "receive"), ("lab", "check"),
                  ("control", "nodes", "list"), ("control", "authkey", "list"),
                  ("control", "apikey", "list"), ("control", "audit", "list"),
                  ("control", "routes", "list"), ("lock", "status"), ("events",)]


def _command(path: tuple[str, ...]) -> argparse.ArgumentParser:
    p = build_parser()
    for name in path:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in p._actions for o in a.option_strings}


@pytest.mark.parametrize("path", AGENT_COMMANDS, ids=" ".join)
def test_agent_commands_take_socket_and_the_environment(path: tuple[str, ...],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert _options(_command(path))["--socket"].default == "/run/wgmesh/wgmesh.sock"
    monkeypatch.setenv("WGMESH_SOCKET", "/tmp/elsewhere.sock")
    assert _options(_command(path))["--socket"].default == "/tmp/elsewhere.sock"


@pytest.mark.parametrize("path", TABLE_COMMANDS, ids=" ".join)
def test_tables_have_json(path: tuple[str, ...]) -> None:
    assert "--json" in _options(_command(path))


def _wgmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "wgmesh", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_errors_are_one_line(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "none.sock")
    for cp in (_wgmesh("file", "send", "b", "/etc/hostname", env={"WGMESH_SOCKET": nowhere}),
               _wgmesh("pin", "b", "relay", "--socket", nowhere),
               _wgmesh("status", "--explain", "b", "--socket", nowhere)):
        assert cp.returncode == 1 and cp.stderr.count("\n") == 1, cp.stderr
        assert cp.stderr.startswith("wgmesh: error: no wgmesh agent running (") \
            and nowhere in cp.stderr
    cp = subprocess.run([sys.executable, "-m", "wgmesh.cli.file", "send", "100.64.0.9",
                         str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1 and "missing" in cp.stderr


def test_file_send_to_an_address_needs_no_agent(tmp_path: Path) -> None:
    """Only a peer name needs the agent: with an address the file's own error shows."""
    cp = _wgmesh("file", "send", "127.0.0.1", str(tmp_path / "missing"),
                 env={"WGMESH_SOCKET": str(tmp_path / "none.sock")})
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1
    assert "missing: No such file or directory" in cp.stderr and "agent" not in cp.stderr


def test_events_and_bad_peers_through_a_local_api(tmp_path: Path) -> None:
    """``events`` lists what the agent emitted before it was asked; a peer the agent does
    not know is one line, whichever command names it."""
    node = AsyncNode("http://127.0.0.1:1", state_dir=tmp_path / "state")
    sock = str(tmp_path / "api.sock")

    async def run() -> tuple[subprocess.CompletedProcess[str], ...]:
        api = LocalAPIServer(sock, local_methods(node))
        await api.start()
        node.events.emit(Event("pin_failed", {"peer": "t", "pin": "direct",
                                              "reason": "no answer"}, 1.0))
        node.events.emit(Event("netmap", {"seq": 3, "peers": 1}, 2.0))
        try:
            return tuple([await asyncio.to_thread(_wgmesh, *args, "--socket", sock)
                          for args in (("events", "--json", "--name", "pin_failed"),
                                       ("events",), ("ping", "nope"),
                                       ("file", "send", "nope", "/etc/hostname"))])
        finally:
            await api.close()

    js, table, ping, send = asyncio.run(run())
    assert json.loads(js.stdout) == [{"name": "pin_failed", "at": 1.0, "data": {
        "peer": "t", "pin": "direct", "reason": "no answer"}}]
    assert [line.split()[1] for line in table.stdout.splitlines()[-2:]] == ["pin_failed",
                                                                          "netmap"]
    assert "reason=no answer" in table.stdout
    for cp in (ping, send):
        assert cp.returncode == 1 and cp.stderr.count("\n") == 1
        assert cp.stderr.startswith("wgmesh: error: ")
    assert "no peer 'nope'" in send.stderr


def test_file_receive_creates_its_directory(tmp_path: Path) -> None:
    (tmp_path / "state" / "inbox").mkdir(parents=True)
    (tmp_path / "state" / "inbox" / "hello.txt").write_text("hi")
    dest = tmp_path / "new" / "dir"
    cp = subprocess.run([sys.executable, "-m", "wgmesh.cli.file", "receive", "--state-dir",
                         str(tmp_path / "state"), str(dest)], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert (dest / "hello.txt").read_text() == "hi"
    (tmp_path / "afile").write_text("")
    cp = subprocess.run([sys.executable, "-m", "wgmesh.cli.file", "receive", "--state-dir",
                         str(tmp_path / "state"), str(tmp_path / "afile")],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and "not a directory" in cp.stderr
