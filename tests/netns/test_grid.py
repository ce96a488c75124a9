"""The connectivity grid on the userspace backend: every NAT pair connects, on the path
its NATs allow (issue: traversal). Runs the real agents, control and relays in a lab."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wgmesh.lab.grid import expected_path, grid_pairs

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_full_userspace_grid() -> None:
    cp = subprocess.run([sys.executable, "-m", "wgmesh", "lab", "grid", "--json"],
                        capture_output=True, text=True, timeout=900)
    assert cp.returncode == 0, cp.stderr[-3000:]
    rows = json.loads(cp.stdout)
    assert {(r["a"], r["b"]) for r in rows} == set(grid_pairs())
    for r in rows:
        row = json.dumps(r)  # the whole row in a failure message, with its reason
        assert set(r) >= {"a", "b", "backend", "connected", "path", "t_first_packet_s",
                          "t_direct_s", "recovered_after_flush", "reason"}, row
        assert r["backend"] == "userspace"
        assert r["connected"], row
        want = expected_path(r["a"], r["b"])
        assert r["path"] == want, row
        assert r["recovered_after_flush"], row
        assert r["t_first_packet_s"] is not None
        assert (r["t_direct_s"] is None) == (want == "relay"), row
        assert (r["reason"] == "direct") == (want == "direct"), row
