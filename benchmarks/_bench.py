"""What every benchmark here shares: the machine's load, ABBA rounds, ratios and one JSON line.

Why: this machine's two cores are shared, so a figure means little without the
load it was taken under, and a ratio means little unless both sides saw the
same load. Rounds therefore run in ABBA order (A B, B A, A B, ...): slow drift
hits both sides alike and neither always goes first. The headline ratio is the
median of per-round ratios (a round's two runs are adjacent in time), never
best against best, and the spread of those ratios is reported next to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from wgmesh.lab.network import Host, Lab, Process

T = TypeVar("T")
#: Default socket buffers for runs with a wireguard-go tunnel (see ``socket_buffers``): what
#: wgmesh's userspace device forces for itself (``userspace.SOCKET_BUFFER``).
WG_SOCKET_BUFFERS = 4 << 20
P99_MIN_SAMPLES = 100  # fewer samples than this and "p99" would just be the maximum


def load() -> list[float]:
    """1-, 5- and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


class Report:
    """One benchmark run: the load is read when it starts and when it prints its line."""

    def __init__(self) -> None:
        self.load_start = load()

    def emit(self, fields: dict[str, Any]) -> None:
        """Print the run's single JSON line, with ``load_start`` and ``load_end``."""
        print(json.dumps({**fields, "load_start": self.load_start, "load_end": load()}),
              flush=True)


def run_abba(rounds: int, *arms: Callable[[], T]) -> tuple[list[T], ...]:
    """Run each arm once per round, in the order given on even rounds and reversed on odd
    ones (a b, b a, ...; a b c, c b a, ...); each arm's results by round, so the i-th result
    of every arm was taken in the same round, back to back."""
    results: tuple[list[T], ...] = tuple([] for _ in arms)
    for n in range(rounds):
        for side in range(len(arms)) if n % 2 == 0 else reversed(range(len(arms))):
            results[side].append(arms[side]())
    return results


def spread(xs: Sequence[float], digits: int = 3) -> list[float]:
    """[min, max] of the runs or rounds behind a median."""
    return [round(min(xs), digits), round(max(xs), digits)]


def round_ratios(num: Sequence[float], den: Sequence[float], key: str = "ratio") -> dict[str, Any]:
    """Median of per-round ratios num/den as ``key``, each round's ratio and their spread."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    prefix = key.removesuffix("ratio")
    return {key: round(statistics.median(ratios), 3),
            f"{prefix}round_ratios": [round(r, 3) for r in ratios],
            f"{prefix}ratio_spread": spread(ratios)}


def tail(xs: Sequence[float], prefix: str = "") -> dict[str, Any]:
    """p50 and p99 of latencies in seconds; with fewer than 100 samples a p99 would be the
    maximum in disguise, so the maximum is reported as such (``max_s``) instead."""
    if not xs:
        return {f"{prefix}p50_s": None, f"{prefix}samples": 0}
    s = sorted(xs)
    out: dict[str, Any] = {f"{prefix}p50_s": round(s[len(s) // 2], 4),
                           f"{prefix}samples": len(s)}
    if len(s) >= P99_MIN_SAMPLES:
        out[f"{prefix}p99_s"] = round(s[min(len(s) - 1, int(0.99 * len(s)))], 4)
    else:
        out[f"{prefix}max_s"] = round(s[-1], 4)
    return out


def last_json(p: Process) -> dict[str, Any]:
    """The last line a role process printed, as JSON; a role that printed something else
    last fails the run with what it printed, not a bare decode error."""
    out = p.stdout.strip()
    try:
        line: dict[str, Any] = json.loads(out.splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"{shlex.join(p.argv)} printed no JSON line last:\n{out[-2000:]}\n"
                         f"stderr: {p.stderr[-2000:]}") from None
    return line


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (after the command name, which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu_user_sys(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far."""
    fields = _stat(pid)
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    return sum(proc_cpu_user_sys(pid))


def proc_usage(pid: int) -> tuple[float, float, int]:
    """CPU seconds (user + system), system seconds and minor page faults of process
    ``pid`` so far, from one read of /proc/PID/stat."""
    fields = _stat(pid)
    tick = os.sysconf("SC_CLK_TCK")
    user, sys_ = int(fields[11]) / tick, int(fields[12]) / tick
    return user + sys_, sys_, int(fields[7])


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle so far (/proc/stat: everything but idle and
    iowait), to tell a run that had the machine to itself from one that shared it."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB."""
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return round(int(m.group(1)) / 1024, 1) if m else float("nan")


def iperf_mbps(lab: Lab, client: Host, server: Host, ip: str, seconds: float) -> float:
    """Mbit/s that ``server`` (listening on ``ip``) received in one iperf3 TCP run from
    ``client``."""
    srv = lab.spawn(server, ["iperf3", "-s", "-1", "--forceflush", "-B", ip])
    try:
        srv.wait_for_output("Server listening", timeout=60)
        out = lab.run(client, ["iperf3", "-c", ip, "-t", str(seconds), "-J"],
                      timeout=seconds + 60).stdout
    finally:
        srv.stop()
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6


def run_in_vm(script: str, args: Sequence[str], report: Report, name: str,
              timeout: float = 1200) -> int:
    """Boot one virtme-ng VM (the kernel test tier's kernel, no KVM) and run ``script
    args`` inside it with this checkout; print its JSON line with the host's load (the
    VM's own as ``vm_load_start``/``vm_load_end``). The host kernel has no WireGuard."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests" / "support"))
    from vmtier import find_kernel

    kernel = find_kernel()
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    if kernel is None or not Path(vng).exists():
        report.emit({"benchmark": name, "error": "need vng and a /boot kernel with the "
                     "wireguard module"})
        return 1
    rw = Path(tempfile.mkdtemp(prefix="wgmesh-bench-"))
    print(f"booting the VM; progress in {rw / 'err'}", file=sys.stderr, flush=True)
    try:
        out = rw / "result.json"
        script_sh = rw / "run.sh"
        bindir = shlex.quote(str(Path(sys.executable).parent))
        script_sh.write_text(
            "modprobe wireguard; modprobe tun\n"
            f"cd {shlex.quote(str(root))}\n"
            f"export WGMESH_IN_VM=1 WGMESH_TIME_SCALE=6 PYTHONDONTWRITEBYTECODE=1 "
            f"PYTHONPATH={shlex.quote(str(root / 'src'))} PATH={bindir}:$PATH\n"
            f"{shlex.quote(sys.executable)} {shlex.quote(script)} "
            f"{' '.join(shlex.quote(a) for a in args)} > {out} 2> {rw / 'err'}\n")
        argv = [vng, "--disable-kvm", "-r", kernel[0], "--memory", "4G", "--cpus", "2",
                "--rwdir", str(rw), "--exec", f"sh {script_sh}"]
        env = {**os.environ, "PATH": f"{Path(vng).parent}:{os.environ.get('PATH', '')}"}
        subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, cwd=rw, env=env,
                       timeout=timeout)
        lines = out.read_text().strip().splitlines() if out.exists() else []
        if not lines:
            err = (rw / "err").read_text()[-2000:] if (rw / "err").exists() else "no output"
            report.emit({"benchmark": name, "error": err})
            return 1
        result = json.loads(lines[-1])
        result["vm_load_start"], result["vm_load_end"] = (result.pop("load_start"),
                                                          result.pop("load_end"))
        report.emit(result)
        return 0
    finally:
        shutil.rmtree(rw, ignore_errors=True)


@contextlib.contextmanager
def socket_buffers(size: int) -> Iterator[None]:
    """Default UDP socket buffers of ``size`` on this host for the run, restored after.

    wgmesh's device and current wireguard-go (since v0.0.20230223) size their own
    buffers (4 and 7 MiB, ``SO_RCVBUFFORCE``); Debian's older wireguard-go keeps the
    default 208 KiB and then drops datagrams (``UdpRcvbufErrors``: 14 % of them at
    360 Mbit/s here), which TCP through the tunnel pays for in retransmits. Raising
    the default gives it the buffers its current release takes for itself. The
    setting is global: it cannot be set per network namespace.
    """
    keys = ("net.core.rmem_default", "net.core.wmem_default")
    before = {k: Path("/proc/sys", *k.split(".")).read_text().strip() for k in keys}
    try:
        for k in keys:
            Path("/proc/sys", *k.split(".")).write_text(str(size))
        yield
    finally:
        for k, v in before.items():
            Path("/proc/sys", *k.split(".")).write_text(v)
