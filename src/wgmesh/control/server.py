"""The control server's life cycle: an aiohttp app over a :class:`Store` and a :class:`World`.

The HTTP API is documented in ``docs/control-api.yaml``; its handlers live in
:mod:`~wgmesh.control.nodeapi` and :mod:`~wgmesh.control.adminapi`. Three
credentials: node tokens (issued at registration), admin API keys and relay API
keys. The first admin key is bootstrapped on first start into
``<state dir>/admin.key`` (mode 0600) or the ``api_key_file`` given; an
existing file is imported, so replicas and provisioning scripts can share one.
The audit chain's HMAC key lives the same way in ``<state dir>/audit.key`` (or
``audit_key_file``), outside the database it protects; replicas share it.
So does the control key (``control.key`` or ``control_key_file``), the Ed25519 key
every answer and netmap stream is authenticated to (:mod:`~wgmesh.control.envelope`);
the database records its fingerprint and refuses a replica with another key.
With ``tls_cert``/``tls_key`` the server speaks HTTPS itself.

All database work runs on one dedicated thread per server (the store is
synchronous); the event loop only parses, checks and streams. After any commit
the *syncer* reads the change feed past the world's sequence number and folds
it in, so changes made through another replica (PostgreSQL ``NOTIFY``, or a
one-second poll as a fallback) take exactly the same path as local ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from wgmesh import netmap as nm
from wgmesh.control import credentials
from wgmesh.control.adminapi import AdminAPI
from wgmesh.control.api import ADMIN_BODY_LIMIT, StoreThread, json_errors, relay_map_of
from wgmesh.control.envelope import ControlSigner
from wgmesh.control.errors import ControlError
from wgmesh.control.lockapi import LockAPI
from wgmesh.control.metrics import ControlMetrics
from wgmesh.control.nodeapi import NodeAPI
from wgmesh.control.ratelimit import RateLimiter
from wgmesh.control.store import NodeRecord, PostgresStore, Store, open_store
from wgmesh.control.store.sql import MAX_CHALLENGES
from wgmesh.control.world import World
from wgmesh.errors import WgmeshError
from wgmesh.loopthread import LoopThread

__all__ = ["ControlServer", "default_state_dir", "load_control_key"]

log = logging.getLogger("wgmesh.control")


def default_state_dir() -> Path:
    """``$WGMESH_STATE_DIR/control``, else /var/lib/wgmesh/control (root) or ~/.local/state."""
    if os.environ.get("WGMESH_STATE_DIR"):
        return Path(os.environ["WGMESH_STATE_DIR"]) / "control"
    if os.geteuid() == 0:
        return Path("/var/lib/wgmesh/control")
    return Path.home() / ".local/state/wgmesh/control"


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _audit_key(path: Path) -> bytes:
    """The audit HMAC key in ``path`` (64 hex digits), created (0600) on first use."""
    try:
        _write_secret(path, secrets.token_hex(32))
        log.info("wrote the audit chain key to %s", path)
    except FileExistsError:
        pass  # the usual case; or another replica won the race to create it
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ControlError(f"{path}: not a wgmesh audit key (64 hex digits)")
    return key


def load_control_key(path: Path) -> ControlSigner:
    """The control key in ``path``, created (0600) on first use."""
    try:
        _write_secret(path, ControlSigner(secrets.token_bytes(32)).text())
        log.info("wrote the control key to %s", path)
    except FileExistsError:
        pass  # the usual case; or another replica won the race to create it
    try:
        return ControlSigner.from_text(path.read_text())
    except WgmeshError as e:
        raise ControlError(f"{path}: {e}") from None


def _tls_context(cert: str | os.PathLike[str] | None,
                 key: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ControlError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ControlError(f"cannot load the TLS certificate {cert}: {e}") from None
    return ctx


class ControlServer:
    """The coordination server. ``async with``/``start()`` in asyncio, or ``with`` from sync code.

    ``db``: a SQLite path or ``postgresql://`` DSN (default: ``control.db`` in
    the state directory); ``listen``: ``host:port`` (port 0 picks one);
    ``metrics_allow``: CIDRs that may read ``/metrics`` without an admin key
    (default: loopback; :mod:`~wgmesh.control.metrics`);
    ``challenge_rate``/``challenge_burst``: registration challenges per second
    and in a burst per source address (IPv6: per /64); a rate of 0 disables it;
    ``max_challenges``: challenges outstanding network-wide (past it the oldest go);
    ``approval``: ``open``, or ``required`` (new nodes wait as pending until an
    admin approves them, unless their auth key is pre-approved);
    ``ephemeral_grace_s``: how long an ephemeral node may stay offline before
    it is removed; ``control_key_file``: the control key (default ``control.key``
    in the state dir); ``tls_cert``/``tls_key``: PEM files to serve HTTPS with.
    """

    def __init__(self, db: str | None = None, listen: str = "127.0.0.1:8420", *,
                 state_dir: str | os.PathLike[str] | None = None,
                 api_key_file: str | os.PathLike[str] | None = None,
                 audit_key_file: str | os.PathLike[str] | None = None,
                 relay_map_file: str | os.PathLike[str] | None = None,
                 key_expiry_s: float = 180 * 86400, keepalive_s: float = 15.0,
                 poll_s: float = 1.0, flush_delay_s: float = 0.005,
                 keep_changes: int = 200_000, challenge_rate: float = 10.0,
                 challenge_burst: int = 60, max_challenges: int = MAX_CHALLENGES,
                 approval: str = "open",
                 ephemeral_grace_s: float = 60.0,
                 metrics_allow: Sequence[str] | None = None,
                 control_key_file: str | os.PathLike[str] | None = None,
                 tls_cert: str | os.PathLike[str] | None = None,
                 tls_key: str | os.PathLike[str] | None = None,
                 mesh_domain: str = "") -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.mesh_domain = nm.check_domain(mesh_domain) if mesh_domain else ""
        self.db = db or str(self.state_dir / "control.db")
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.api_key_file = Path(api_key_file) if api_key_file else self.state_dir / "admin.key"
        self.audit_key_file = (Path(audit_key_file) if audit_key_file
                               else self.state_dir / "audit.key")
        self.control_key_file = (Path(control_key_file) if control_key_file
                                 else self.state_dir / "control.key")
        self.signer: ControlSigner | None = None
        self.tls = _tls_context(tls_cert, tls_key)
        self.challenges = (RateLimiter(challenge_rate, challenge_burst, clock=time.monotonic)
                           if challenge_rate > 0 else None)
        self.relay_map_file = relay_map_file
        self.key_expiry_s = key_expiry_s
        if approval not in ("open", "required"):
            raise ControlError(f"approval: {approval!r} is neither open nor required")
        self.approval, self.ephemeral_grace_s = approval, ephemeral_grace_s
        self.keepalive_s, self.poll_s, self.flush_delay_s = keepalive_s, poll_s, flush_delay_s
        self.keep_changes, self.max_challenges = keep_changes, max_challenges
        self.store: Store | None = None
        self.world: World | None = None
        self.admin_key: str | None = None
        self.metrics = ControlMetrics(metrics_allow)
        self._db: StoreThread = self.metrics.store_thread()
        self._kick = asyncio.Event()
        self._stopping = asyncio.Event()  # wakes the ticker's one-second sleep
        self._presence: dict[int, bool] = {}
        self._presence_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = threading.Event()
        self._runner: web.AppRunner | None = None
        self._listener: threading.Thread | None = None
        self._thread: LoopThread | None = None

    @property
    def url(self) -> str:
        """The base URL for clients; after :meth:`start`, with the port actually bound."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    # ---------------------------------------------------------- life cycle
    async def start(self) -> None:
        """Open the store, load the world from it, and serve; returns once listening."""
        loop = asyncio.get_running_loop()
        self.store = store = await self._db(
            open_store, self.db, key_expiry_s=self.key_expiry_s,
            max_challenges=self.max_challenges,
            approval_required=self.approval == "required",
            ephemeral_grace_s=self.ephemeral_grace_s)
        await self._db(self._bootstrap, store)
        await self._db(store.restart_presence, time.time())
        self.world = world = World(store.ula_prefix, clock=time.time, domain=self.mesh_domain)
        await self._reload()
        app = web.Application(client_max_size=ADMIN_BODY_LIMIT, middlewares=[json_errors])
        NodeAPI(store, world, self._db, kick=self.kick, sync=self.sync,
                presence=self._presence_changed, stopping=self._stop,
                keepalive_s=self.keepalive_s, challenges=self.challenges,
                signer=self.signer).add_routes(app.router)
        AdminAPI(store, world, self._db, kick=self.kick).add_routes(app.router)
        self.metrics.install(app, store, world, self._db)
        LockAPI(store, self._db, kick=self.kick).add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        # ``::`` is every address of both families, one socket each (IPv4 clients keep
        # their native addresses for rate limits), on the port the first one got.
        dual = self.host == "::"
        site = web.TCPSite(self._runner, "0.0.0.0" if dual else self.host, self.port,
                           backlog=4096, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if dual:
            await web.TCPSite(self._runner, "::", self.port, backlog=4096,
                              ssl_context=self.tls).start()
        self._tasks = [asyncio.create_task(c) for c in (
            self._syncer(), self._ticker(store, world), self._presence_writer(store))]
        if isinstance(store, PostgresStore):
            self._listener = threading.Thread(
                target=store.listen, name="control-listen", daemon=True,
                args=(self._stop, lambda: loop.call_soon_threadsafe(self.kick)))
            self._listener.start()
        log.info("control listening on %s", self.url)

    async def stop(self) -> None:
        """End the streams and background tasks, stop serving, close the store."""
        # Loops end on the flag: Python 3.11's wait_for can swallow a cancel.
        self._stop.set()
        for ev in (self._kick, self._stopping, self._presence_event):
            ev.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join, 5)
        if self.world is not None:
            for sub in self.world.subs.values():
                sub.closed = True
                if sub.wake:
                    sub.wake()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            await self._db(self.store.close)
        self._db.shutdown()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> ControlServer:
        """Run the server on its own event-loop thread (for scripts and tests)."""
        thread = LoopThread("control-server")
        thread.start_with(self.start())
        self._thread = thread
        return self

    def __exit__(self, *exc: object) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop_with(self.stop(), timeout=30)

    def _bootstrap(self, store: Store) -> None:
        """Key the audit chain; ensure an admin API key exists and its file holds it (0600)."""
        store.use_audit_key(_audit_key(self.audit_key_file))
        self.signer = load_control_key(self.control_key_file)
        store.use_control_key(self.signer.public.fingerprint)
        path = self.api_key_file
        if path.exists():
            token = path.read_text().strip()
            parsed = credentials.parse(token, credentials.API_KEY)
            if parsed is None:
                raise ControlError(f"{path}: not a wgmesh API key")
            if not store.has_api_key(parsed[0]):
                store.create_api_key("admin", f"imported from {path}", "system", token)
            self.admin_key = token
        elif not store.has_api_key(role="admin"):
            _, token = store.create_api_key("admin", "bootstrap", "system")
            _write_secret(path, token)
            self.admin_key = token
            log.info("wrote the first admin API key to %s", path)
        if self.relay_map_file:
            try:
                rm = relay_map_of(json.loads(Path(self.relay_map_file).read_text()))
            except (OSError, ValueError, ControlError) as e:
                raise ControlError(f"{self.relay_map_file}: {e}") from None
            text = json.dumps(nm.to_json(rm), sort_keys=True)
            if store.get_relay_map() != text:
                store.set_relay_map(text, "system")

    # ------------------------------------------------ the world follows the store
    async def _reload(self) -> None:
        """Rebuild the world from a consistent snapshot of the store."""
        assert self.store is not None and self.world is not None
        store = self.store

        def snapshot() -> tuple[list[NodeRecord], int, str, str | None, int, str]:
            seq = store.head_seq()
            version, text = store.get_policy()
            rm = store.get_relay_map()
            return store.list_nodes(), version, text, rm, seq, store.lock_head()

        nodes, version, text, rm, seq, lock_head = await self._db(snapshot)
        relay_map = nm.relay_map_from_json(json.loads(rm)) if rm else nm.RelayMap()
        self.world.load(nodes, version, text, relay_map, seq, lock_head)

    def kick(self) -> None:
        """Something committed: make the syncer read the change feed."""
        self._kick.set()

    async def _syncer(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll_s)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                await self.sync()
            except Exception:
                log.exception("control sync failed; retrying")

    async def sync(self) -> None:
        """Apply every committed change past the world's sequence number, then fan out."""
        assert self.store is not None and self.world is not None
        if self.flush_delay_s:
            await asyncio.sleep(self.flush_delay_s)  # coalesce bursts into fewer lines
        while True:
            changes = await self._db(self.store.changes_since, self.world.seq)
            if changes and changes[0].seq > self.world.seq + 1 and self.world.seq:
                oldest = await self._db(self.store.oldest_seq)
                if oldest > self.world.seq + 1:
                    log.warning("change feed pruned past seq %d: reloading", self.world.seq)
                    await self._reload()
                    continue
            with self.metrics.fanout.time():
                for c in changes:
                    self.world.apply(c)
                self.world.flush()
            if len(changes) < 5000:
                return

    async def _ticker(self, store: Store, world: World) -> None:
        """Once a second: drop idle subscribers, announce expired keys; now and then prune."""
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            if self._stop.is_set():
                return
            n += 1
            try:
                await self._tick(store, world, n)
            except ControlError as e:  # a full disk: one line per failed round, keep ticking
                log.error("control housekeeping failed: %s", e.message)
            except Exception:
                log.exception("control housekeeping failed; retrying")

    async def _tick(self, store: Store, world: World, n: int) -> None:
        world.gc()
        due = world.due_expiries()
        if due and await self._db(store.record_expiries, due) > 0:
            self.kick()
        # Ephemeral nodes go at most grace + 5 s after they went offline.
        if n % 5 == 0:
            await self._db(store.refresh_presence,
                           [nid for nid, sub in world.subs.items() if sub.streams],
                           time.time())
            if len(await self._db(store.remove_ephemeral)) > 0:
                self.kick()
        if n % 60 == 0:
            await self._db(store.prune_challenges)
        if n % 300 == 0:
            await self._db(store.prune_changes, self.keep_changes)

    def _presence_changed(self, nid: int, online: bool) -> None:
        """Queue an online/offline report; the presence writer commits them in batches."""
        self._presence[nid] = online
        self._presence_event.set()

    async def _presence_writer(self, store: Store) -> None:
        """One transaction per batch: a storm of 10,000 connects is a few commits, not 10,000."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence_event.wait(), 1.0)
            self._presence_event.clear()
            if not self._presence or self._stop.is_set():
                continue
            batch, self._presence = self._presence, {}
            try:
                await self._db(store.set_presence, batch, time.time())
            except Exception as e:
                # Kept for the next try (newer reports win): a full disk loses no presence.
                self._presence = {**batch, **self._presence}
                if isinstance(e, ControlError):
                    log.error("presence update failed: %s", e.message)
                else:
                    log.exception("presence update failed")
            self.kick()
