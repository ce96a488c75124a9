"""The admin API under ``/v1/admin``: nodes, auth keys, API keys, policy, relay map, audit, stats.

Every request needs an admin API key, and each one is audited: a write by the
store in the same transaction as the change, a read as ``admin.read``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from wgmesh import netmap as nm
from wgmesh.control.api import (
    ADMIN_BODY_LIMIT,
    StoreThread,
    bearer,
    body,
    field,
    is_uint,
    relay_map_of,
    tags,
)
from wgmesh.control.audit import verify
from wgmesh.control.errors import BadRequest, Forbidden
from wgmesh.control.routesapi import routes_field, routes_table
from wgmesh.control.store import Store
from wgmesh.control.world import World

__all__ = ["AdminAPI"]

Handler = Callable[[web.Request, str], Awaitable[Any]]
_TEN_YEARS = 10 * 365 * 86400


class AdminAPI:
    """Handlers take the request and the acting key (``apikey:<id>``) and return a JSON object."""

    def __init__(self, store: Store, world: World, db: StoreThread, *,
                 kick: Callable[[], None]) -> None:
        self.store, self.world, self.db, self.kick = store, world, db, kick

    def add_routes(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/nodes", self.nodes_list),
            ("POST", "/nodes/{ref}/expire", self.nodes_expire),
            ("POST", "/nodes/{ref}/extend", self.nodes_extend),
            ("PUT", "/nodes/{ref}/expiry", self.nodes_set_expiry),
            ("POST", "/nodes/{ref}/approve", self.nodes_approve),
            ("DELETE", "/nodes/{ref}", self.nodes_delete),
            ("PUT", "/nodes/{ref}/tags", self.nodes_tag),
            ("PUT", "/nodes/{ref}/name", self.nodes_rename),
            ("GET", "/authkeys", self.authkeys_list),
            ("POST", "/authkeys", self.authkeys_create),
            ("DELETE", "/authkeys/{id}", self.authkeys_revoke),
            ("GET", "/apikeys", self.apikeys_list),
            ("POST", "/apikeys", self.apikeys_create),
            ("DELETE", "/apikeys/{id}", self.apikeys_revoke),
            ("GET", "/policy", self.policy_get),
            ("PUT", "/policy", self.policy_set),
            ("GET", "/relay-map", self.relay_map_get),
            ("PUT", "/relay-map", self.relay_map_set),
            ("GET", "/audit", self.audit_list),
            ("GET", "/audit/verify", self.audit_verify),
            ("GET", "/stats", self.stats),
            ("GET", "/routes", self.routes_list),
            ("POST", "/routes/{ref}/approve", self.routes_approve),
            ("POST", "/routes/{ref}/reject", self.routes_reject),
        ]
        for method, path, fn in routes:
            router.add_route(method, "/v1/admin" + path, self._admin(fn))

    def _admin(self, fn: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Check the admin key, audit a read, run ``fn``, and kick the syncer after a write."""
        async def handler(request: web.Request) -> web.Response:
            kid, role = await self.db(self.store.api_key_role, bearer(request))
            if role != "admin":
                raise Forbidden("needs an admin API key")
            actor = f"apikey:{kid}"
            if request.method == "GET":
                await self.db(self.store.audit, actor, "admin.read", request.path,
                              dict(request.query))
            result = await fn(request, actor)
            if request.method != "GET":
                self.kick()
            return web.json_response(result)
        return handler

    # -- nodes
    async def nodes_list(self, request: web.Request, actor: str) -> Any:
        now = time.time()
        return {"nodes": [{**n.to_json(), "expired": not n.live(now)}
                          for n in await self.db(self.store.list_nodes)]}

    async def nodes_expire(self, request: web.Request, actor: str) -> Any:
        rec = await self.db(self.store.expire_node, request.match_info["ref"], actor)
        return {"node": rec.to_json()}

    async def nodes_extend(self, request: web.Request, actor: str) -> Any:
        expiry = field(await body(request, ADMIN_BODY_LIMIT), "expiry_s", (int, float), None)
        if expiry is not None and not 0 <= expiry <= _TEN_YEARS:
            raise BadRequest("expiry_s: between 0 (never) and ten years")
        rec = await self.db(self.store.extend_node, request.match_info["ref"], expiry, actor)
        return {"node": rec.to_json()}

    async def nodes_set_expiry(self, request: web.Request, actor: str) -> Any:
        """``{"key_expiry": <unix time>}``; 0 disables expiry."""
        at = field(await body(request, ADMIN_BODY_LIMIT), "key_expiry", (int, float))
        if not 0 <= at <= time.time() + _TEN_YEARS:
            raise BadRequest("key_expiry: a unix time within ten years, or 0 (never)")
        rec = await self.db(self.store.set_node_expiry, request.match_info["ref"], at, actor)
        return {"node": rec.to_json()}

    async def nodes_approve(self, request: web.Request, actor: str) -> Any:
        rec = await self.db(self.store.approve_node, request.match_info["ref"], actor)
        return {"node": rec.to_json()}

    async def nodes_delete(self, request: web.Request, actor: str) -> Any:
        rec = await self.db(self.store.delete_node, request.match_info["ref"], actor)
        return {"deleted": rec.id}

    async def nodes_rename(self, request: web.Request, actor: str) -> Any:
        name = field(await body(request, ADMIN_BODY_LIMIT), "name", str, maxlen=63)
        rec = await self.db(self.store.rename_node, request.match_info["ref"], name, actor)
        return {"node": rec.to_json()}

    async def nodes_tag(self, request: web.Request, actor: str) -> Any:
        new = tags(await body(request, ADMIN_BODY_LIMIT))
        rec = await self.db(self.store.set_tags, request.match_info["ref"], new, actor)
        return {"node": rec.to_json()}

    # -- auth keys and API keys
    async def authkeys_list(self, request: web.Request, actor: str) -> Any:
        return {"auth_keys": [k.to_json() for k in await self.db(self.store.list_auth_keys)]}

    async def authkeys_create(self, request: web.Request, actor: str) -> Any:
        d = await body(request, ADMIN_BODY_LIMIT)
        expiry = field(d, "expiry_s", (int, float), 3600)
        if not 0 <= expiry <= _TEN_YEARS:
            raise BadRequest("expiry_s: between 0 (never) and ten years")
        rec, token = await self.db(
            self.store.create_auth_key, reusable=field(d, "reusable", bool, False),
            tags=tags(d), expires_at=time.time() + expiry if expiry else 0.0,
            description=field(d, "description", str, "", maxlen=200), actor=actor,
            ephemeral=field(d, "ephemeral", bool, False),
            preapproved=field(d, "preapproved", bool, False))
        return {"auth_key": rec.to_json(), "key": token}

    async def authkeys_revoke(self, request: web.Request, actor: str) -> Any:
        await self.db(self.store.revoke_auth_key, request.match_info["id"], actor)
        return {"revoked": request.match_info["id"]}

    async def apikeys_list(self, request: web.Request, actor: str) -> Any:
        return {"api_keys": [k.to_json() for k in await self.db(self.store.list_api_keys)]}

    async def apikeys_create(self, request: web.Request, actor: str) -> Any:
        d = await body(request, ADMIN_BODY_LIMIT)
        rec, token = await self.db(self.store.create_api_key, field(d, "role", str, "admin"),
                                   field(d, "description", str, "", maxlen=200), actor)
        return {"api_key": rec.to_json(), "key": token}

    async def apikeys_revoke(self, request: web.Request, actor: str) -> Any:
        await self.db(self.store.revoke_api_key, request.match_info["id"], actor)
        return {"revoked": request.match_info["id"]}

    # -- policy and relay map
    async def policy_get(self, request: web.Request, actor: str) -> Any:
        version, text = await self.db(self.store.get_policy)
        return {"version": version, "policy": json.loads(text)}

    async def policy_set(self, request: web.Request, actor: str) -> Any:
        d = await body(request, ADMIN_BODY_LIMIT)
        if "policy" not in d:
            raise BadRequest("policy: required")
        version = await self.db(self.store.set_policy, d["policy"], actor,
                                field(d, "if_version", int, None))
        return {"version": version}

    async def relay_map_get(self, request: web.Request, actor: str) -> Any:
        return {"relay_map": nm.to_json(self.world.relay_map)}

    async def relay_map_set(self, request: web.Request, actor: str) -> Any:
        d = await body(request, ADMIN_BODY_LIMIT)
        rm = relay_map_of(d.get("relay_map"))
        await self.db(self.store.set_relay_map, json.dumps(nm.to_json(rm), sort_keys=True),
                      actor)
        return {"relay_map": nm.to_json(rm)}

    # -- audit and stats
    async def audit_list(self, request: web.Request, actor: str) -> Any:
        q = request.query
        for k in ("after", "limit"):
            if k in q and not is_uint(q[k]):
                raise BadRequest(f"{k}: must be a non-negative integer")
        after, limit = int(q.get("after", 0)), min(int(q.get("limit", 1000)), 10_000)
        store = self.store
        entries = await self.db(lambda: [e.to_json() for e in store.audit_entries(after, limit)])
        return {"entries": entries}

    async def audit_verify(self, request: web.Request, actor: str) -> Any:
        store = self.store
        return (await self.db(lambda: verify(store.audit_entries(), store.audit_key))).to_json()

    async def stats(self, request: web.Request, actor: str) -> Any:
        return self.world.snapshot_stats()

    # -- subnet routes and exit nodes (wgmesh.control.routesapi)
    async def routes_list(self, request: web.Request, actor: str) -> Any:
        return {"nodes": routes_table(self.world)}

    async def routes_approve(self, request: web.Request, actor: str) -> Any:
        return await self._routes_decide(request, actor, approve=True)

    async def routes_reject(self, request: web.Request, actor: str) -> Any:
        return await self._routes_decide(request, actor, approve=False)

    async def _routes_decide(self, request: web.Request, actor: str, approve: bool) -> Any:
        routes = routes_field(await body(request, ADMIN_BODY_LIMIT))
        if not routes:
            raise BadRequest("routes: a non-empty list of CIDRs is required")
        rec = await self.db(self.store.approve_routes, request.match_info["ref"], routes,
                            approve, actor)
        return {"node": rec.to_json()}
