"""The mesh lock API: control stores and hands out the chain; admins' signatures decide.

``GET /v1/lock`` serves the chain to nodes (node token) and to the admin CLI (admin API
key); ``POST /v1/lock/updates`` appends an update an admin signed offline. Each append
commits a ``lock`` change, so every netmap stream carries the new ``lock_head`` within a
sync and the nodes fetch the updates they miss. Nothing here is trusted by a node: it
verifies the chain itself (:mod:`wgmesh.node.lock`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from aiohttp import web

from wgmesh.control import credentials
from wgmesh.control.api import ADMIN_BODY_LIMIT, StoreThread, bearer, body, field
from wgmesh.control.errors import BadRequest, Forbidden
from wgmesh.control.store import Store

__all__ = ["LockAPI"]

#: An encoded update is at most a genesis with 255 keys: 138 + 255 * 32 bytes.
_MAX_UPDATE_B64 = 12 * 1024


class LockAPI:
    """``/v1/lock`` (read the chain) and ``/v1/lock/updates`` (append one)."""

    def __init__(self, store: Store, db: StoreThread, *, kick: Callable[[], None]) -> None:
        self.store, self.db, self.kick = store, db, kick

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/lock", self.chain)
        router.add_post("/v1/lock/updates", self.append)

    async def _admin(self, token: str) -> str:
        kid, role = await self.db(self.store.api_key_role, token)
        if role != "admin":
            raise Forbidden("needs an admin API key")
        return f"apikey:{kid}"

    async def chain(self, request: web.Request) -> web.Response:
        """The updates after ``since`` (a head hash in hex), or the whole chain."""
        token = bearer(request)
        if credentials.parse(token, credentials.API_KEY):
            await self._admin(token)
        else:
            await self.db(self.store.node_for_token, token)
        since_text = request.query.get("since", "")
        try:
            since = bytes.fromhex(since_text) if since_text else None
        except ValueError:
            raise BadRequest("since: not a hex lock head") from None
        lock_id, head, updates = await self.db(self.store.lock_chain, since)
        return web.json_response({"lock_id": lock_id, "head": head,
                                  "updates": [base64.b64encode(u).decode() for u in updates]})

    async def append(self, request: web.Request) -> web.Response:
        """Append one signed update: 409 on a stale parent, 422 if it does not verify."""
        actor = await self._admin(bearer(request))
        text = field(await body(request, ADMIN_BODY_LIMIT), "update", str,
                     maxlen=_MAX_UPDATE_B64)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("update: not base64") from None
        state = await self.db(self.store.lock_append, raw, actor)
        self.kick()
        return web.json_response({"lock_id": state.lock_id.hex(), "head": state.head.hex(),
                                  "seq": state.seq - 1})
