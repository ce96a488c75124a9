"""The control server: an aiohttp app over a :class:`Store` and the fan-out :class:`World`.

The HTTP API is documented in ``docs/control-api.yaml``. Three credentials:
node tokens (issued at registration), admin API keys and relay API keys. The
first admin key is bootstrapped on first start into ``<state dir>/admin.key``
(mode 0600) or the ``api_key_file`` given; an existing file is imported, so
replicas and provisioning scripts can share one.

All database work runs on one dedicated thread per server (the store is
synchronous); the event loop only parses, checks and streams. After any commit
the *syncer* reads the change feed past the world's sequence number and folds
it in, so changes made through another replica (PostgreSQL ``NOTIFY``, or a
one-second poll as a fallback) take exactly the same path as local ones.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from wgmesh import netmap as nm
from wgmesh.control import credentials
from wgmesh.control.audit import verify
from wgmesh.control.errors import BadRequest, ControlError, Forbidden, TooLarge, Unauthorized
from wgmesh.control.policy import TAG_RE
from wgmesh.control.store import PostgresStore, Registration, Store, open_store
from wgmesh.control.world import World
from wgmesh.keys import Key, KeyFormatError, PrivateKey

__all__ = ["ControlServer", "default_state_dir"]

log = logging.getLogger("wgmesh.control")
T = TypeVar("T")

NODE_BODY_LIMIT = 64 * 1024
ADMIN_BODY_LIMIT = 1024 * 1024
MAX_ENDPOINTS = 32
_TAG_MAX = 64


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


# ------------------------------------------------------------ request parsing


async def _body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    try:
        obj = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    return obj


def _get(d: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...,
         maxlen: int = 4096) -> Any:
    if name not in d:
        if default is ...:
            raise BadRequest(f"{name}: required")
        return default
    v = d[name]
    bad_bool = isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if not isinstance(v, kind) or bad_bool:
        raise BadRequest(f"{name}: wrong type")
    if isinstance(v, str | list) and len(v) > maxlen:
        raise BadRequest(f"{name}: too long")
    return v


def _key_field(d: dict[str, Any], name: str, optional: bool = False) -> Key | None:
    v = _get(d, name, str, None if optional else ..., maxlen=64)
    if v is None:
        return None
    try:
        return Key(v)
    except KeyFormatError as e:
        raise BadRequest(f"{name}: {e}") from None


def _tags(d: dict[str, Any]) -> list[str]:
    tags = _get(d, "tags", list, [], maxlen=_TAG_MAX)
    for t in tags:
        if not isinstance(t, str) or not TAG_RE.match(t):
            raise BadRequest(f"tags: {t!r} is not tag:NAME")
    return tags


def _is_uint(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit() and len(text) <= 18  # fits an SQL BIGINT


def _bearer(request: web.Request) -> str:
    h = request.headers.get("Authorization", "")
    if not h.startswith("Bearer "):
        raise Unauthorized("missing bearer credential")
    return h[7:].strip()


class ControlServer:
    """The coordination server. ``async with``/``start()`` in asyncio, or ``with`` from sync code.

    ``db``: a SQLite path or ``postgresql://`` DSN (default: ``control.db`` in
    the state directory); ``listen``: ``host:port`` (port 0 picks one).
    """

    def __init__(self, db: str | None = None, listen: str = "127.0.0.1:8420", *,
                 state_dir: str | os.PathLike[str] | None = None,
                 api_key_file: str | os.PathLike[str] | None = None,
                 relay_map_file: str | os.PathLike[str] | None = None,
                 key_expiry_s: float = 180 * 86400, keepalive_s: float = 15.0,
                 poll_s: float = 1.0, flush_delay_s: float = 0.005,
                 keep_changes: int = 200_000) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.db = db or str(self.state_dir / "control.db")
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.api_key_file = Path(api_key_file) if api_key_file else self.state_dir / "admin.key"
        self.relay_map_file = relay_map_file
        self.key_expiry_s = key_expiry_s
        self.keepalive_s, self.poll_s, self.flush_delay_s = keepalive_s, poll_s, flush_delay_s
        self.keep_changes = keep_changes
        self.store: Store | None = None
        self.world: World | None = None
        self.admin_key: str | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control-db")
        self._kick: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._presence: dict[int, bool] = {}
        self._presence_event: asyncio.Event | None = None
        self._stop = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: fn(*args, **kw))

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._kick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._presence_event = asyncio.Event()
        self.store = await self._db(open_store, self.db, key_expiry_s=self.key_expiry_s)
        await self._db(self._bootstrap)
        self.world = World(self.store.ula_prefix)
        await self._reload()
        app = web.Application(client_max_size=ADMIN_BODY_LIMIT, middlewares=[_errors])
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._tasks = [asyncio.create_task(c) for c in (self._syncer(), self._ticker(),
                                                        self._presence_writer())]
        if isinstance(self.store, PostgresStore):
            store = self.store
            self._listener = threading.Thread(
                target=store.listen, name="control-listen", daemon=True,
                args=(self._stop, lambda: loop.call_soon_threadsafe(self.kick)))
            self._listener.start()
        log.info("control listening on %s", self.url)

    async def stop(self) -> None:
        # Loops end on the flag: Python 3.11's wait_for can swallow a cancel.
        self._stop.set()
        self.kick()
        for ev in (self._stopping, self._presence_event):
            if ev is not None:
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
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> ControlServer:
        """Run the server on its own event-loop thread (for scripts and tests)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="control-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine on the server's loop from another thread (tests, benchmarks)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout=60)

    def _bootstrap(self) -> None:
        """Ensure an admin API key exists and its file holds it (mode 0600)."""
        assert self.store is not None
        path = self.api_key_file
        if path.exists():
            token = path.read_text().strip()
            parsed = credentials.parse(token, credentials.API_KEY)
            if parsed is None:
                raise ControlError(f"{path}: not a wgmesh API key")
            if not self.store.has_api_key(parsed[0]):
                self.store.create_api_key("admin", f"imported from {path}", "system", token)
            self.admin_key = token
        elif not self.store.has_api_key(role="admin"):
            _, token = self.store.create_api_key("admin", "bootstrap", "system")
            _write_secret(path, token)
            self.admin_key = token
            log.info("wrote the first admin API key to %s", path)
        if self.relay_map_file:
            doc = json.loads(Path(self.relay_map_file).read_text())
            text = json.dumps(nm.to_json(nm.relay_map_from_json(doc)), sort_keys=True)
            if self.store.get_relay_map() != text:
                self.store.set_relay_map(text, "system")

    async def _reload(self) -> None:
        """Rebuild the world from a consistent snapshot of the store."""
        assert self.store is not None and self.world is not None
        store = self.store

        def snapshot() -> tuple[Any, ...]:
            seq = store.head_seq()
            version, text = store.get_policy()
            rm = store.get_relay_map()
            return store.list_nodes(), version, text, rm, seq

        nodes, version, text, rm, seq = await self._db(snapshot)
        relay_map = nm.relay_map_from_json(json.loads(rm)) if rm else nm.RelayMap()
        self.world.load(nodes, version, text, relay_map, seq)

    def kick(self) -> None:
        """Something committed: make the syncer read the change feed."""
        if self._kick is not None:
            self._kick.set()

    async def _syncer(self) -> None:
        assert self.store is not None and self.world is not None and self._kick is not None
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
            for c in changes:
                self.world.apply(c)
            self.world.flush()
            if len(changes) < 5000:
                return

    async def _ticker(self) -> None:
        assert self.world is not None and self.store is not None
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            if self._stop.is_set():
                return
            self.world.gc()
            due = self.world.due_expiries()
            if due and await self._db(self.store.record_expiries, due):
                self.kick()
            n += 1
            if n % 300 == 0:
                await self._db(self.store.prune_changes, self.keep_changes)

    # ------------------------------------------------------------- routes
    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/health", self._health)
        r.add_post("/v1/register/challenge", self._challenge)
        r.add_post("/v1/register", self._register)
        r.add_get("/v1/netmap", self._netmap)
        r.add_post("/v1/node/update", self._update)
        r.add_get("/v1/relay/nodes", self._relay_nodes)
        admin: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = [
            ("GET", "/nodes", self._nodes_list),
            ("POST", "/nodes/{ref}/expire", self._nodes_expire),
            ("DELETE", "/nodes/{ref}", self._nodes_delete),
            ("PUT", "/nodes/{ref}/tags", self._nodes_tag),
            ("GET", "/authkeys", self._authkeys_list),
            ("POST", "/authkeys", self._authkeys_create),
            ("DELETE", "/authkeys/{id}", self._authkeys_revoke),
            ("GET", "/apikeys", self._apikeys_list),
            ("POST", "/apikeys", self._apikeys_create),
            ("DELETE", "/apikeys/{id}", self._apikeys_revoke),
            ("GET", "/policy", self._policy_get),
            ("PUT", "/policy", self._policy_set),
            ("GET", "/relay-map", self._relay_map_get),
            ("PUT", "/relay-map", self._relay_map_set),
            ("GET", "/audit", self._audit_list),
            ("GET", "/audit/verify", self._audit_verify),
            ("GET", "/stats", self._stats),
        ]
        for method, path, fn in admin:
            r.add_route(method, "/v1/admin" + path, self._admin(fn))

    async def _health(self, request: web.Request) -> web.Response:
        assert self.world is not None
        return web.json_response({"ok": True, "seq": self.world.seq})

    # -- registration
    async def _challenge(self, request: web.Request) -> web.Response:
        assert self.store is not None
        d = await _body(request, NODE_BODY_LIMIT)
        node_key = _key_field(d, "node_key")
        rotate_from = _key_field(d, "rotate_from", optional=True)
        assert node_key is not None
        eph = PrivateKey.generate()
        secret = secrets.token_bytes(32 if rotate_from is None else 64)

        def seal(key: Key, part: bytes) -> str:
            box = Box(eph.nacl(), NaclPublicKey(key.raw))
            return base64.b64encode(bytes(box.encrypt(part))).decode()

        out = {"server_key": eph.public.b64(), "sealed": seal(node_key, secret[:32])}
        if rotate_from is not None:
            out["sealed_old"] = seal(rotate_from, secret[32:])
        proof = base64.b64encode(secret).decode()
        out["challenge_id"] = await self._db(self.store.add_challenge, node_key, rotate_from,
                                             credentials.hash_secret(proof))
        return web.json_response(out)

    async def _register(self, request: web.Request) -> web.Response:
        assert self.store is not None
        d = await _body(request, NODE_BODY_LIMIT)
        node_key = _key_field(d, "node_key")
        disco_key = _key_field(d, "disco_key")
        proof = _get(d, "proof", str, maxlen=128)
        try:
            base64.b64decode(proof, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("proof: not base64") from None
        req = Registration(
            node_key=node_key, disco_key=disco_key,  # type: ignore[arg-type]
            hostname=_get(d, "hostname", str, maxlen=255),
            challenge_id=_get(d, "challenge_id", str, maxlen=64),
            proof_hash=credentials.hash_secret(proof),
            auth_key=_get(d, "auth_key", str, None, maxlen=128),
            rotate_from=_key_field(d, "rotate_from", optional=True))
        rec, token = await self._db(self.store.register, req)
        self.kick()
        return web.json_response({"node": nm.to_json(rec.info()), "node_token": token})

    # -- nodes
    async def _node(self, request: web.Request) -> Any:
        assert self.store is not None
        return await self._db(self.store.node_for_token, _bearer(request))

    async def _netmap(self, request: web.Request) -> web.StreamResponse:
        assert self.world is not None and self.store is not None
        rec = await self._node(request)
        since_text = request.query.get("since")
        if since_text is not None and not _is_uint(since_text):
            raise BadRequest("since: must be a non-negative integer")
        since = int(since_text) if since_text is not None else None
        world, nid = self.world, rec.id
        if nid not in world.nodes:
            await self.sync()  # registered a moment ago: the syncer has not run yet
        event = asyncio.Event()
        lines = world.attach(nid, since, event.set)
        first = world.subs[nid].streams == 1
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
        try:
            await resp.prepare(request)
            for chunk in lines:
                await resp.write(chunk)
            if first:
                self._presence_changed(nid, True)
            sub = world.subs.get(nid)
            while sub is not None and not sub.closed and not sub.overflow:
                # asyncio.timeout, not wait_for: no extra task per wake-up, which
                # matters when one change wakes 10,000 streams.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.keepalive_s):
                        await event.wait()
                event.clear()
                if sub.closed or sub.overflow or sub.wake != event.set:
                    break  # deleted, too slow, or replaced by a newer stream of this node
                data = sub.take()
                if not data:
                    data = nm.encode(nm.Keepalive(seq=sub.seq))
                await resp.write(data)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            world.detach(nid, event.set)
            sub = world.subs.get(nid)
            if sub is not None and sub.streams == 0 and not self._stop.is_set():
                self._presence_changed(nid, False)
        return resp

    def _presence_changed(self, nid: int, online: bool) -> None:
        """Queue an online/offline report; the presence writer commits them in batches."""
        self._presence[nid] = online
        if self._presence_event is not None:
            self._presence_event.set()

    async def _presence_writer(self) -> None:
        """One transaction per batch: a storm of 10,000 connects is a few commits, not 10,000."""
        assert self.store is not None and self._presence_event is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence_event.wait(), 1.0)
            self._presence_event.clear()
            if not self._presence or self._stop.is_set():
                continue
            batch, self._presence = self._presence, {}
            try:
                await self._db(self.store.set_presence, batch, time.time())
            except Exception:
                log.exception("presence update failed")
            self.kick()

    async def _update(self, request: web.Request) -> web.Response:
        assert self.store is not None and self.world is not None
        rec = await self._node(request)
        d = await _body(request, NODE_BODY_LIMIT)
        endpoints = None
        if "endpoints" in d:
            raw = _get(d, "endpoints", list, maxlen=MAX_ENDPOINTS)
            try:
                endpoints = [nm.Endpoint.parse(e) if isinstance(e, str)
                             else nm.Endpoint.from_json(e) for e in raw]
            except nm.NetmapFormatError as e:
                raise BadRequest(f"endpoints: {e}") from None
        home = _get(d, "home_relay", int, None)
        if home is not None and not 0 <= home < 2**31:
            raise BadRequest("home_relay: out of range")
        hostinfo = _get(d, "hostinfo", dict, None)
        if hostinfo is not None and len(json.dumps(hostinfo)) > 4096:
            raise BadRequest("hostinfo: larger than 4096 bytes")
        new = await self._db(self.store.update_node, rec.id, endpoints=endpoints,
                             home_relay=home, hostinfo=hostinfo)
        self.kick()
        return web.json_response({"ok": True, "node": nm.to_json(new.info())})

    async def _relay_nodes(self, request: web.Request) -> web.Response:
        assert self.store is not None and self.world is not None
        _, role = await self._db(self.store.api_key_role, _bearer(request))
        if role not in ("relay", "admin"):
            raise Forbidden("needs a relay or admin API key")
        return web.json_response({"seq": self.world.seq, "node_keys": self.world.live_keys()})

    # -- admin
    def _admin(self, fn: Callable[[web.Request, str], Awaitable[Any]]
               ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            assert self.store is not None
            kid, role = await self._db(self.store.api_key_role, _bearer(request))
            if role != "admin":
                raise Forbidden("needs an admin API key")
            actor = f"apikey:{kid}"
            if request.method == "GET":
                await self._db(self.store.audit, actor, "admin.read", request.path,
                               dict(request.query))
            result = await fn(request, actor)
            if request.method != "GET":
                self.kick()
            return web.json_response(result)
        return handler

    async def _nodes_list(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        now = time.time()
        return {"nodes": [{**n.to_json(), "expired": not n.live(now)}
                          for n in await self._db(self.store.list_nodes)]}

    async def _nodes_expire(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        rec = await self._db(self.store.expire_node, request.match_info["ref"], actor)
        return {"node": rec.to_json()}

    async def _nodes_delete(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        rec = await self._db(self.store.delete_node, request.match_info["ref"], actor)
        return {"deleted": rec.id}

    async def _nodes_tag(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        tags = _tags(await _body(request, ADMIN_BODY_LIMIT))
        rec = await self._db(self.store.set_tags, request.match_info["ref"], tags, actor)
        return {"node": rec.to_json()}

    async def _authkeys_list(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        return {"auth_keys": [k.to_json() for k in await self._db(self.store.list_auth_keys)]}

    async def _authkeys_create(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        d = await _body(request, ADMIN_BODY_LIMIT)
        expiry = _get(d, "expiry_s", (int, float), 3600)
        if not 0 <= expiry <= 10 * 365 * 86400:
            raise BadRequest("expiry_s: between 0 (never) and ten years")
        rec, token = await self._db(
            self.store.create_auth_key, reusable=_get(d, "reusable", bool, False),
            tags=_tags(d), expires_at=time.time() + expiry if expiry else 0.0,
            description=_get(d, "description", str, "", maxlen=200), actor=actor)
        return {"auth_key": rec.to_json(), "key": token}

    async def _authkeys_revoke(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        await self._db(self.store.revoke_auth_key, request.match_info["id"], actor)
        return {"revoked": request.match_info["id"]}

    async def _apikeys_list(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        return {"api_keys": [k.to_json() for k in await self._db(self.store.list_api_keys)]}

    async def _apikeys_create(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        d = await _body(request, ADMIN_BODY_LIMIT)
        rec, token = await self._db(self.store.create_api_key, _get(d, "role", str, "admin"),
                                    _get(d, "description", str, "", maxlen=200), actor)
        return {"api_key": rec.to_json(), "key": token}

    async def _apikeys_revoke(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        await self._db(self.store.revoke_api_key, request.match_info["id"], actor)
        return {"revoked": request.match_info["id"]}

    async def _policy_get(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        version, text = await self._db(self.store.get_policy)
        return {"version": version, "policy": json.loads(text)}

    async def _policy_set(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        d = await _body(request, ADMIN_BODY_LIMIT)
        if "policy" not in d:
            raise BadRequest("policy: required")
        version = await self._db(self.store.set_policy, d["policy"], actor,
                                 _get(d, "if_version", int, None))
        return {"version": version}

    async def _relay_map_get(self, request: web.Request, actor: str) -> Any:
        assert self.world is not None
        return {"relay_map": nm.to_json(self.world.relay_map)}

    async def _relay_map_set(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        d = await _body(request, ADMIN_BODY_LIMIT)
        try:
            rm = nm.relay_map_from_json(d.get("relay_map"))
        except nm.NetmapFormatError as e:
            raise BadRequest(str(e)) from None
        await self._db(self.store.set_relay_map, json.dumps(nm.to_json(rm), sort_keys=True),
                       actor)
        return {"relay_map": nm.to_json(rm)}

    async def _audit_list(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        q = request.query
        for k in ("after", "limit"):
            if k in q and not _is_uint(q[k]):
                raise BadRequest(f"{k}: must be a non-negative integer")
        after, limit = int(q.get("after", 0)), min(int(q.get("limit", 1000)), 10_000)
        store = self.store
        entries = await self._db(lambda: [e.to_json() for e in store.audit_entries(after, limit)])
        return {"entries": entries}

    async def _audit_verify(self, request: web.Request, actor: str) -> Any:
        assert self.store is not None
        store = self.store
        return (await self._db(lambda: verify(store.audit_entries()))).to_json()

    async def _stats(self, request: web.Request, actor: str) -> Any:
        assert self.world is not None
        return self.world.snapshot_stats()


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every failure is a JSON body with a 4xx/5xx status; nothing escapes as a crash."""
    try:
        return await handler(request)
    except ControlError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            e.status, "bad_request")
        return web.json_response({"error": code, "message": e.reason}, status=e.status)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal", "message": "internal server error"},
                                 status=500)
