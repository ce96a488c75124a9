"""The node API: registration by proof of key possession, the netmap stream, endpoint reports.

Nodes authenticate with the node token issued at registration; relays (and
admins) may list the live node keys a relay should serve. A node that sends a
nonce gets its registration answer signed and its netmap stream sealed to the
control key (:mod:`~wgmesh.control.envelope`). Each handler checks
and parses, hands the store work to its thread and kicks the syncer: a change
reaches every stream, this replica's included, through the change feed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from wgmesh import netmap as nm
from wgmesh.control import addressing, credentials
from wgmesh.control.api import (
    NODE_BODY_LIMIT,
    StoreThread,
    bearer,
    body,
    check_shape,
    field,
    is_uint,
    key_field,
)
from wgmesh.control.envelope import NONCE_LEN, ControlSigner, StreamSealer
from wgmesh.control.errors import BadRequest, Forbidden, TooManyRequests
from wgmesh.control.ratelimit import RateLimiter
from wgmesh.control.routesapi import routes_field
from wgmesh.control.store import NodeRecord, Registration, Store
from wgmesh.control.world import World
from wgmesh.keys import Key, PrivateKey

__all__ = ["HOSTINFO_DEPTH", "MAX_ENDPOINTS", "NodeAPI"]

MAX_ENDPOINTS = 32
HOSTINFO_DEPTH = 8


class NodeAPI:
    """``/v1/health``, ``/v1/register*``, ``/v1/netmap``, ``/v1/node/update``, ``/v1/relay/nodes``.

    ``presence(node_id, online)`` queues a stream's connect or disconnect;
    ``stopping`` is set while the server shuts down (a closing stream is then
    no sign that its node went offline); ``challenges`` limits the one
    unauthenticated call that costs a write, per source address (``None``: no limit).
    """

    def __init__(self, store: Store, world: World, db: StoreThread, *,
                 kick: Callable[[], None], sync: Callable[[], Awaitable[None]],
                 presence: Callable[[int, bool], None], stopping: threading.Event,
                 keepalive_s: float, challenges: RateLimiter | None = None,
                 signer: ControlSigner | None = None) -> None:
        self.store, self.world, self.db = store, world, db
        self.kick, self.sync, self.presence = kick, sync, presence
        self.stopping, self.keepalive_s = stopping, keepalive_s
        self.challenges = challenges
        self.signer = signer

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/health", self.health)
        router.add_post("/v1/register/challenge", self.challenge)
        router.add_post("/v1/register", self.register)
        router.add_get("/v1/netmap", self.netmap)
        router.add_post("/v1/node/update", self.update)
        router.add_get("/v1/relay/nodes", self.relay_nodes)

    async def health(self, request: web.Request) -> web.Response:
        """``?node=KEY&nonce=N`` makes it a signed proof of the control key, which a node
        asks for before its token goes anywhere."""
        out: dict[str, object] = {"ok": True, "seq": self.world.seq}
        if self.signer is not None:
            out["control_key"] = str(self.signer.public)
        node = request.query.get("node")
        return self._answer(out, key_field({"node": node}, "node") if node else None,
                            request.query.get("nonce"))

    def _answer(self, out: dict[str, Any], node_key: Key | None,
                nonce: object) -> web.Response:
        """JSON ``out``, signed for ``node_key`` if it sent a nonce (the envelope)."""
        data = json.dumps(out).encode()
        headers = {}
        if self.signer is not None and node_key is not None and nonce is not None:
            if not isinstance(nonce, str):
                raise BadRequest("nonce: must be a string")
            headers = {"Wgmesh-Control-Key": str(self.signer.public),
                       "Wgmesh-Signature": self.signer.sign_answer(node_key, _nonce(nonce),
                                                                   data)}
        return web.Response(body=data, content_type="application/json", headers=headers)

    # -- registration
    async def challenge(self, request: web.Request) -> web.Response:
        """Seal a secret to the node key (and the old key, when rotating): the proof to come."""
        d = await body(request, NODE_BODY_LIMIT)
        node_key = key_field(d, "node_key")
        rotate_from = key_field(d, "rotate_from", optional=True)
        assert node_key is not None
        eph = PrivateKey.generate()
        secret = secrets.token_bytes(32 if rotate_from is None else 64)

        def seal(name: str, key: Key, part: bytes) -> str:
            try:
                box = Box(eph.nacl(), NaclPublicKey(key.raw))
            except CryptoError:  # libsodium refuses low-order points such as all zeros
                raise BadRequest(f"{name}: not a usable X25519 public key") from None
            return base64.b64encode(bytes(box.encrypt(part))).decode()

        out = {"server_key": eph.public.b64(), "sealed": seal("node_key", node_key, secret[:32])}
        if rotate_from is not None:
            out["sealed_old"] = seal("rotate_from", rotate_from, secret[32:])
        if self.challenges is not None and request.remote:
            wait = self.challenges.check(request.remote)
            if wait:
                raise TooManyRequests("too many registration attempts from this address", wait)
        proof = base64.b64encode(secret).decode()
        out["challenge_id"] = await self.db(self.store.add_challenge, node_key, rotate_from,
                                            credentials.hash_secret(proof))
        return self._answer(out, node_key, d.get("nonce"))

    async def register(self, request: web.Request) -> web.Response:
        d = await body(request, NODE_BODY_LIMIT)
        node_key = key_field(d, "node_key")
        disco_key = key_field(d, "disco_key")
        proof = field(d, "proof", str, maxlen=128)
        try:
            base64.b64decode(proof, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("proof: not base64") from None
        req = Registration(
            node_key=node_key, disco_key=disco_key,  # type: ignore[arg-type]
            hostname=field(d, "hostname", str, maxlen=255),
            challenge_id=field(d, "challenge_id", str, maxlen=64),
            proof_hash=credentials.hash_secret(proof),
            auth_key=field(d, "auth_key", str, None, maxlen=128),
            rotate_from=key_field(d, "rotate_from", optional=True))
        rec, token = await self.db(self.store.register, req)
        self.kick()
        return self._answer({"node": nm.to_json(rec.info()), "node_token": token},
                            rec.node_key, d.get("nonce"))

    # -- nodes
    async def _node(self, request: web.Request) -> NodeRecord:
        return await self.db(self.store.node_for_token, bearer(request))

    async def netmap(self, request: web.Request) -> web.StreamResponse:
        """The node's full map, then deltas as they commit, keepalives while idle (NDJSON)."""
        rec = await self._node(request)
        since_text = request.query.get("since")
        if since_text is not None and not is_uint(since_text):
            raise BadRequest("since: must be a non-negative integer")
        since = int(since_text) if since_text is not None else None
        sealer: StreamSealer | None = None
        nonce_text = request.query.get("nonce")
        if nonce_text is not None and self.signer is not None:
            session, sealer = self.signer.open_stream(rec.node_key, _nonce(nonce_text),
                                                      secrets.token_bytes(32))
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
            self._abort_when_unacked(request)
            if sealer is not None:
                await resp.write(session)
            for chunk in lines:
                await resp.write(chunk if sealer is None else sealer.feed(chunk))
            if first:
                self.presence(nid, True)
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
                await resp.write(data if sealer is None else sealer.feed(data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            world.detach(nid, event.set)
            sub = world.subs.get(nid)
            if sub is not None and sub.streams == 0 and not self.stopping.is_set():
                self.presence(nid, False)
        return resp

    def _abort_when_unacked(self, request: web.Request) -> None:
        """A node whose host vanished (uplink lost, powered off) sends no FIN or RST, and
        writes to it succeed into the send buffer for the ~15 minutes TCP retransmits. So
        its stream is aborted once a write stays unacknowledged for two keepalive periods
        (at least 5 s): it goes offline, and a subnet route fails over to another router."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(max(5.0, 2 * self.keepalive_s) * 1000))

    async def update(self, request: web.Request) -> web.Response:
        """The node's own report: endpoints, home relay, host info, advertised routes."""
        rec = await self._node(request)
        d = await body(request, NODE_BODY_LIMIT)
        endpoints = None
        if "endpoints" in d:
            raw = field(d, "endpoints", list, maxlen=MAX_ENDPOINTS)
            try:
                endpoints = [nm.Endpoint.parse(e) if isinstance(e, str)
                             else nm.Endpoint.from_json(e) for e in raw]
            except nm.NetmapFormatError as e:
                raise BadRequest(f"endpoints: {e}") from None
            for ep in endpoints:
                why = addressing.unusable_endpoint(ep.ip, self.store.ula_prefix)
                if why:
                    raise BadRequest(f"endpoints: {ep} is {why}")
        home = field(d, "home_relay", int, None)
        if home is not None and not 0 <= home < 2**31:
            raise BadRequest("home_relay: out of range")
        hostinfo = field(d, "hostinfo", dict, None)
        if hostinfo is not None:
            check_shape(hostinfo, "hostinfo", HOSTINFO_DEPTH)
            if len(json.dumps(hostinfo)) > 4096:
                raise BadRequest("hostinfo: larger than 4096 bytes")
        new = await self.db(self.store.update_node, rec.id, endpoints=endpoints,
                            home_relay=home, hostinfo=hostinfo, routes=routes_field(d))
        self.kick()
        return web.json_response({"ok": True, "node": nm.to_json(new.info())})

    async def relay_nodes(self, request: web.Request) -> web.Response:
        """The live node keys, for a relay that serves only this network's nodes."""
        _, role = await self.db(self.store.api_key_role, bearer(request))
        if role not in ("relay", "admin"):
            raise Forbidden("needs a relay or admin API key")
        return web.json_response({"seq": self.world.seq, "node_keys": self.world.live_keys()})


def _nonce(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != NONCE_LEN:
        raise BadRequest(f"nonce: must be {NONCE_LEN} bytes of base64")
    return raw
