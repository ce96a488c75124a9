"""``backend="auto" | "kernel" | "userspace"``: pick a data plane, and say which and why.

Auto prefers the kernel module (Python then never touches a direct-path
packet) wherever ``ip link add type wireguard`` works and ``nft`` is there to
enforce the packet filter, and falls back to the userspace device otherwise. An explicit choice that cannot be honoured is an
error, never a silent substitution.
"""

from __future__ import annotations

import logging
import os

from wgmesh.wireguard.backend import Backend, BackendError, kernel_wireguard_available

__all__ = ["BACKENDS", "open_backend"]

log = logging.getLogger("wgmesh.backend")

BACKENDS = ("auto", "kernel", "userspace")


def _kernel_possible() -> tuple[bool, str]:
    from wgmesh.wireguard.nftables import nft_available

    ok, why = nft_available()  # without it the filter cannot be enforced: fail closed
    if not ok:
        return False, why
    return kernel_wireguard_available()


def _userspace_possible() -> tuple[bool, str]:
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing (modprobe tun)"
    if os.geteuid() != 0:
        return False, "creating a TUN interface needs root (CAP_NET_ADMIN)"
    return True, "TUN available"


def open_backend(kind: str, ifname: str, *, netns: str | None = None) -> tuple[Backend, str]:
    """A not-yet-started backend for ``ifname`` and the reason it was chosen.

    ``netns`` places a kernel interface in that namespace; the userspace device
    lives in the calling process's namespace, so it cannot honour one.
    """
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    why = "not probed"
    if kind in ("auto", "kernel"):
        ok, why = _kernel_possible()
        if ok:
            from wgmesh.wireguard.kernel import KernelBackend

            reason = f"kernel: {why}"
            log.info("%s: backend %s", ifname, reason)
            return KernelBackend(ifname, netns=netns), reason
        if kind == "kernel":
            raise BackendError(f"backend 'kernel' requested but {why}")
    ok, tun_why = _userspace_possible()
    if not ok:
        raise BackendError(f"no usable WireGuard backend: kernel: {why}; userspace: {tun_why}")
    if netns is not None:
        raise BackendError(f"the userspace backend runs in this process's namespace and "
                           f"cannot be placed in {netns!r} (kernel: {why})")
    from wgmesh.wireguard.userspace import UserspaceBackend

    reason = "userspace: requested" if kind == "userspace" else \
        f"userspace: no kernel WireGuard ({why})"
    log.info("%s: backend %s", ifname, reason)
    return UserspaceBackend(ifname), reason
