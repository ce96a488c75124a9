"""A node with 500 peers on the userspace backend: a netmap change is applied as a diff
(issue 14, Load; the check is ``tests/support/nodescale.py``)."""

from __future__ import annotations

import pytest
from nodescale import check_a_change_is_applied_as_a_diff
from systools import need

from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns


def test_a_change_in_a_500_peer_netmap_is_applied_as_a_diff(lab: Lab) -> None:
    need("wg")
    check_a_change_is_applied_as_a_diff(lab, "userspace")
