"""The kernel backend's packet-filter enforcer: runs ``nft`` with :mod:`~wgmesh.wireguard.filter`'s
scripts, in the interface's namespace.

It fails closed: any failure (``nft`` missing, refused, the namespace gone) is a
:class:`~wgmesh.wireguard.backend.BackendError`, so the caller never goes on to
configure peers that the filter does not cover.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from wgmesh.netmap import FilterRule
from wgmesh.wireguard.backend import BackendError
from wgmesh.wireguard.filter import nft_delete, nft_replace
from wgmesh.wireguard.netns import call_in

__all__ = ["NftFilter", "nft_available"]


def nft_available() -> tuple[bool, str]:
    """Is the ``nft`` tool on ``PATH``? Returns (ok, why)."""
    path = shutil.which("nft")
    if path is None:
        return False, "nft (nftables) is not installed; the kernel backend filters with it"
    return True, f"nft at {path}"


class NftFilter:
    """wgmesh's nftables table for one interface in ``netns`` (``None``: this namespace)."""

    def __init__(self, ifname: str, *, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns
        self.installed = False

    def install(self, rules: Sequence[FilterRule]) -> None:
        """Swap in the table for ``rules`` atomically; the old one stays if this fails."""
        self._run(nft_replace(self.ifname, rules))
        self.installed = True

    def remove(self) -> None:
        """Take the table out (a no-op when none was installed)."""
        if self.installed:
            self._run(nft_delete(self.ifname))
            self.installed = False

    def _run(self, script: str) -> None:
        try:
            cp = call_in(self.netns, subprocess.run, ["nft", "-f", "-"], input=script,
                         capture_output=True, text=True)
        except OSError as e:
            raise BackendError(f"{self.ifname}: cannot run nft: {e.strerror or e}") from None
        if cp.returncode != 0:
            raise BackendError(f"{self.ifname}: nft failed: {cp.stderr.strip()}")
