"""The package's shape, checked: sans-I/O cores stay pure, arrows point down, no cycles.

Static (AST) checks over ``src/wgmesh``: every import statement counts, including the
lazy ones inside functions, except those under ``if TYPE_CHECKING:``, which cost nothing
at run time. Rules from docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "wgmesh"

#: sans-I/O cores: bytes, events and a clock in; bytes and actions out.
CORES = ["wgmesh.netmap", "wgmesh.traversal", "wgmesh.pmtu", "wgmesh.relay", "wgmesh.stun",
         "wgmesh.disco", "wgmesh.wireguard.noise", "wgmesh.wireguard.session", "wgmesh.wireguard.filter",
         "wgmesh.control.world", "wgmesh.control.policy", "wgmesh.drop.protocol", "wgmesh.lock",
         "wgmesh.portmap", "wgmesh.control.envelope", "wgmesh.control.routes"]
IO_MODULES = {"asyncio", "socket", "subprocess", "threading", "selectors", "select"}
CLOCK_READS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
               ("time", "time_ns"), ("time", "monotonic_ns"), ("datetime", "now"),
               ("datetime", "utcnow"), ("date", "today")}
#: The product: none of it may import the lab or the CLI.
PRODUCT = ("wgmesh.node", "wgmesh.control", "wgmesh.relaynet", "wgmesh.wireguard",
           "wgmesh.drop", "wgmesh.relay", "wgmesh.netmap", "wgmesh.traversal", "wgmesh.pmtu",
           "wgmesh.stun", "wgmesh.disco", "wgmesh.keys", "wgmesh.errors", "wgmesh.display", "wgmesh.lock",
           "wgmesh.portmap", "wgmesh.urls",
           "wgmesh.loopthread")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def imports(mod: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every run-time import statement of ``mod``."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                sub = f"{base}.{a.name}"
                yield (sub if sub in MODULES else base), node.lineno


def _within(name: str, roots: tuple[str, ...] | list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("core", CORES)
def test_cores_do_no_io_and_read_no_clock(core: str) -> None:
    assert core in MODULES, core
    bad = [f"line {ln}: imports {name}" for name, ln in imports(core)
           if name.split(".")[0] in IO_MODULES]
    tree = ast.parse(MODULES[core].read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in CLOCK_READS):
            bad.append(f"line {node.lineno}: reads the clock ({node.value.id}.{node.attr})")
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            for a in node.names:
                if (node.module, a.name) in CLOCK_READS:
                    bad.append(f"line {node.lineno}: imports {node.module}.{a.name}")
    assert not bad, f"{core} must stay sans-I/O (time comes in as an argument): {bad}"


def loaded(mod: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` importing ``mod`` loads, in a fresh interpreter."""
    code = f"import sys, {mod}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.parametrize("core", CORES)
def test_cores_pull_in_no_drivers(core: str) -> None:
    """Importing a core in a fresh interpreter loads no asyncio, sockets, node or lab."""
    out = loaded(core, ("asyncio", "socket", "subprocess", "aiohttp", "pyroute2", "requests",
                        "wgmesh.node", "wgmesh.lab", "wgmesh.cli", "wgmesh.relaynet"))
    assert out == [], f"import {core} loads {out}"


@pytest.mark.parametrize("mod", ["wgmesh", "wgmesh.stun"])
def test_import_wgmesh_and_stun_stay_light(mod: str) -> None:
    out = loaded(mod, ("nacl", "asyncio", "aiohttp", "pyroute2", "wgmesh.node", "wgmesh.lab",
                       "wgmesh.relaynet", "wgmesh.control"))
    assert out == [], f"import {mod} loads {out}"


def test_product_never_imports_lab_or_cli() -> None:
    bad = [f"{mod}:{ln} imports {name}"
           for mod in MODULES if _within(mod, PRODUCT)
           for name, ln in imports(mod) if _within(name, ("wgmesh.lab", "wgmesh.cli"))]
    assert not bad, bad


def test_only_the_cli_imports_the_cli() -> None:
    bad = [f"{mod}:{ln} imports {name}" for mod in MODULES
           if not _within(mod, ("wgmesh.cli",)) and mod != "wgmesh.__main__"
           for name, ln in imports(mod) if _within(name, ("wgmesh.cli",))]
    assert not bad, bad


def test_control_and_relay_never_touch_the_data_plane() -> None:
    servers = ("wgmesh.control", "wgmesh.relaynet", "wgmesh.relay")
    bad = [f"{mod}:{ln} imports {name}" for mod in MODULES if _within(mod, servers)
           for name, ln in imports(mod)
           if _within(name, ("wgmesh.wireguard", "wgmesh.node", "wgmesh.drop"))
           or (_within(mod, ("wgmesh.relaynet", "wgmesh.relay"))
               and _within(name, ("wgmesh.control",)))]
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph = {m: sorted({n for n, _ in imports(m) if n in MODULES and n != m}) for m in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
