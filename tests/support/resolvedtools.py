"""Debian's real systemd-resolved on a lab host, without touching this machine's.

:func:`private_resolved` starts, in the host's network namespace:

* a holder process in a new mount namespace, with tmpfs over ``/run/systemd`` and
  ``/run/dbus`` and bind mounts over ``/etc/passwd``, ``/etc/group`` (plus the
  ``systemd-resolve`` user resolved drops to) and ``/etc/resolv.conf`` (resolved's stub,
  127.0.0.53, as on a host where it runs); the host's /run and /etc are never written;
* a system D-Bus there (``dbus-daemon`` with the distribution's system.conf and
  resolved's own bus policy), on ``/run/dbus/system_bus_socket``;
* systemd-resolved itself, unpacked by scripts/fetch-resolved.sh (never installed), with
  the lab upstream as its only DNS server, so no query leaves the lab.

It sets the host's :attr:`~wgmesh.lab.network.Host.mount_ns`, so everything then run or
spawned there (the agent, ``resolvectl``, ``getent``) sees that resolved, and puts the
unpacked ``resolvectl`` on ``PATH`` for what the test starts meanwhile; on exit it kills
all of it, even on failure (with the last process the mount namespace and its mounts go).

Run as a script, ``resolvedtools.py names STATE_DIR IFNAME [RESOLV_CONF]`` serves mesh
names for dnstools' netmap (``DOMAIN``) on IFNAME with
:class:`~wgmesh.node.names.MeshNames` (RESOLV_CONF: its opt-in file hook), printing
``hook HOOK``; SIGTERM stops it (``stopped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from wgmesh.lab.network import Host, Lab, Process

#: Where scripts/fetch-resolved.sh unpacks the package; ``bin/`` holds its wrappers.
ROOT = Path(os.environ.get("WGMESH_RESOLVED_ROOT", "/var/cache/wgmesh/systemd-resolved"))
BIN = ROOT / "bin"
RESOLVECTL = str(BIN / "resolvectl")

# $1: the directory with the files to mount. Prints "ready" and holds the namespace.
_SETUP = """set -eu
mount -t tmpfs -o mode=755 wgmesh-resolved /run/systemd
mount -t tmpfs -o mode=755 wgmesh-dbus /run/dbus
mkdir /run/systemd/resolved.conf.d
cp "$1/resolved.conf" /run/systemd/resolved.conf.d/lab.conf
for f in passwd group resolv.conf; do mount --bind "$1/$f" "/etc/$f"; done
echo ready
exec sleep infinity
"""

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <include>/usr/share/dbus-1/system.conf</include>
  <includedir>{policy}</includedir>
</busconfig>
"""


def _with_resolve_user(passwd: str, group: str) -> tuple[str, str]:
    """passwd and group text with a ``systemd-resolve`` user and group (a free id)."""
    if any(line.startswith("systemd-resolve:") for line in passwd.splitlines()):
        return passwd, group
    used = {line.split(":")[2] for text in (passwd, group) for line in text.splitlines()
            if line.count(":") >= 3}
    uid = next(i for i in range(999, 100, -1) if str(i) not in used)
    return (passwd + f"systemd-resolve:x:{uid}:{uid}:systemd Resolver:/:/usr/sbin/nologin\n",
            group + f"systemd-resolve:x:{uid}:\n")


class Resolved:
    """A running private systemd-resolved on ``host`` (see the module docstring)."""

    def __init__(self, lab: Lab, host: Host, bus: Process, daemon: Process,
                 root: Path) -> None:
        self.lab, self.host = lab, host
        self.bus, self.daemon = bus, daemon  #: the dbus-daemon and resolved processes
        self.root = root  #: the mount namespace's / as seen from here

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``resolvectl ARGS`` on the host, talking to this resolved over its D-Bus."""
        return self.lab.run(self.host, [RESOLVECTL, *args], check=False)

    def link(self, what: str, ifname: str) -> list[str]:
        """``resolvectl dns|domain IFNAME``'s values ([] also once the link is gone)."""
        out = self.ctl(what, ifname).stdout
        return out.split(":", 1)[1].split() if ":" in out else []

    def everywhere(self, what: str) -> str:
        """``resolvectl dns|domain`` for every link and the global settings."""
        return self.ctl(what).stdout


@contextlib.contextmanager
def private_resolved(lab: Lab, host: Host, upstream: str, workdir: Path) -> Iterator[Resolved]:
    """systemd-resolved on ``host`` with ``upstream`` as its DNS server, until exit."""
    if not (BIN / "systemd-resolved").exists():
        pytest.skip(f"systemd-resolved not unpacked in {ROOT} (scripts/fetch-resolved.sh)")
    assert host.mount_ns is None, "one private resolved per host"
    workdir.mkdir(parents=True, exist_ok=True)
    passwd, group = _with_resolve_user(Path("/etc/passwd").read_text(),
                                       Path("/etc/group").read_text())
    (workdir / "passwd").write_text(passwd)
    (workdir / "group").write_text(group)
    (workdir / "resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    (workdir / "resolved.conf").write_text(f"[Resolve]\nDNS={upstream}\nFallbackDNS=\n")
    (workdir / "bus.conf").write_text(
        _BUS_CONF.format(policy=ROOT / "usr/share/dbus-1/system.d"))
    started: list[Process] = []  # closed newest first, whatever happens
    try:
        holder = lab.spawn(host, ["unshare", "--mount", "--propagation", "private",
                                  "sh", "-c", _SETUP, "setup", str(workdir)])
        started.append(holder)
        holder.wait_for_output("ready")
        host.mount_ns = f"/proc/{holder.pid}/ns/mnt"
        inside = Path(f"/proc/{holder.pid}/root")
        bus = lab.spawn(host, ["dbus-daemon", f"--config-file={workdir / 'bus.conf'}",
                               "--nofork", "--nopidfile"])
        started.append(bus)
        wait_for(lambda: (inside / "run/dbus/system_bus_socket").exists(), 10,
                 lambda: f"the private system bus: {bus.stderr}")
        daemon = lab.spawn(host, ["env", "-u", "NOTIFY_SOCKET", str(BIN / "systemd-resolved")],
                           env={"SYSTEMD_LOG_LEVEL": "debug"})
        started.append(daemon)
        resolved = Resolved(lab, host, bus, daemon, inside)

        def on_the_bus() -> bool:
            assert daemon.poll() is None, f"systemd-resolved exited: {daemon.stderr[-3000:]}"
            return resolved.ctl("status").returncode == 0

        wait_for(on_the_bus, 15, lambda: f"systemd-resolved on D-Bus: {daemon.stderr[-3000:]}")
        with pytest.MonkeyPatch.context() as mp:  # resolvectl, for what starts from here
            mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
            yield resolved
    finally:
        host.mount_ns = None
        for p in reversed(started):
            p.close()

async def _names(state_dir: str, ifname: str, resolv_conf: str | None = None) -> None:
    import attrs
    from dnstools import DOMAIN, NETMAP

    from wgmesh.node.names import MeshNames

    names = MeshNames(Path(state_dir), ifname, resolv_conf=resolv_conf)
    await names.start(attrs.evolve(NETMAP, domain=DOMAIN))
    print(f"hook {names.hook}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await names.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode != "names":
        sys.exit(f"unknown mode {mode!r}")
    asyncio.run(_names(*args))
