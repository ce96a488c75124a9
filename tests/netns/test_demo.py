"""`wgmesh demo --json`: the README's first command, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wgmesh.lab.grid import expected_path

pytestmark = pytest.mark.netns


def test_demo_json_summary() -> None:
    cp = subprocess.run([sys.executable, "-m", "wgmesh", "demo", "--json"], capture_output=True,
                        text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    out = json.loads(cp.stdout)
    kinds = {"pub": "none", "home": "eim", "cafe": "symmetric", "office": "udp-blocked"}
    assert len(out["peers"]) == 6
    for p in out["peers"]:
        assert set(p) >= {"a", "b", "path", "rtt_ms"}
        assert p["rtt_ms"] is not None, p
        want = expected_path(kinds[p["a"]], kinds[p["b"]])
        assert p["path"] == want, p
    assert out["file"]["bytes"] > 0 and out["file"]["sha256_ok"] is True
