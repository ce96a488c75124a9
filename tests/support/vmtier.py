"""The ``kernel`` tier: every kernel-marked test runs inside ONE virtme-ng VM.

The host kernel has no WireGuard module, so on the host each selected
``kernel`` test is replaced by a stand-in item, ordered after the host tiers. The
first stand-in boots the VMs (Debian's linux-image-amd64 under qemu,
``--disable-kvm``), which see the host filesystem, run ``pytest`` on their share
of the kernel tests with this checkout and venv, and write a JSON result per test
into a shared directory. They boot only then, not alongside the host tiers:
booted early at nice 19 they starved while host tests ran, and the guest clock
runs on regardless, so in-VM timeouts fired (two kernel tests failed that way in
one full run); unniced, they would eat the host lab tests' timing budgets. Each stand-in then
reports its own test's outcome, so the host run shows per-test pass/fail, the
VM's counts are printed, and a VM that fails to boot fails every kernel test.

Inside the VM (``WGMESH_IN_VM=1``) the tests simply run, and this plugin
records their outcomes.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

IN_VM = os.environ.get("WGMESH_IN_VM") == "1"
# The kernel tier's hard limit; its budget is half of it, so a slower day stays green.
#: Per VM. The kernel tier must finish in half of it (the summary says when it does not).
VM_TIMEOUT = float(os.environ.get("WGMESH_VM_TIMEOUT", "3000"))
#: Kernel test modules are shared out over this many VMs, booted together after the host
#: tiers: much of a kernel test is waiting (WireGuard's unscalable rekey timers,
#: handshakes, agents starting under emulation), so two VMs overlap one's waits with the
#: other's work.
VM_SHARDS = max(1, int(os.environ.get("WGMESH_VM_SHARDS", "2")))
#: A module's estimated seconds in the VM (its ``VM_COST_S``, else this), for balancing.
DEFAULT_VM_COST_S = 60.0
VM_RESULTS = os.environ.get("WGMESH_VM_RESULTS")


def find_kernel() -> tuple[str, str] | None:
    """A /boot kernel whose module tree has WireGuard: (vmlinuz path, release)."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = path.split("vmlinuz-", 1)[1]
        if glob.glob(f"/lib/modules/{release}/kernel/drivers/net/wireguard/wireguard.ko*"):
            return path, release
    return None


def _host_has_kernel_wg() -> bool:
    from wgmesh.wireguard.backend import kernel_wireguard_available

    return os.geteuid() == 0 and kernel_wireguard_available()[0]


_runners: list[VMRunner] = []
_live_vms: set[int] = set()


@atexit.register
def _kill_live_vms() -> None:
    """An interrupted host run must not leave a VM behind."""
    for pgid in list(_live_vms):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def vm_skip_reason() -> str | None:
    """Why no VM can boot here, or None."""
    if os.geteuid() != 0:
        return "kernel tier needs root to boot the VM"
    if shutil.which("vng") is None and not (Path(sys.executable).parent / "vng").exists():
        return "virtme-ng (vng) not installed: pip install -e '.[test]'"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86 not installed (scripts/setup-debian.sh)"
    if find_kernel() is None:
        return "no /boot kernel with a WireGuard module (apt-get install linux-image-amd64)"
    return None


class VMTestFailed(Exception):
    pass


class VMRunner:
    """Boots the VM once for all kernel tests and holds their results."""

    def __init__(self, config: pytest.Config, nodeids: list[str], name: str = "VM") -> None:
        self.config = config
        self.nodeids = nodeids
        self.name = name
        self.results: dict[str, dict[str, Any]] | None = None
        self.error: str | None = None
        self.summary: str | None = None
        self._thread: threading.Thread | None = None
        _runners.append(self)

    def run(self) -> None:
        kernel = find_kernel()
        assert kernel is not None
        vmlinuz, _release = kernel
        rw = Path(tempfile.mkdtemp(prefix="wgmesh-vm-"))
        results = rw / "results.json"
        out = rw / "pytest.out"
        root = str(self.config.rootpath)
        script = rw / "run.sh"
        soak = "--soak " if self.config.getoption("soak") else ""
        script.write_text(
            "#!/bin/sh\n"
            "modprobe wireguard; modprobe tun\n"
            f"cd {shlex.quote(root)}\n"
            f"export WGMESH_IN_VM=1 WGMESH_TIME_SCALE=6 WGMESH_VM_RESULTS={shlex.quote(str(results))}"
            " PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"
            # a worktree's src/ (PYTHONPATH=...) is the code under test in the VM too
            f" PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} PATH="
            f"{shlex.quote(str(Path(sys.executable).parent))}:$PATH\n"
            f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -q -rA {soak}"
            f"{' '.join(shlex.quote(n) for n in self.nodeids)} > {shlex.quote(str(out))} 2>&1\n"
            f"echo $? > {shlex.quote(str(rw / 'rc'))}\n")
        vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
        argv = [vng, "--disable-kvm", "-r", vmlinuz, "--memory", "4G",
                "--cpus", "2", "--rwdir", str(rw), "--exec", f"sh {script}"]
        if os.environ.get("WGMESH_VM_KVM") == "1":
            argv.remove("--disable-kvm")
        started = time.monotonic()
        proc: subprocess.Popen[str] | None = None
        try:
            env = {**os.environ,
                   "PATH": f"{Path(vng).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
            # Own session: on a timeout the whole tree goes, qemu included (it is vng's
            # grandchild and would otherwise run on, eating a core).
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, stdin=subprocess.DEVNULL, cwd=str(rw), env=env,
                                    start_new_session=True)
            _live_vms.add(proc.pid)
            try:
                out_text, _ = proc.communicate(timeout=VM_TIMEOUT)
                boot_log = out_text[-3000:]
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                boot_log = f"VM timed out after {VM_TIMEOUT:.0f}s"
        finally:
            if proc is not None:
                _live_vms.discard(proc.pid)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        inner = out.read_text(errors="replace") if out.exists() else ""
        if keep := os.environ.get("WGMESH_VM_OUTPUT"):  # the VMs' pytest output, prints too
            with open(keep, "a") as f:
                f.write(f"--- {self.name} ---\n{inner}")
        if results.exists():
            self.results = json.loads(results.read_text())
        else:
            self.error = (f"the VM produced no results.\n--- VM ---\n{boot_log}\n"
                          f"--- pytest in VM ---\n{inner[-5000:]}")
        counts: dict[str, int] = {}
        for r in (self.results or {}).values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"
        slow = sorted(((r.get("duration", 0), n) for n, r in (self.results or {}).items()),
                      reverse=True)
        took = time.monotonic() - started
        budget = "" if took <= VM_TIMEOUT / 2 else " - OVER BUDGET (half the timeout)"
        self.summary = (f"{self.name}: {os.path.basename(vmlinuz)} under virtme-ng, "
                        f"{len(self.nodeids)} "
                        f"test(s), {took:.0f}s of its {VM_TIMEOUT:.0f}s timeout{budget}: "
                        f"{summary}\n"
                        + "\n".join(f"  {d:6.1f}s {n}" for d, n in slow))
        shutil.rmtree(rw, ignore_errors=True)

    def start_background(self) -> None:
        """Boot the VM now, on a thread, so the other VMs boot alongside it."""
        self._thread = threading.Thread(target=self._run_safely, name="wgmesh-vm", daemon=True)
        self._thread.start()

    def _run_safely(self) -> None:
        try:
            self.run()
        except Exception as e:  # reported by every kernel test, never lost
            self.error = f"the VM runner crashed: {e!r}"

    def result(self, nodeid: str) -> dict[str, Any]:
        for runner in _runners:  # the first stand-in boots every VM (the host tiers are done)
            if runner._thread is None:
                runner.start_background()
        assert self._thread is not None
        self._thread.join()
        if self.error is not None:
            raise VMTestFailed(self.error)
        assert self.results is not None
        if nodeid not in self.results:
            raise VMTestFailed(f"{nodeid} did not run in the VM")
        return self.results[nodeid]


class VMItem(pytest.Item):
    """Stands in on the host for a kernel test that really runs in the VM."""

    def __init__(self, *, runner: VMRunner, target: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.runner = runner
        self.target = target

    def runtest(self) -> None:
        r = self.runner.result(self.target)
        if r["outcome"] == "skipped":
            pytest.skip(f"[in VM] {r['longrepr']}")
        if r["outcome"] != "passed":
            raise VMTestFailed(r["longrepr"])

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, VMTestFailed):
            return f"[in VM] {excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"[vm] {self.name}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    # already skipped (a soak test without --soak): reported skipped here, not run in the VM
    kernel_items = [i for i in items
                    if i.get_closest_marker("kernel") and not i.get_closest_marker("skip")]
    if not kernel_items or _host_has_kernel_wg():
        return
    reason = vm_skip_reason()
    if reason:
        for item in kernel_items:
            item.add_marker(pytest.mark.skip(reason=reason))
        return
    shards = _shards(kernel_items, VM_SHARDS)
    runners = [VMRunner(config, [i.nodeid for i in shard], f"VM {n}/{len(shards)}")
               for n, shard in enumerate(shards, 1)]
    stand_ins: list[pytest.Item] = []
    for runner, shard in zip(runners, shards, strict=True):
        for item in shard:
            assert item.parent is not None  # a test function always has its module
            stand_in = VMItem.from_parent(item.parent, name=item.name, runner=runner,
                                          target=item.nodeid)
            stand_in.own_markers.extend(item.own_markers)
            stand_ins.append(stand_in)
    # last: the VMs boot when the first stand-in runs, once the host tiers are done
    items[:] = [i for i in items if i not in kernel_items] + stand_ins


def _shards(items: list[pytest.Item], n: int) -> list[list[pytest.Item]]:
    """Whole modules (they share labs and fixtures) over ``n`` VMs, largest first onto the
    least loaded (LPT), by each module's ``VM_COST_S``."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)

    def cost(path: str) -> float:
        mod = getattr(modules[path][0], "module", None)
        return float(getattr(mod, "VM_COST_S", DEFAULT_VM_COST_S))

    loads = [0.0] * min(n, len(modules))
    shards: list[list[pytest.Item]] = [[] for _ in loads]
    for path in sorted(modules, key=cost, reverse=True):
        k = loads.index(min(loads))
        loads[k] += cost(path)
        shards[k].extend(modules[path])
    return shards


_vm_results: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not (IN_VM and VM_RESULTS):
        return
    if report.when == "call" or report.outcome != "passed":
        prev = _vm_results.get(report.nodeid)
        if prev and prev["outcome"] == "failed":
            return  # keep the first failure (e.g. setup) over a later teardown pass
        if report.skipped and isinstance(report.longrepr, tuple):
            text = report.longrepr[2]
        else:
            text = str(report.longrepr or "")
        _vm_results[report.nodeid] = {"outcome": report.outcome, "longrepr": text[-6000:],
                                      "duration": round(report.duration, 1)}


def pytest_sessionfinish(session: pytest.Session) -> None:
    if IN_VM and VM_RESULTS:
        Path(VM_RESULTS).write_text(json.dumps(_vm_results))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    done = [r for r in _runners if r.summary]
    if done:
        terminalreporter.write_sep("-", "kernel tier (VMs)")
    for runner in done:
        terminalreporter.write_line(runner.summary or "")
