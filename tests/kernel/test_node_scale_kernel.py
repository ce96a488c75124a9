"""A node with 500 peers on the kernel backend (in the VM): a netmap change is applied as a
diff over netlink (issue 14, Load; the check is ``tests/support/nodescale.py``)."""

from __future__ import annotations

import pytest
from nodescale import check_a_change_is_applied_as_a_diff

from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]
#: Estimated seconds in the emulated VM (tests/support/vmtier.py balances its VMs by it).
VM_COST_S = 400


def test_a_change_in_a_500_peer_netmap_is_applied_as_a_diff_kernel(lab: Lab) -> None:
    check_a_change_is_applied_as_a_diff(lab, "kernel")
