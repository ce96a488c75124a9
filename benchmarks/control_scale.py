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
* ``replicas`` (PostgreSQL only): the ``mesh`` scenario on two control replicas
  sharing one database, streams split evenly across them, the change posted to
  replica A; ``replica_a_*`` / ``replica_b_*`` are the latencies of the streams on
  each (B learns of the change through PostgreSQL LISTEN/NOTIFY).

Reference run in the same invocation: wgmesh's *own* full-map encoding, once per
recipient (what a rebuild-the-world design sends per change; Headscale's current
mapper sends patches, so this is not Headscale). ``full_map_bytes`` /
``bytes_per_recipient`` is how many more bytes that would send per change, and
``rebuild_cpu_s`` the CPU that encoding takes here. Latencies include this
client's own event-loop delay over thousands of streams, so they are upper
bounds; a p99 needs >= 100 samples, below that ``*_max_s`` is reported instead.
``server_cpu_s`` is the server's CPU during the measured changes. Streams and
registrations use the authenticated channel as nodes do (a nonce per request:
signed answers, a signed session line and a MAC line after every stream line);
the clients check the registration signatures, while the seeded streams' keys are
stand-ins without private keys, so the server does all its sealing work but the
per-node verification (one per node, on the node) is not repeated here; ``--plain``
runs without the envelope (unsigned answers, plain streams), to measure what it
costs on the same machine at the same time. A recipient
that never got a change counts in ``missed`` and makes the run exit 1.
PostgreSQL runs report ``pg_fsync`` and ``pg_synchronous_commit`` as the server
has them (``scripts/start-postgres.sh`` runs with ``fsync=off``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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

from _bench import P99_MIN_SAMPLES, Report, proc_cpu_s, proc_rss_mb, tail
from wgmesh.control.store import open_store
from wgmesh.keys import PrivateKey

GROUP = 100
#: The authenticated channel (nonces in every node call); ``--plain`` turns it off.
SEALED = True


class Streams:
    """N netmap streams in one event loop; records when each line with a marker arrives.

    Stream ``i`` goes to ``urls[i % len(urls)]``: with two replicas, every other one."""

    def __init__(self, urls: list[str], tokens: list[str]) -> None:
        self.urls, self.tokens = urls, tokens
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
            resp = await session.get(self.urls[i % len(self.urls)] + "/v1/netmap",
                                     params={"nonce": _nonce()} if SEALED else None,
                                     headers={"Authorization": f"Bearer {token}"})
            parts: list[bytes] = []
            session_line = SEALED  # the signed session line comes before the map
            while i not in self.first:
                chunk = await resp.content.readany()
                if not chunk:
                    raise RuntimeError(f"stream {i} ended before its map")
                while chunk:
                    head, sep, chunk = chunk.partition(b"\n")
                    parts.append(head)
                    if sep and session_line:
                        session_line, parts = False, []
                    elif sep:
                        self.first[i] = time.monotonic() - t0
                        self.first_bytes[i] = sum(map(len, parts))
                        parts = [chunk]
                        break
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
        """Wait until every server has applied and sent everything (counters stand still)."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            now = []
            for url in self.urls:
                async with session.get(url + "/v1/admin/stats",
                                       headers={"Authorization": f"Bearer {admin_key}"}) as r:
                    st = await r.json()
                now.append((st["seq"], st["lines"]))
            if now != last:
                last, since = now, time.monotonic()
            elif (time.monotonic() - since > idle_s
                  and time.monotonic() - self.last_data > idle_s):
                return
            await asyncio.sleep(0.2)

    async def measure(self, session: aiohttp.ClientSession, changer_token: str,
                      recipients: set[int], port: int,
                      timeout: float = 60) -> tuple[dict[int, float], list[int], int]:
        """Post a change through ``urls[0]``; per recipient reached, its latency; the sizes
        of the lines that carried it; how many recipients never got it."""
        self.hits.clear()
        self.pending, self.done = set(recipients), asyncio.Event()
        self.marker = b'"port":%d,' % port
        t0 = time.monotonic()
        async with session.post(self.urls[0] + "/v1/node/update",
                                headers={"Authorization": f"Bearer {changer_token}"},
                                json={"endpoints": [f"198.51.100.1:{port}"]}) as r:
            assert r.status == 200, await r.text()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        got = {i: self.hits[i] for i in recipients if i in self.hits}
        missed = len(recipients) - len(got)
        if missed:
            print(f"warning: {missed} recipients missed the change", file=sys.stderr)
        return {i: t - t0 for i, (t, _) in got.items()}, [n for _, n in got.values()], missed

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
        w = World(store.ula_prefix, clock=time.time)
        w.load(store.list_nodes(), version, text, nm.RelayMap(), store.head_seq())
    finally:
        store.close()
    t0 = time.process_time()
    sizes = [len(w.full_map(r)) for r in recipients]
    return time.process_time() - t0, statistics.fmean(sizes)


def _start_server(db: str, state: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    """One ``wgmesh control serve``; replicas share the admin, audit and control keys."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wgmesh", "control", "serve", "--db", db, "--listen",
         "127.0.0.1:0", "--state-dir", str(state / name), "--api-key-file",
         str(state / "admin.key"), "--audit-key-file", str(state / "audit.key"),
         "--control-key-file", str(state / "control.key"),
         "--keepalive", "120", "--key-expiry-days", "0", "--challenge-rate", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=_raise_fd_limit)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        _stop(proc)
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
    partitioned = args.scenario == "partitioned"
    store = open_store(db)
    specs: list[tuple[Any, Any, str, list[str]]] = []
    keys = [PrivateKey.generate().public for _ in range(2)]
    for i in range(n):
        tags = [f"tag:g{i // GROUP}"] if partitioned else []
        specs.append((_fake_key(i), keys[1], f"n{i}", tags))
    if partitioned:
        specs.append((_fake_key(n), keys[1], "hub", ["tag:hub"]))
        store.set_policy(_policy((n + GROUP - 1) // GROUP), "bench")
    t0 = time.monotonic()
    tokens = store.seed_nodes(specs)
    seed_s = time.monotonic() - t0
    store.close()
    # one server, or two replicas: every per-server figure is prefixed with its replica
    prefixes = ["replica_a_", "replica_b_"] if args.scenario == "replicas" else [""]
    procs: list[subprocess.Popen[str]] = []
    out: dict[str, Any] = {"scenario": args.scenario, "nodes": len(tokens), "envelope": SEALED,
                           "db": "postgresql" if db.startswith("postgres") else "sqlite",
                           "missed": 0}
    try:
        urls = []
        for k in range(len(prefixes)):  # one by one: the first writes the admin key
            proc, url = _start_server(db, state, "ab"[k])
            procs.append(proc)
            urls.append(url)
        admin_key = (state / "admin.key").read_text().strip()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(
                total=None, sock_read=None)) as session:
            streams = Streams(urls, tokens)
            t0 = time.monotonic()
            await streams.open(session)
            out["connect_all_s"] = round(time.monotonic() - t0, 2)
            out.update(tail(list(streams.first.values()), "full_map_"))
            await streams.quiesce(session, admin_key)
            out["settle_s"] = round(time.monotonic() - t0, 2)
            cpu0 = [proc_cpu_s(p.pid) for p in procs]

            async def change(token: str, recipients: set[int],
                             port: int) -> tuple[dict[int, float], list[int]]:
                got, line_sizes, missed = await streams.measure(session, token, recipients, port)
                out["missed"] += missed
                await streams.quiesce(session, admin_key, 0.3)
                return got, line_sizes

            # mesh and replicas: node 0 (on replica A) changes; partitioned: the hub
            changer, recipients = ((tokens[n], set(range(n))) if partitioned
                                   else (tokens[0], set(range(1, n))))
            lat: list[tuple[int, float]] = []
            sizes: list[int] = []
            for r in range(args.rounds):
                got, line_sizes = await change(changer, recipients, 20000 + r)
                lat += got.items()
                sizes += line_sizes
            changes = args.rounds
            if partitioned:
                glat: list[float] = []
                for r in range(args.rounds):
                    member = (r * GROUP * 7) % n  # a different group each round
                    g0 = member - member % GROUP
                    peers = set(range(g0, min(g0 + GROUP, n))) - {member}
                    got, _ = await change(tokens[member], peers, 30000 + r)
                    glat += got.values()
                out.update(tail(glat, "group_"))
                changes *= 2
            out.update(tail([t for _, t in lat]))
            for k, (prefix, proc) in enumerate(zip(prefixes, procs, strict=True)):
                if prefix:  # stream i is on replica i % 2
                    out.update(tail([t for i, t in lat if i % 2 == k], prefix))
                out[f"{prefix}server_cpu_s"] = round((proc_cpu_s(proc.pid) - cpu0[k]) / changes, 3)
                out[f"{prefix}server_rss_mb"] = proc_rss_mb(proc.pid)
                out[f"{prefix}server_cpu_total_s"] = round(proc_cpu_s(proc.pid), 1)
            out["bytes_per_recipient"] = round(statistics.fmean(sizes)) if sizes else None
            streams.close()
        out["seed_s"] = round(seed_s, 2)
        sample = list(range(n)) if partitioned else list(range(1, n))
        rebuild_s, full_bytes = _reference(db, [i + 1 for i in sample])  # ids are 1-based
        out["reference"] = "wgmesh's own full-map encoding, once per recipient"
        out["rebuild_cpu_s"] = round(rebuild_s, 3)
        out["full_map_bytes"] = round(full_bytes)
        if out["bytes_per_recipient"]:
            out["ratio_full_vs_delta_bytes"] = round(full_bytes / out["bytes_per_recipient"], 1)
    finally:
        for p in procs:
            _stop(p)
    return out


def _nonce() -> str:
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _fake_key(i: int) -> Any:
    """Distinct public keys without paying for key generation at N=10,000."""
    from wgmesh.keys import Key

    return Key.from_raw(i.to_bytes(4, "big") + secrets.token_bytes(28))


async def _register(args: argparse.Namespace, db: str, state: Path) -> dict[str, Any]:
    import json

    from wgmesh.control.client import ControlClient
    from wgmesh.control.envelope import ControlKey, verify_answer

    proc, url = _start_server(db, state, "a")
    n = args.nodes
    try:
        admin_key = (state / "admin.key").read_text().strip()
        admin = ControlClient(url, api_key=admin_key)
        ak = admin.create_auth_key(reusable=True)["key"]
        control_key = ControlKey.parse(admin.server_control_key() or "")
        pool_keys = [PrivateKey.generate() for _ in range(n)]
        disco = PrivateKey.generate().public.b64()
        lat: list[float] = []
        tokens: list[str] = []
        sem = asyncio.Semaphore(args.parallel)

        async def one(session: aiohttp.ClientSession, key: PrivateKey, i: int) -> None:
            import base64

            from nacl.public import Box, PublicKey

            async def signed(path: str, req: dict[str, Any]) -> Any:
                """A node's call: the answer must verify under the control key."""
                nonce = _nonce()
                async with session.post(url + path,
                                        json={**req, "nonce": nonce} if SEALED else req) as r:
                    data = await r.read()
                    assert r.status == 200, data
                    if SEALED:
                        verify_answer(control_key, r.headers.get("Wgmesh-Control-Key"),
                                      key.public, base64.urlsafe_b64decode(nonce), data,
                                      r.headers.get("Wgmesh-Signature"))
                return json.loads(data)

            async with sem:
                t0 = time.monotonic()
                ch = await signed("/v1/register/challenge", {"node_key": key.public.b64()})
                secret = Box(key.nacl(), PublicKey(base64.b64decode(ch["server_key"]))).decrypt(
                    base64.b64decode(ch["sealed"]))
                body = await signed("/v1/register", {
                    "node_key": key.public.b64(), "disco_key": disco, "hostname": f"r{i}",
                    "challenge_id": ch["challenge_id"], "auth_key": ak,
                    "proof": base64.b64encode(secret).decode()})
                lat.append(time.monotonic() - t0)
                tokens.append(body["node_token"])

        cpu0 = proc_cpu_s(proc.pid)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.monotonic()
            await asyncio.gather(*(one(session, k, i) for i, k in enumerate(pool_keys)))
            elapsed = time.monotonic() - t0
            cpu = proc_cpu_s(proc.pid) - cpu0
            # A newly connected node in a mesh of n: time to its full map, over enough
            # nodes for a p99 (fewer registered nodes: the maximum instead).
            fm: list[float] = []
            sizes: list[int] = []
            for tok in tokens[:P99_MIN_SAMPLES]:
                t1 = time.monotonic()
                async with session.get(url + "/v1/netmap",
                                       params={"nonce": _nonce()} if SEALED else None,
                                       headers={"Authorization": f"Bearer {tok}"}) as r:
                    buf = b""
                    while buf.count(b"\n") < 1 + SEALED:  # the session line, then the map
                        buf += await r.content.readany()
                fm.append(time.monotonic() - t1)
                sizes.append(len(buf.split(b"\n")[SEALED]) + 1)
        return {"scenario": "register", "nodes": n, "envelope": SEALED,
                "db": "postgresql" if db.startswith("postgres") else "sqlite",
                "registrations_per_s": round(n / elapsed, 1), **tail(lat),
                **tail(fm, "full_map_"), "bytes_per_recipient": round(statistics.fmean(sizes)),
                "server_cpu_s": round(cpu, 2), "server_rss_mb": proc_rss_mb(proc.pid)}
    finally:
        _stop(proc)


def _pg_settings(dsn: str) -> dict[str, str]:
    """The durability settings the figures were taken with (the test server has fsync off)."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        return {f"pg_{k}": str(conn.execute(f"SHOW {k}").fetchone()[0])  # type: ignore[index]
                for k in ("fsync", "synchronous_commit")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["mesh", "partitioned", "register", "replicas"],
                    default="mesh")
    ap.add_argument("--nodes", type=int, help="default: mesh and replicas 1000, partitioned "
                                              "10000, register 500")
    ap.add_argument("--rounds", type=int, default=3, help="measured changes per scenario")
    ap.add_argument("--parallel", type=int, default=16, help="concurrent registrations")
    ap.add_argument("--plain", action="store_true",
                    help="without the control-key envelope (to measure what it costs)")
    ap.add_argument("--postgres", metavar="DSN", nargs="?", const=os.environ.get(
        "WGMESH_TEST_POSTGRES_DSN"), help="use a fresh database on this PostgreSQL server "
                                          "(default DSN: $WGMESH_TEST_POSTGRES_DSN)")
    args = ap.parse_args()
    global SEALED
    SEALED = not args.plain
    if args.scenario == "replicas" and not args.postgres:
        ap.error("--scenario replicas needs --postgres (replicas share one PostgreSQL)")
    args.nodes = args.nodes or {"mesh": 1000, "replicas": 1000, "partitioned": 10000,
                                "register": 500}[args.scenario]
    report = Report()
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
            if args.postgres:
                out.update(_pg_settings(db))
        finally:
            if cleanup:
                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE {cleanup} WITH (FORCE)")
    report.emit(out)
    return 1 if out.get("missed") else 0


if __name__ == "__main__":
    sys.exit(main())
