"""Control-plane scale: how fast one change reaches every stream that should see it.

Runs a real ``wgmesh control serve`` process (SQLite by default, ``--postgres
DSN`` for PostgreSQL) with nodes seeded straight into its store, opens one real
HTTP netmap stream per simulated node from this asyncio process, waits for the
connection storm to settle, then changes one node's endpoints and times when
each recipient's stream holds the delta (the new endpoint's port is the marker).

Scenarios (one JSON line each):

* ``mesh``: N nodes, everyone sees everyone; node 1 changes; N-1 recipients.
* ``partitioned``: N nodes in groups of 100 plus one hub everyone sees; the hub
  changes (N recipients: ``p50_s``/``p99_s``), then a group member changes
  (its 99 group peers: ``group_p50_s``/``group_p99_s``).
* ``register``: registrations per second through the HTTP API (challenge, NaCl
  proof, auth key), and the time for a newly connected node to get its full map.

Reference run in the same invocation (what Headscale does per change): encode
every recipient's *full* map; ``full_map_bytes`` / ``bytes_per_recipient`` is
the ratio of bytes a rebuild-the-world design would send per change, and
``rebuild_cpu_s`` the CPU that encoding takes here. Latencies include this
client's own event-loop delay over thousands of streams, so they are upper
bounds. ``server_cpu_s`` is the server's CPU during the measured changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from wgmesh.control.store import open_store
from wgmesh.keys import PrivateKey

GROUP = 100


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 4) if xs else float("nan")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return round(int(m.group(1)) / 1024, 1) if m else float("nan")


class Streams:
    """N netmap streams in one event loop; records when each line with a marker arrives."""

    def __init__(self, url: str, tokens: list[str]) -> None:
        self.url, self.tokens = url, tokens
        self.first: dict[int, float] = {}
        self.first_bytes: dict[int, int] = {}
        self.last_data = time.monotonic()
        self.marker: bytes | None = None
        self.hits: dict[int, tuple[float, int]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.pending: set[int] = set()
        self.done = asyncio.Event()

    async def open(self, session: aiohttp.ClientSession, parallel: int = 200) -> None:
        sem = asyncio.Semaphore(parallel)
        opened = [asyncio.Event() for _ in self.tokens]
        for i, tok in enumerate(self.tokens):
            self.tasks.append(asyncio.create_task(self._run(session, i, tok, sem, opened[i])))
        await asyncio.gather(*(e.wait() for e in opened))

    async def _run(self, session: aiohttp.ClientSession, i: int, token: str,
                   sem: asyncio.Semaphore, opened: asyncio.Event) -> None:
        async with sem:
            t0 = time.monotonic()
            resp = await session.get(self.url + "/v1/netmap",
                                     headers={"Authorization": f"Bearer {token}"})
            parts: list[bytes] = []
            while i not in self.first:
                chunk = await resp.content.readany()
                if not chunk:
                    raise RuntimeError(f"stream {i} ended before its map")
                head, sep, rest = chunk.partition(b"\n")
                parts.append(head)
                if sep:
                    self.first[i] = time.monotonic() - t0
                    self.first_bytes[i] = sum(map(len, parts))
                    parts = [rest]
        opened.set()
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            self.last_data = now
            parts.append(chunk)
            if b"\n" not in chunk:
                continue
            *lines, tail = b"".join(parts).split(b"\n")
            parts = [tail]
            for line in lines:
                if self.marker is not None and self.marker in line and i not in self.hits:
                    self.hits[i] = (now, len(line) + 1)
                    self.pending.discard(i)
                    if not self.pending:
                        self.done.set()

    async def quiesce(self, session: aiohttp.ClientSession, admin_key: str,
                      idle_s: float = 1.0, timeout: float = 900) -> None:
        """Wait until the server has applied and sent everything (its counters stand still)."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            async with session.get(self.url + "/v1/admin/stats",
                                   headers={"Authorization": f"Bearer {admin_key}"}) as r:
                st = await r.json()
            now = (st["seq"], st["lines"])
            if now != last:
                last, since = now, time.monotonic()
            elif (time.monotonic() - since > idle_s
                  and time.monotonic() - self.last_data > idle_s):
                return
            await asyncio.sleep(0.2)

    async def measure(self, session: aiohttp.ClientSession, changer_token: str,
                      recipients: set[int], port: int, timeout: float = 60) -> tuple[list[float],
                                                                                  list[int]]:
        self.hits.clear()
        self.pending, self.done = set(recipients), asyncio.Event()
        self.marker = b'"port":%d,' % port
        t0 = time.monotonic()
        async with session.post(self.url + "/v1/node/update",
                                headers={"Authorization": f"Bearer {changer_token}"},
                                json={"endpoints": [f"198.51.100.1:{port}"]}) as r:
            assert r.status == 200, await r.text()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        got = [self.hits[i] for i in recipients if i in self.hits]
        if len(got) < len(recipients):
            print(f"warning: {len(recipients) - len(got)} recipients missed the change",
                  file=sys.stderr)
        return [t - t0 for t, _ in got], [n for _, n in got]

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


def _policy(groups: int) -> dict[str, Any]:
    tags = [f"tag:g{g}" for g in range(groups)]
    return {"tags": [*tags, "tag:hub"],
            "rules": [{"src": [t], "dst": [f"{t}:*"]} for t in tags]
            + [{"src": ["*"], "dst": ["tag:hub:*"]}]}


def _reference(db: str, recipients: list[int]) -> tuple[float, float]:
    """Rebuild-the-world reference: CPU to encode each recipient's full map, mean bytes."""
    from wgmesh import netmap as nm
    from wgmesh.control.world import World

    store = open_store(db)
    try:
        version, text = store.get_policy()
        w = World(store.ula_prefix)
        w.load(store.list_nodes(), version, text, nm.RelayMap(), store.head_seq())
    finally:
        store.close()
    t0 = time.process_time()
    sizes = [len(w.full_map(r)) for r in recipients]
    return time.process_time() - t0, statistics.fmean(sizes)


def _start_server(db: str, state: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wgmesh", "control", "serve", "--db", db, "--listen",
         "127.0.0.1:0", "--state-dir", str(state), "--keepalive", "120",
         "--key-expiry-days", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, preexec_fn=_raise_fd_limit)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split("listening on ")[1].split(",")[0]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _fanout(args: argparse.Namespace, db: str, state: Path) -> dict[str, Any]:
    n = args.nodes
    store = open_store(db)
    specs: list[tuple[Any, Any, str, list[str]]] = []
    keys = [PrivateKey.generate().public for _ in range(2)]
    for i in range(n):
        tags = [f"tag:g{i // GROUP}"] if args.scenario == "partitioned" else []
        specs.append((_fake_key(i), keys[1], f"n{i}", tags))
    if args.scenario == "partitioned":
        specs.append((_fake_key(n), keys[1], "hub", ["tag:hub"]))
        store.set_policy(_policy((n + GROUP - 1) // GROUP), "bench")
    t0 = time.monotonic()
    tokens = store.seed_nodes(specs)
    seed_s = time.monotonic() - t0
    store.close()
    proc, url = _start_server(db, state)
    admin_key = (state / "admin.key").read_text().strip()
    out: dict[str, Any] = {"scenario": args.scenario, "nodes": len(tokens),
                           "db": "postgresql" if db.startswith("postgres") else "sqlite"}
    try:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(
                total=None, sock_read=None)) as session:
            streams = Streams(url, tokens)
            t0 = time.monotonic()
            await streams.open(session)
            out["connect_all_s"] = round(time.monotonic() - t0, 2)
            out["full_map_p50_s"] = _pct(list(streams.first.values()), 50)
            await streams.quiesce(session, admin_key)
            out["settle_s"] = round(time.monotonic() - t0, 2)
            cpu0 = _proc_cpu(proc.pid)
            lat: list[float] = []
            sizes: list[int] = []
            if args.scenario == "mesh":
                recips = set(range(1, n))
                for r in range(args.rounds):
                    d, s = await streams.measure(session, tokens[0], recips, 20000 + r)
                    lat += d
                    sizes += s
                    await streams.quiesce(session, admin_key, 0.3)
            else:
                hub = n
                for r in range(args.rounds):
                    d, s = await streams.measure(session, tokens[hub], set(range(n)), 20000 + r)
                    lat += d
                    sizes += s
                    await streams.quiesce(session, admin_key, 0.3)
                glat: list[float] = []
                for r in range(args.rounds):
                    member = (r * GROUP * 7) % n  # a different group each round
                    g0 = member - member % GROUP
                    peers = set(range(g0, min(g0 + GROUP, n))) - {member}
                    d, _ = await streams.measure(session, tokens[member], peers, 30000 + r)
                    glat += d
                    await streams.quiesce(session, admin_key, 0.3)
                out["group_p50_s"], out["group_p99_s"] = _pct(glat, 50), _pct(glat, 99)
            out["server_cpu_s"] = round((_proc_cpu(proc.pid) - cpu0) / args.rounds
                                        / (1 if args.scenario == "mesh" else 2), 3)
            out["p50_s"], out["p99_s"] = _pct(lat, 50), _pct(lat, 99)
            out["bytes_per_recipient"] = round(statistics.fmean(sizes)) if sizes else None
            out["server_rss_mb"] = _proc_rss_mb(proc.pid)
            out["server_cpu_total_s"] = round(_proc_cpu(proc.pid), 1)
            streams.close()
        out["seed_s"] = round(seed_s, 2)
        sample = list(range(1, n)) if args.scenario == "mesh" else list(range(n))
        rebuild_s, full_bytes = _reference(db, [i + 1 for i in sample])  # ids are 1-based
        out["rebuild_cpu_s"] = round(rebuild_s, 3)
        out["full_map_bytes"] = round(full_bytes)
        if out["bytes_per_recipient"]:
            out["ratio_full_vs_delta_bytes"] = round(full_bytes / out["bytes_per_recipient"], 1)
    finally:
        _stop(proc)
    return out


def _fake_key(i: int) -> Any:
    """Distinct public keys without paying for key generation at N=10,000."""
    from wgmesh.keys import Key

    return Key.from_raw(i.to_bytes(4, "big") + secrets.token_bytes(28))


async def _register(args: argparse.Namespace, db: str, state: Path) -> dict[str, Any]:
    from wgmesh.control.client import ControlClient

    proc, url = _start_server(db, state)
    n = args.nodes
    try:
        admin_key = (state / "admin.key").read_text().strip()
        ak = ControlClient(url, api_key=admin_key).create_auth_key(reusable=True)["key"]
        pool_keys = [PrivateKey.generate() for _ in range(n)]
        disco = PrivateKey.generate().public.b64()
        lat: list[float] = []
        tokens: list[str] = []
        sem = asyncio.Semaphore(args.parallel)

        async def one(session: aiohttp.ClientSession, key: PrivateKey, i: int) -> None:
            import base64

            from nacl.public import Box, PublicKey

            async with sem:
                t0 = time.monotonic()
                async with session.post(url + "/v1/register/challenge",
                                        json={"node_key": key.public.b64()}) as r:
                    ch = await r.json()
                secret = Box(key.nacl(), PublicKey(base64.b64decode(ch["server_key"]))).decrypt(
                    base64.b64decode(ch["sealed"]))
                async with session.post(url + "/v1/register", json={
                        "node_key": key.public.b64(), "disco_key": disco, "hostname": f"r{i}",
                        "challenge_id": ch["challenge_id"], "auth_key": ak,
                        "proof": base64.b64encode(secret).decode()}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                lat.append(time.monotonic() - t0)
                tokens.append(body["node_token"])

        cpu0 = _proc_cpu(proc.pid)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.monotonic()
            await asyncio.gather(*(one(session, k, i) for i, k in enumerate(pool_keys)))
            elapsed = time.monotonic() - t0
            cpu = _proc_cpu(proc.pid) - cpu0
            # A newly connected node in a mesh of n: time to its full map.
            fm: list[float] = []
            sizes: list[int] = []
            for tok in tokens[: args.rounds * 5]:
                t1 = time.monotonic()
                async with session.get(url + "/v1/netmap",
                                       headers={"Authorization": f"Bearer {tok}"}) as r:
                    buf = b""
                    while b"\n" not in buf:
                        buf += await r.content.readany()
                fm.append(time.monotonic() - t1)
                sizes.append(buf.index(b"\n") + 1)
        return {"scenario": "register", "nodes": n,
                "db": "postgresql" if db.startswith("postgres") else "sqlite",
                "registrations_per_s": round(n / elapsed, 1),
                "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
                "full_map_p50_s": _pct(fm, 50), "full_map_p99_s": _pct(fm, 99),
                "bytes_per_recipient": round(statistics.fmean(sizes)),
                "server_cpu_s": round(cpu, 2), "server_rss_mb": _proc_rss_mb(proc.pid)}
    finally:
        _stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["mesh", "partitioned", "register"], default="mesh")
    ap.add_argument("--nodes", type=int, help="default: mesh 1000, partitioned 10000, "
                                              "register 500")
    ap.add_argument("--rounds", type=int, default=3, help="measured changes per scenario")
    ap.add_argument("--parallel", type=int, default=16, help="concurrent registrations")
    ap.add_argument("--postgres", metavar="DSN", nargs="?", const=os.environ.get(
        "WGMESH_TEST_POSTGRES_DSN"), help="use a fresh database on this PostgreSQL server "
                                          "(default DSN: $WGMESH_TEST_POSTGRES_DSN)")
    args = ap.parse_args()
    args.nodes = args.nodes or {"mesh": 1000, "partitioned": 10000,
                                "register": 500}[args.scenario]
    _raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="wgm-ctlbench-") as tmp:
        state = Path(tmp)
        db, cleanup = str(state / "control.db"), None
        if args.postgres:
            import psycopg

            name = f"wgm_bench_{secrets.token_hex(4)}"
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            db = f"{args.postgres.rpartition('/')[0]}/{name}"
            cleanup = name
        try:
            run = _register if args.scenario == "register" else _fanout
            out = asyncio.run(run(args, db, state))
        finally:
            if cleanup:
                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE {cleanup} WITH (FORCE)")
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
