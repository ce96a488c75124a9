"""Network-namespace lab: an "internet", NAT routers of each kind, hosts, processes.

Every wgmesh test and experiment runs on this. Topology::

    [host none] --+                       +-- [router eim] == lan == [host]
                  |-- internet (bridge) --|
    [server]   ---+   192.0.2.1/24        +-- [router symmetric] == lan == [host]
                      198.51.100.1/24
                      203.0.113.1/24

* Public hosts (servers, relays, ``none`` nodes) live on 203.0.113.0/24 and
  2001:db8:203::/64; NAT routers' WAN addresses on 198.51.100.0/24; a second
  address per server on 192.0.2.0/24 lets probes tell address-dependent
  filtering apart. All are RFC 5737 / RFC 3849 documentation ranges, so
  nothing here can reach a real network.
* LANs are 10.<n>.0.0/24 behind their router, inside namespaces the lab owns.
  A router made with ``ipv6=True`` also routes a global 2001:db8:<1000+n>::/64
  to its LAN, without NAT, behind a stateful ip6tables firewall (outbound
  flows and their replies pass, new inbound ones are dropped), as most home
  routers do. With ``ipv4=False`` as well the LAN is IPv6-only: its hosts keep
  a LAN IPv4 address but have no IPv4 route off the LAN (the router forwards
  no IPv4), as behind an IPv6-only access network.
* A router may also offer port mapping (``portmap="upnp" | "natpmp" | "pcp"``,
  spelled ``symmetric+pcp`` etc. on the command line): the real miniupnpd, see
  :mod:`wgmesh.lab.portmapd`. Its files live in the lab's :attr:`Lab.state_dir`.
* Names carry a unique prefix (``wgm`` + 6 hex digits), so labs run side by
  side; ``Lab.close`` (or leaving the ``with`` block, an exception, SIGINT or
  SIGTERM) kills every process and deletes every namespace, which takes every
  veth and bridge with it. ``wgmesh lab clean`` removes leftovers of labs whose
  owning process died.

Usage (also from Jupyter)::

    with Lab() as lab:
        srv = lab.add_public_host("srv")
        nat = lab.add_nat("home", kind="eim")
        pc = lab.add_host("pc", nat=nat)
        print(lab.run(pc, ["ping", "-c1", srv.ip]).stdout)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

import attrs

from wgmesh.errors import WgmeshError
from wgmesh.lab.portmapd import PORTMAP_KINDS, MiniUpnpd, PortmapKind

__all__ = [
    "NAT_KINDS",
    "TIME_SCALE",
    "Host",
    "Lab",
    "LabError",
    "NatKind",
    "NatRouter",
    "PortmapKind",
    "Process",
    "clean_leftovers",
    "parse_nat_spec",
    "read_output",
]

NatKind = Literal["none", "eim", "symmetric", "udp-blocked"]
NAT_KINDS: tuple[NatKind, ...] = ("none", "eim", "symmetric", "udp-blocked")
_MAPPABLE = ("eim", "symmetric")  # NATs a port-mapping router can be

PREFIX_RE = re.compile(r"^wgm[0-9a-f]{6}$")
NS_RE = re.compile(r"^(wgm[0-9a-f]{6})-")
STATE_DIR = Path("/run/wgmesh/labs")

#: Multiplies the lab's waits; the kernel-tier VM (TCG, ~10x slower Python) sets it.
TIME_SCALE = float(os.environ.get("WGMESH_TIME_SCALE", "1") or 1)

PUBLIC_NET = "203.0.113"
ALT_NET = "192.0.2"
WAN_NET = "198.51.100"
PUBLIC_V6 = "2001:db8:203::"


class LabError(WgmeshError):
    """A lab command failed; the message carries the command and its stderr."""


def parse_nat_spec(spec: str) -> tuple[NatKind, PortmapKind | None]:
    """``symmetric+pcp`` -> ``("symmetric", "pcp")``; a plain kind has no port mapping."""
    kind, _, portmap = spec.partition("+")
    if kind not in NAT_KINDS:
        raise LabError(f"unknown NAT kind {kind!r}; choose {', '.join(NAT_KINDS)}")
    if not portmap:
        return kind, None
    if kind not in _MAPPABLE or portmap not in PORTMAP_KINDS:
        raise LabError(f"unknown NAT {spec!r}: port mapping is "
                       f"{' or '.join(_MAPPABLE)} + {' | '.join(PORTMAP_KINDS)}")
    return kind, portmap


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise LabError(f"{argv[0]}: not installed (run scripts/setup-debian.sh)") from e
    if check and cp.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


@attrs.define(eq=False)
class Host:
    """A machine in the lab: one network namespace."""

    lab: Lab = attrs.field(repr=False)
    name: str
    ns: str
    ip: str  # the address others use to reach it (public for public hosts, LAN otherwise)
    ip6: str | None = None
    alt_ip: str | None = None  # second public address (servers), for filtering probes
    nat: NatRouter | None = attrs.field(default=None, repr=False)
    #: A mount namespace (``/proc/PID/ns/mnt``) that every command run or spawned here
    #: enters after the network namespace, e.g. one with a private systemd-resolved and
    #: D-Bus (tests/support/resolvedtools.py); None: the host's mounts.
    mount_ns: str | None = attrs.field(default=None, repr=False)

    @property
    def public(self) -> bool:
        return self.nat is None

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run in this host's namespaces."""
        mount = ["nsenter", f"--mount={self.mount_ns}", "--"] if self.mount_ns else []
        return ["ip", "netns", "exec", self.ns, *mount, *argv]

    def run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self, argv, **kw)  # type: ignore[arg-type]

    def spawn(self, argv: Sequence[str], **kw: object) -> Process:
        return self.lab.spawn(self, argv, **kw)  # type: ignore[arg-type]

    def python(self, *args: str, **kw: object) -> Process:
        return self.lab.spawn(self, [sys.executable, *args], **kw)  # type: ignore[arg-type]


@attrs.define(eq=False)
class NatRouter(Host):
    """A NAT router: WAN on the internet, a LAN bridge behind it."""

    kind: NatKind = "eim"
    hairpin: bool = False
    index: int = 0
    hosts: list[Host] = attrs.field(factory=list, repr=False)
    portmap: PortmapKind | None = None
    portmapd: MiniUpnpd | None = attrs.field(default=None, repr=False)
    ipv6: bool = False
    ipv4: bool = True

    @property
    def lan_prefix(self) -> str:
        return f"10.{self.index}.0"

    @property
    def lan_prefix6(self) -> str:
        """The LAN's global IPv6 /64 (routed only when :attr:`ipv6`), e.g. ``2001:db8:1005::``."""
        return f"2001:db8:{0x1000 + self.index:x}::"

    @property
    def spec(self) -> str:
        """The kind as spelled on the command line: ``symmetric+pcp``, ``eim``."""
        return f"{self.kind}+{self.portmap}" if self.portmap else self.kind

    def flush(self) -> None:
        """Forget every NAT mapping, as a router reboot or mapping timeout would."""
        self.lab.run(self, ["conntrack", "-F"], check=False)

    def reboot(self) -> None:
        """Reboot as far as NAT state goes: conntrack flushed and, on a port-mapping
        router, miniupnpd restarted with its mapping table and lease file gone."""
        if self.portmapd is None:
            self.flush()
        else:
            self.portmapd.reboot()


def read_output(f: IO[bytes]) -> str:
    """What a child has written so far to ``f``, a file it has as its stdout or stderr.

    Read with ``pread``: the child writes through the same open file, so the file offset
    is shared, and a ``seek`` here would put the child's next write on top of its earlier
    output (lines lost while a test polled a busy process)."""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


class Process:
    """A process in a lab namespace. Output goes to files, so it never blocks on a pipe."""

    def __init__(self, host: Host, argv: Sequence[str], env: dict[str, str] | None,
                 cwd: str | None) -> None:
        self.host = host
        self.argv = list(argv)
        # Owned by this object and closed in close(); files, not pipes, so output never blocks.
        self._out = tempfile.TemporaryFile()  # noqa: SIM115
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            host.exec_argv(argv), stdout=self._out, stderr=self._err,
            stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @property
    def stdout(self) -> str:
        return read_output(self._out)

    @property
    def stderr(self) -> str:
        return read_output(self._err)

    def wait_for_output(self, needle: str, timeout: float = 10.0, stream: str = "stdout") -> str:
        """Poll the output until ``needle`` appears; raise if the process dies or time runs out.

        ``timeout`` is scaled by :data:`TIME_SCALE`."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            text = self.stdout if stream == "stdout" else self.stderr
            if needle in text:
                return text
            if self.poll() is not None:
                raise LabError(f"{self.argv[0]} exited {self.poll()} before printing {needle!r}:"
                               f" {self.stderr[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {needle!r} from {self.argv}:"
                               f" {self.stderr[-2000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 3.0) -> int | None:
        """SIGTERM the process group, then SIGKILL; always reaps."""
        if self.popen.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, sig)
                try:
                    self.popen.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        rc = self.popen.wait()
        return rc

    def kill(self) -> int:
        """SIGKILL the process group at once, as a crash would (no clean-up), and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.wait()

    def close(self) -> None:
        self.stop()
        self._out.close()
        self._err.close()

    def __repr__(self) -> str:
        return f"<Process {self.pid} on {self.host.name}: {shlex.join(self.argv)[:60]}>"


_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()
_signals_installed = False


def _close_all() -> None:
    if os.getpid() != _handler_pid:
        return  # a forked child: the labs belong to the parent
    for lab in list(_open_labs):
        lab.close()


_handler_pid = 0


def _on_term(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so ``with Lab()`` blocks unwind and clean up. A forked
    # child inherits this handler (pyroute2 forks to open sockets in a namespace); there it
    # must die as by default, never unwind a copy of its parent's stack.
    if os.getpid() != _handler_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    global _signals_installed, _handler_pid
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_term)
    _handler_pid = os.getpid()
    atexit.register(_close_all)
    _signals_installed = True


class Lab:
    """A disposable network of namespaces. Use as a context manager (or call ``close``)."""

    def __init__(self, prefix: str | None = None) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, iptables)")
        self.prefix = prefix or f"wgm{secrets.token_hex(3)}"
        if not PREFIX_RE.match(self.prefix):
            raise LabError(f"lab prefix must look like wgm + 6 hex digits, got {self.prefix!r}")
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self._namespaces: list[str] = []
        self._lock = threading.RLock()
        self._next_public = 10
        self._next_wan = 10
        self._next_lan = 1
        self._closed = False
        #: Files of this lab's daemons (miniupnpd configs and leases); removed at close.
        self.state_dir = STATE_DIR / f"{self.prefix}.d"
        self._stun: Process | None = None
        _install_signal_handlers()
        _open_labs.add(self)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / self.prefix).write_text(str(os.getpid()))
        try:
            self.internet = self._make_internet()
        except BaseException:
            self.close()
            raise

    # ---- life cycle -------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process and delete every namespace. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for p in reversed(self.processes):
                with contextlib.suppress(Exception):
                    p.close()
            for ns in reversed(self._namespaces):
                _delete_namespace(ns)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (STATE_DIR / self.prefix).unlink()
            _open_labs.discard(self)

    # ---- building ---------------------------------------------------------------------
    def _ns(self, name: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9-]{0,30}$", name):
            raise LabError(f"host name {name!r}: use lowercase letters, digits and '-'")
        if name in self.hosts:
            raise LabError(f"host {name!r} exists already")
        ns = f"{self.prefix}-{name}"
        _sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ns_setup(ns)
        return ns

    def _ns_setup(self, ns: str) -> None:
        self._ip(ns, "link", "set", "lo", "up")
        self._sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        # Where br_netfilter is loaded (Docker hosts), bridged frames would also run
        # through iptables and the NAT's FORWARD policy; a real switch does not do that.
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
             "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0"],
            check=False)

    def _ip(self, ns: str, *args: str) -> None:
        _sh(["ip", "-n", ns, *args])

    def _sysctl(self, ns: str, *settings: str) -> None:
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings])

    def _bridge(self, ns: str, name: str) -> None:
        """A bridge with a MAC address of its own. Without one, Linux gives a bridge its
        lowest port's MAC and changes it when a port with a lower one joins; the stack
        then drops (as PACKET_OTHERHOST) frames sent to the old MAC, so a host that
        resolved its gateway before the change is cut off until its ARP entry expires.
        Hosts joining a LAN or the internet while others run made that a lab flake:
        an agent's first connection to control timed out."""
        mac = bytearray(secrets.token_bytes(6))
        mac[0] = (mac[0] & 0xFC) | 0x02  # locally administered, unicast
        self._ip(ns, "link", "add", name, "address", mac.hex(":"), "type", "bridge")

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        _sh(["ip", "link", "add", name_a, "netns", ns_a, "type", "veth",
             "peer", "name", name_b, "netns", ns_b])

    def _make_internet(self) -> Host:
        ns = f"{self.prefix}-internet"
        _sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ns_setup(ns)
        self._bridge(ns, "br0")
        for addr in (f"{PUBLIC_NET}.1/24", f"{ALT_NET}.1/24", f"{WAN_NET}.1/24",
                     f"{PUBLIC_V6}1/64"):
            self._ip(ns, "addr", "add", addr, "dev", "br0")
        self._ip(ns, "link", "set", "br0", "up")
        self._sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        return Host(self, "internet", ns, f"{PUBLIC_NET}.1", f"{PUBLIC_V6}1")

    def _attach_to_internet(self, ns: str, port_name: str) -> None:
        self._veth(ns, "eth0", self.internet.ns, port_name)
        self._ip(self.internet.ns, "link", "set", port_name, "master", "br0", "up")
        self._ip(ns, "link", "set", "eth0", "up")

    def add_public_host(self, name: str) -> Host:
        """A host with public addresses (IPv4, a second IPv4 and IPv6), no NAT."""
        with self._lock:
            ns = self._ns(name)
            n = self._next_public
            self._next_public += 1
            if n > 250:
                raise LabError("out of public addresses")
            self._attach_to_internet(ns, f"p{n}")
            ip, alt, ip6 = f"{PUBLIC_NET}.{n}", f"{ALT_NET}.{n}", f"{PUBLIC_V6}{n:x}"
            self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip(ns, "addr", "add", f"{alt}/24", "dev", "eth0")
            self._ip(ns, "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            self._ip(ns, "route", "add", "default", "via", f"{PUBLIC_NET}.1", "src", ip)
            self._ip(ns, "-6", "route", "add", "default", "via", f"{PUBLIC_V6}1")
            host = Host(self, name, ns, ip, ip6, alt)
            self.hosts[name] = host
            return host

    def add_nat(self, name: str, kind: NatKind | str = "eim", *, hairpin: bool = False,
                portmap: PortmapKind | None = None, ipv6: bool = False,
                ipv4: bool = True) -> NatRouter:
        """A NAT router of ``kind`` with an empty LAN. ``kind='none'`` is refused: use
        :meth:`add_public_host` (or :meth:`add_node_host`) for a host without NAT.

        ``portmap`` (or a ``kind`` spelled ``symmetric+pcp``) runs miniupnpd on the
        router, answering that one protocol (see :mod:`wgmesh.lab.portmapd`).
        ``ipv6``: the LAN also gets global IPv6 behind a stateful firewall, no NAT;
        ``ipv4=False`` (with ``ipv6``): the LAN reaches nothing over IPv4, IPv6 only.
        """
        kind, spelled = parse_nat_spec(kind)
        portmap = portmap or spelled
        if kind not in ("eim", "symmetric", "udp-blocked"):
            raise LabError(f"unknown NAT kind {kind!r}; choose eim, symmetric or udp-blocked")
        if portmap is not None and (kind not in _MAPPABLE or portmap not in PORTMAP_KINDS):
            raise LabError(f"no port mapping {portmap!r} on a {kind} NAT")
        if not ipv4 and (not ipv6 or portmap or hairpin):
            raise LabError("an IPv6-only LAN (ipv4=False) needs ipv6, and has no IPv4 "
                           "port mapping or hairpin")
        with self._lock:
            ns = self._ns(name)
            w = self._next_wan
            self._next_wan += 1
            idx = self._next_lan
            self._next_lan += 1
            if w > 250 or idx > 250:
                raise LabError("out of NAT addresses")
            wan = f"{WAN_NET}.{w}"
            self._attach_to_internet(ns, f"w{w}")
            self._ip(ns, "addr", "add", f"{wan}/24", "dev", "eth0")
            self._ip(ns, "route", "add", "default", "via", f"{WAN_NET}.1")
            self._bridge(ns, "lan0")
            self._ip(ns, "addr", "add", f"10.{idx}.0.1/24", "dev", "lan0")
            self._ip(ns, "link", "set", "lan0", "up")
            self._sysctl(ns, "net.ipv4.ip_forward=1")
            router = NatRouter(self, name, ns, wan, kind=kind, hairpin=hairpin, index=idx,
                               portmap=portmap, ipv6=ipv6, ipv4=ipv4)
            if ipv4:
                self._nat_rules(router)
            else:  # nothing over IPv4 leaves the LAN
                _sh(["ip", "netns", "exec", ns, "iptables", "-w", "-P", "FORWARD", "DROP"])
            if ipv6:
                self._route_v6(router, w)
            self.hosts[name] = router
            if portmap is not None:
                router.portmapd = MiniUpnpd(router, portmap, self._stun_server(),
                                            self.state_dir)
                router.portmapd.start()
            return router

    def _stun_server(self) -> str:
        """The STUN responder miniupnpd checks its WAN address with, started once per lab
        on the internet's own address."""
        if self._stun is None:
            self._stun = self.python(self.internet, "-m", "wgmesh.lab.portmapd", "stun",
                                     self.internet.ip)
            self._stun.wait_for_output("ready", timeout=30)
        return self.internet.ip

    def _nat_rules(self, r: NatRouter) -> None:
        """Real iptables rules, the way a home router or carrier NAT behaves.

        * eim: MASQUERADE keeps the source port when it is free and reuses the
          mapping for every destination (endpoint-independent mapping); conntrack
          only admits replies from the exact remote ip:port (port-restricted filtering).
        * symmetric: ``--random-fully`` picks a fresh port per destination.
        * udp-blocked: outbound UDP dropped at the router; TCP still NATed.
        * hairpin: LAN packets to the WAN address are DNATed back to the LAN
          host the port maps to (port preservation makes the port the key).
        """
        ipt = ["ip", "netns", "exec", r.ns, "iptables", "-w"]
        masq = ["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
        if r.kind == "symmetric":
            masq.append("--random-fully")
        rules = [
            masq,
            ["-P", "FORWARD", "DROP"],
            ["-A", "FORWARD", "-i", "lan0", "-o", "eth0", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate",
             "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate",
             "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "eth0", "-j", "DROP"],
        ]
        if r.kind == "udp-blocked":
            rules.insert(1, ["-I", "FORWARD", "1", "-i", "lan0", "-p", "udp", "-j", "DROP"])
        if r.hairpin:
            # Hairpinned flows: forwarded LAN->LAN, and SNATed to the router so replies
            # return through it and get un-NATed.
            rules += [
                ["-A", "FORWARD", "-i", "lan0", "-o", "lan0", "-j", "ACCEPT"],
                ["-t", "nat", "-A", "POSTROUTING", "-o", "lan0", "-s", f"{r.lan_prefix}.0/24",
                 "-d", f"{r.lan_prefix}.0/24", "-j", "MASQUERADE"],
            ]
        for rule in rules:
            _sh([*ipt, *rule])

    def _route_v6(self, r: NatRouter, w: int) -> None:
        """Route the router's LAN /64 from the internet, and let only outbound-initiated
        flows through (ESTABLISHED,RELATED back in; anything new from outside dropped)."""
        wan6 = f"{PUBLIC_V6}1:{w:x}"
        r.ip6 = wan6
        self._ip(r.ns, "-6", "addr", "add", f"{wan6}/64", "dev", "eth0", "nodad")
        self._ip(r.ns, "-6", "route", "add", "default", "via", f"{PUBLIC_V6}1")
        self._ip(r.ns, "-6", "addr", "add", f"{r.lan_prefix6}1/64", "dev", "lan0", "nodad")
        self._sysctl(r.ns, "net.ipv6.conf.all.forwarding=1")
        self._ip(self.internet.ns, "-6", "route", "add", f"{r.lan_prefix6}/64", "via", wan6)
        for rule in (["-P", "FORWARD", "DROP"],
                     ["-A", "FORWARD", "-i", "lan0", "-o", "eth0", "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate",
                      "ESTABLISHED,RELATED", "-j", "ACCEPT"]):
            _sh(["ip", "netns", "exec", r.ns, "ip6tables", "-w", *rule])

    def _hairpin_rule(self, r: NatRouter, host: Host) -> None:
        # With port preservation the external port equals the internal one, so the
        # first LAN host takes hairpinned traffic for every port; later hosts are
        # reached by their own published mappings. This models the common home router.
        if len(r.hosts) == 1:
            _sh(["ip", "netns", "exec", r.ns, "iptables", "-w", "-t", "nat", "-A", "PREROUTING",
                 "-i", "lan0", "-d", r.ip, "-j", "DNAT", "--to-destination", host.ip])

    def add_host(self, name: str, nat: NatRouter) -> Host:
        """A host on ``nat``'s LAN, default route through the router."""
        with self._lock:
            ns = self._ns(name)
            i = len(nat.hosts) + 10
            ip = f"{nat.lan_prefix}.{i}"
            self._veth(ns, "eth0", nat.ns, f"l{i}")
            self._ip(nat.ns, "link", "set", f"l{i}", "master", "lan0", "up")
            self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
            if nat.ipv4:
                self._ip(ns, "route", "add", "default", "via", f"{nat.lan_prefix}.1")
            ip6 = None
            if nat.ipv6:
                ip6 = f"{nat.lan_prefix6}{i:x}"
                self._ip(ns, "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
                self._ip(ns, "-6", "route", "add", "default", "via", f"{nat.lan_prefix6}1")
            host = Host(self, name, ns, ip, ip6, nat=nat)
            nat.hosts.append(host)
            self.hosts[name] = host
            if nat.hairpin:
                self._hairpin_rule(nat, host)
            return host

    def renumber(self, host: Host, i: int) -> str:
        """Give a LAN host the IPv4 address ``<LAN prefix>.i`` in place of its own, as a new
        DHCP lease or a roam to another access point of the LAN would: the old address is
        gone, the default route goes back through the router. Returns the new address."""
        if host.nat is None or not host.nat.ipv4:
            raise LabError(f"{host.name} is not on an IPv4 LAN")
        ip = f"{host.nat.lan_prefix}.{i}"
        with self._lock:
            self._ip(host.ns, "-4", "addr", "flush", "dev", "eth0")
            self._ip(host.ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip(host.ns, "route", "add", "default", "via", f"{host.nat.lan_prefix}.1")
        host.ip = ip
        return ip

    def add_node_host(self, name: str, kind: NatKind | str, *, hairpin: bool = False,
                      ipv6: bool = False, ipv4: bool = True) -> Host:
        """A host behind a NAT of ``kind`` (its own router ``<name>-nat``), or public for 'none'.

        ``kind`` may carry a port mapping: ``symmetric+pcp``; ``ipv6``, ``ipv4``: see
        :meth:`add_nat`."""
        if kind == "none":
            return self.add_public_host(name)
        return self.add_host(name, self.add_nat(f"{name}-nat", kind, hairpin=hairpin,
                                                ipv6=ipv6, ipv4=ipv4))

    def add_subnet_host(self, name: str, routers: Sequence[Host],
                        prefix: str = "198.18.0") -> Host:
        """A plain host at ``prefix.10`` on a new LAN ``prefix.0/24`` that ``routers`` join
        at ``prefix.1``, ``.2``, ... (the default is in the benchmarking range, RFC 2544: the
        lab's internet and NAT WANs use all three IPv4 documentation ranges):
        the network behind a subnet router, or the internet beyond an exit node. Nothing
        routes into it from elsewhere; its default route is the first router."""
        with self._lock:
            ns = self._ns(name)
            self._bridge(ns, "br0")
            self._ip(ns, "addr", "add", f"{prefix}.10/24", "dev", "br0")
            self._ip(ns, "link", "set", "br0", "up")
            for i, r in enumerate(routers, 1):
                port = f"sn{secrets.token_hex(3)}"
                self._veth(r.ns, port, ns, f"r{i}")
                self._ip(ns, "link", "set", f"r{i}", "master", "br0", "up")
                self._ip(r.ns, "addr", "add", f"{prefix}.{i}/24", "dev", port)
                self._ip(r.ns, "link", "set", port, "up")
            self._ip(ns, "route", "add", "default", "via", f"{prefix}.1")
            host = Host(self, name, ns, f"{prefix}.10")
            self.hosts[name] = host
            return host

    def set_link_mtu(self, host: Host, mtu: int) -> None:
        """Narrow ``host``'s uplink (its ``eth0`` and the port it plugs into: the internet
        bridge, or its NAT router's LAN) to ``mtu``, as a tunnel or PPPoE link on the way
        would. A datagram with DF that does not fit is dropped; one without DF is
        fragmented by the host (or, towards the host, by the bridge)."""
        upstream = host.nat.ns if host.nat is not None else self.internet.ns
        eth0 = json.loads(_sh(["ip", "-n", host.ns, "-j", "link", "show", "eth0"]).stdout)[0]
        links = json.loads(_sh(["ip", "-n", upstream, "-j", "link", "show"]).stdout)
        port = next(link["ifname"] for link in links if link["ifindex"] == eth0["link_index"])
        self._ip(host.ns, "link", "set", "eth0", "mtu", str(mtu))
        self._ip(upstream, "link", "set", port, "mtu", str(mtu))

    # ---- processes --------------------------------------------------------------------
    def run(self, host: Host, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace to completion; output captured.

        ``timeout`` is scaled by :data:`TIME_SCALE`."""
        return _sh(host.exec_argv(argv), check=check,
                   timeout=timeout * TIME_SCALE, input=input)

    def spawn(self, host: Host, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: str | None = None) -> Process:
        """Start ``argv`` in ``host``'s namespace; it is killed and reaped at ``close``."""
        with self._lock:
            if self._closed:
                raise LabError("lab is closed")
            p = Process(host, argv, env, cwd)
            self.processes.append(p)
            return p

    def python(self, host: Host, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start this interpreter in ``host``'s namespace, e.g. ``lab.python(h, '-m', 'x')``."""
        return self.spawn(host, [sys.executable, *args], env=env)

    def topology(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """Underlay links and each host's role, for :meth:`plot`."""
        roles = {"internet": "internet"}
        links = []
        for h in self.hosts.values():
            if isinstance(h, NatRouter):
                roles[h.name] = "nat"
                links.append((h.name, "internet"))
            else:
                roles[h.name] = ("relay" if h.name.startswith("relay") else
                                 "control" if h.name.startswith("control") else "node")
                links.append((h.name, h.nat.name if h.nat else "internet"))
        return links, roles

    def plot(self, paths: Sequence[tuple[str, str, str, float | None]] = ()) -> object:
        """A topology picture (needs the ``plot`` extra); ``paths`` adds peer edges."""
        from wgmesh.display import plot_topology

        links, roles = self.topology()
        return plot_topology(links, roles, paths, title=f"lab {self.prefix}")

    def __repr__(self) -> str:
        return f"<Lab {self.prefix}: {', '.join(self.hosts) or 'empty'}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{h.name}</td><td>{getattr(h, 'spec', 'none') if h.nat is None else 'lan'}"
            f"</td><td>{h.ip}</td><td>{h.nat.name if h.nat else ''}</td></tr>"
            for h in self.hosts.values())
        return (f"<b>Lab {self.prefix}</b><table><tr><th>host</th><th>role</th><th>ip</th>"
                f"<th>behind</th></tr>{rows}</table>")


def _delete_namespace(ns: str) -> None:
    pids = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
                alive.append(pid)
        if not alive:
            break
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(_alive(int(p)) for p in alive):
            time.sleep(0.02)
        pids = alive
    _sh(["ip", "netns", "del", ns], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def list_namespaces() -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def clean_leftovers(all_labs: bool = False) -> list[str]:
    """Delete namespaces of labs whose owner process is gone (or every lab with ``all_labs``).

    Returns the namespaces removed.
    """
    removed: list[str] = []
    for ns in list_namespaces():
        m = NS_RE.match(ns)
        if not m:
            continue
        prefix = m.group(1)
        owner = STATE_DIR / prefix
        if not all_labs and owner.exists():
            with contextlib.suppress(ValueError):
                if _alive(int(owner.read_text())):
                    continue
        _delete_namespace(ns)
        removed.append(ns)
    if STATE_DIR.exists():
        left = list_namespaces()
        for f in STATE_DIR.iterdir():
            prefix = f.name.removesuffix(".d")
            if PREFIX_RE.match(prefix) and not any(n.startswith(prefix + "-") for n in left):
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
    return removed
