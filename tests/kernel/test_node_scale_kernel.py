"""A node with 500 peers on the kernel backend (in the VM): a netmap change is applied as a
diff over netlink (issue 14, Load; the check is ``tests/support/nodescale.py``).

``soak``: it repeats what two smaller tests prove (the agent's diffs at 500 peers on
userspace, ``tests/netns/test_node_scale.py``; kernel diffs of 301 peers in one netlink
message, ``test_kernel_backend.py``) and costs 4-7 minutes of emulated VM, more than the
kernel tier's CI budget has left. Run it with ``--soak`` (or ``WGMESH_SOAK=1``).
"""

from __future__ import annotations

import pytest
from nodescale import check_a_change_is_applied_as_a_diff

from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns, pytest.mark.soak]


def test_a_change_in_a_500_peer_netmap_is_applied_as_a_diff_kernel(lab: Lab) -> None:
    check_a_change_is_applied_as_a_diff(lab, "kernel")
