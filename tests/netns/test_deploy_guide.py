"""docs/deploy.md, executed as written: its marked blocks run in lab namespaces standing in
for the machines, so a change to the guide that breaks the deployment fails here.

The guide's last section ("How this guide is tested") documents the markers and the only
substitutions made: the variables block gets lab addresses, and a few absolute path
prefixes (/etc/wgmesh, /var/lib/wgmesh, ...) get a per-machine scratch directory in front.
"""

from __future__ import annotations

import contextlib
import glob
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import wait_for
from systools import need

from wgmesh.lab.network import Host, Lab, Process

pytestmark = pytest.mark.netns

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
WGMESH = str(Path(sys.executable).parent / "wgmesh")
MARKER = re.compile(r"^<!-- deploy:(\S+)((?: \S+)*) -->$")
#: Absolute paths the guide uses that get a per-machine scratch directory in front.
MOVED = re.compile(r"(?<![\w./])(/etc/default/wgmesh|/etc/wgmesh|/var/lib/wgmesh"
                   r"|/var/backups/wgmesh|/run/wgmesh)(?![\w.])")
#: The placeholders of the guide's variables block, and nothing else, get lab values.
PLACEHOLDERS = ("CONTROL_IP", "RELAY_IP", "NODE_NAME", "CONTROL2_IP", "DB_URL")


@dataclass(frozen=True)
class Step:
    """One marked part of the guide: ``kind`` is vars, run, unit, start or copy."""

    kind: str
    machines: tuple[str, ...]
    tags: frozenset[str]
    body: str = ""
    unit: str = ""


def parse_guide(text: str) -> list[Step]:
    """The marked steps in document order; a marker is followed by a fenced block (but for
    ``start UNIT``, which names a unit shown earlier)."""
    lines = text.splitlines()
    steps = []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        target, words = m.group(1), m.group(2).split()
        if "start" in words:
            unit = words[words.index("start") + 1]
            steps.append(Step("start", tuple(target.split(",")),
                              frozenset(words) - {"start", unit}, unit=unit))
            continue
        assert lines[i + 1].startswith("```"), f"deploy.md:{i + 1}: marker without a block"
        end = lines.index("```", i + 2)
        body = "\n".join(lines[i + 2:end]) + "\n"
        if target in ("vars", "copy"):
            steps.append(Step(target, (), frozenset(words), body))
        elif "unit" in words:
            unit = body.splitlines()[0].removeprefix("# ").rsplit("/", 1)[-1]
            steps.append(Step("unit", tuple(target.split(",")), frozenset(words) - {"unit"},
                              body, unit))
        else:
            steps.append(Step("run", tuple(target.split(",")), frozenset(words), body))
    return steps


def set_placeholders(block: str, values: dict[str, str]) -> str:
    """The variables block with each placeholder's line given its lab value."""
    out = block
    for name in PLACEHOLDERS:
        out, n = re.subn(rf"^{name}=.*$", f"{name}={shlex.quote(values[name])}", out,
                         flags=re.M)
        assert n == 1, f"the guide's variables block must set {name} once"
    return out


def environment_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd reads them (quotes around a value removed)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            env[key.strip()] = value
    return env


def exec_start(unit: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd expands it: ``$VAR`` alone is split at whitespace
    (no word if empty), ``${VAR}`` is one word."""
    line = next(v for k, _, v in (x.partition("=") for x in unit.splitlines())
                if k == "ExecStart")
    argv: list[str] = []
    for word in shlex.split(line):
        if (m := re.fullmatch(r"\$(\w+)", word)):
            argv += env.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


class Machines:
    """Lab hosts standing in for the guide's machines, each with its own scratch root."""

    def __init__(self, lab: Lab, base: Path, hosts: dict[str, Host], values: dict[str, str]
                 ) -> None:
        self.lab, self.base, self.hosts, self.values = lab, base, hosts, values
        self.units: dict[str, str] = {}
        self.procs: dict[tuple[str, str], Process] = {}
        for name in hosts:
            for d in ("etc/default", "var/lib", "var/backups", "run"):
                (self.root(name) / d).mkdir(parents=True, exist_ok=True)

    def root(self, machine: str) -> Path:
        return self.base / machine

    def moved(self, machine: str, text: str) -> str:
        root = str(self.root(machine))
        return MOVED.sub(lambda m: root + m.group(1), text).replace("/usr/local/bin/wgmesh",
                                                                    WGMESH)

    def env(self, machine: str) -> dict[str, str]:
        return {"PATH": f"{Path(WGMESH).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
                "WGMESH_SOCKET": f"{self.root(machine)}/run/wgmesh/wgmesh.sock"}

    def run(self, machine: str, block: str, variables: str) -> subprocess.CompletedProcess[str]:
        values = {**self.values, "NODE_NAME": machine}
        script = (f"cd {shlex.quote(str(self.root(machine)))}\n"
                  + self.moved(machine, set_placeholders(variables, values) + block))
        env = [f"{k}={v}" for k, v in self.env(machine).items()]
        return self.lab.run(self.hosts[machine], ["env", *env, "bash", "-eu", "-o", "pipefail",
                                                  "-c", script], check=False, timeout=120)

    def copy(self, spec: str) -> None:
        for line in filter(str.strip, spec.splitlines()):
            src, dsts = (s.strip() for s in line.split("->"))
            src_machine, src_path = src.split(":", 1)
            machines, dst_path = dsts.split(":", 1)
            for m in machines.split(","):
                dst = Path(self.moved(m, dst_path))
                dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.copy2(self.moved(src_machine, src_path), dst)

    def start(self, machine: str, unit_name: str) -> None:
        """Run the unit's ExecStart on ``machine``; ready once it prints its first line."""
        unit = self.moved(machine, self.units[unit_name])
        env: dict[str, str] = {}
        for key, _, value in (x.partition("=") for x in unit.splitlines()):
            if key == "EnvironmentFile" and Path(value.lstrip("-")).exists():
                env.update(environment_file(Path(value.lstrip("-"))))
            elif key in ("StateDirectory", "RuntimeDirectory"):
                top = "var/lib" if key == "StateDirectory" else "run"
                (self.root(machine) / top / value).mkdir(mode=0o700, exist_ok=True)
        proc = self.lab.spawn(self.hosts[machine], exec_start(unit, env), env=self.env(machine))
        self.procs[machine, unit_name] = proc

        def ready() -> bool:
            assert proc.poll() is None, f"{unit_name} on {machine} exited: {proc.stderr[-3000:]}"
            return bool(proc.stdout.strip())
        wait_for(ready, 60, f"{unit_name} on {machine} to start")

    def diagnostics(self) -> str:
        return "\n".join(f"--- {m} {u} (exit {p.poll()}):\n{p.stdout[-1500:]}{p.stderr[-3000:]}"
                         for (m, u), p in self.procs.items())


def run_check(machines: Machines, machine: str, block: str, variables: str) -> str:
    """Run a check block until it passes (the mesh settles meanwhile); its output."""
    last: list[subprocess.CompletedProcess[str]] = []

    def passes() -> bool:
        last[:] = [machines.run(machine, block, variables)]
        return last[0].returncode == 0
    wait_for(passes, 90, lambda: f"the check on {machine} to pass:\n{block}{last[0].stdout}"
             f"{last[0].stderr}\n{machines.diagnostics()}", interval=1)
    return last[0].stdout


def run_guide(machines: Machines, scenario: str) -> dict[str, str]:
    """Every step of ``scenario`` (sqlite or pg) in document order; the check blocks'
    output by machine."""
    steps = [s for s in parse_guide(GUIDE.read_text())
             if not (s.tags & {"pg", "sqlite"}) or scenario in s.tags]
    variables = next(s.body for s in steps if s.kind == "vars")
    checks: dict[str, str] = {}
    for step in steps:
        if step.kind == "copy":
            machines.copy(step.body)
        elif step.kind == "unit":
            machines.units[step.unit] = step.body
        for m in step.machines:
            if step.kind in ("unit", "start"):
                machines.start(m, step.unit)
            elif step.kind == "run" and "check" in step.tags:
                checks[m] = run_check(machines, m, step.body, variables)
            elif step.kind == "run":
                cp = machines.run(m, step.body, variables)
                assert cp.returncode == 0, (f"on {m}:\n{step.body}\nexit {cp.returncode}\n"
                                            f"{cp.stdout}{cp.stderr}\n{machines.diagnostics()}")
    return checks


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """Short (unix socket paths are limited to 107 bytes) and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="wgd"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def deployment(lab: Lab, *extra: str) -> dict[str, Host]:
    """Public servers; the nodes behind symmetric NATs, so that they reach each other only
    through the relay, and the guide's relay map (with its pinned key) is what carries them."""
    hosts = {name: lab.add_public_host(name) for name in ("control", "relay", *extra)}
    for name in ("node1", "node2"):
        hosts[name] = lab.add_node_host(name, "symmetric")
    return hosts


def test_guide_deploys_a_mesh_whose_nodes_reach_each_other(lab: Lab) -> None:
    need("openssl"), need("wg"), need("sqlite3")
    hosts = deployment(lab)
    values = {"CONTROL_IP": hosts["control"].ip, "RELAY_IP": hosts["relay"].ip,
              "CONTROL2_IP": "unused", "DB_URL": "unused"}
    with scratch() as base:
        checks = run_guide(Machines(lab, base, hosts, values), "sqlite")
        assert set(checks) == {"node1", "node2"}
        assert "node2" in checks["node1"] and "node1" in checks["node2"]
        assert "pong from node2" in checks["node1"]
        assert "via relay region 1" in checks["node1"], checks["node1"]
        assert (base / "control/var/backups/wgmesh/control.db").stat().st_size > 0


def unit_settings(unit: str) -> list[str]:
    return [x for x in unit.splitlines() if x and not x.startswith("#")]


def test_agent_unit_in_the_guide_is_the_example_unit() -> None:
    """examples/wgmesh.service is the guide's agent unit plus install notes (comments)."""
    unit = next(s.body for s in parse_guide(GUIDE.read_text()) if s.unit == "wgmesh.service")
    example = (GUIDE.parents[1] / "examples" / "wgmesh.service").read_text()
    assert unit_settings(unit) == unit_settings(example)


@contextlib.contextmanager
def postgres(lab: Lab, host: Host) -> Iterator[str]:
    """A throwaway PostgreSQL server on ``host``'s lab address (trust auth: only lab
    namespaces reach it), started as scripts/start-postgres.sh starts one on loopback."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if not bins or subprocess.run(["id", "postgres"], capture_output=True).returncode:
        pytest.skip("no PostgreSQL server (scripts/setup-debian.sh installs postgresql)")
    bindir = Path(bins[-1]).parent
    as_pg = ["runuser", "-u", "postgres", "--"]
    with scratch() as base:
        shutil.chown(base, "postgres")
        data = base / "data"
        lab.run(host, [*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                       "-A", "trust", "--no-sync"], timeout=120)
        with (data / "pg_hba.conf").open("a") as f:
            f.write(f"host all all {host.ip.rsplit('.', 1)[0]}.0/24 trust\n")
        pg_ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(data)]
        try:
            lab.run(host, [*pg_ctl, "-l", str(base / "server.log"), "-w", "-o",
                           f"-c listen_addresses={host.ip} -k {base} -c fsync=off", "start"])
            lab.run(host, [*as_pg, str(bindir / "createdb"), "-h", host.ip, "-U", "postgres",
                           "wgmesh"])
            yield f"postgresql://postgres@{host.ip}:5432/wgmesh"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60)


def test_guide_postgres_two_replicas(lab: Lab) -> None:
    need("openssl"), need("wg")
    hosts = deployment(lab, "control2", "db")
    with postgres(lab, hosts.pop("db")) as dsn, scratch() as base:
        values = {"CONTROL_IP": hosts["control"].ip, "RELAY_IP": hosts["relay"].ip,
                  "CONTROL2_IP": hosts["control2"].ip, "DB_URL": dsn}
        checks = run_guide(Machines(lab, base, hosts, values), "pg")
        # The second replica lists the nodes that registered through the first.
        assert "node1" in checks["control2"] and "node2" in checks["control2"]
