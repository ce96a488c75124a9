"""What the node and admin APIs share: the store's thread, request parsing, JSON errors.

Every parser raises :class:`~wgmesh.control.errors.BadRequest` (or
``TooLarge``/``Unauthorized``) with the field's name, and :func:`json_errors`
turns any failure into a JSON body, so a malformed request never crashes a
handler into a bare 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from wgmesh import netmap as nm
from wgmesh.control.errors import (
    BadRequest,
    ControlError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
)
from wgmesh.control.policy import TAG_RE
from wgmesh.keys import Key, KeyFormatError

__all__ = ["ADMIN_BODY_LIMIT", "MAX_DEPTH", "NODE_BODY_LIMIT", "StoreThread", "bearer", "body",
           "check_shape", "field", "is_uint", "json_errors", "key_field", "relay_map_of", "tags"]

log = logging.getLogger("wgmesh.control")
P = ParamSpec("P")
T = TypeVar("T")

NODE_BODY_LIMIT = 64 * 1024
ADMIN_BODY_LIMIT = 1024 * 1024
_TAG_MAX = 64
#: How deep any request body may nest: the deepest real one (a policy) needs 5.
MAX_DEPTH = 32


class StoreThread:
    """Runs store calls on one dedicated thread: the store is synchronous; the loop never waits."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control-db")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kw))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


async def body(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, refused past ``limit`` bytes before it is all read."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    try:
        obj = json.loads(raw or b"{}", parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    check_shape(obj, "body", MAX_DEPTH)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} overflows a double")
    return v


def check_shape(obj: dict[str, Any] | list[Any], name: str, max_depth: int) -> None:
    """Refuse nesting past ``max_depth`` and text that is not Unicode (a lone surrogate).

    Iterative, so the check itself cannot run out of stack; what passes can be
    stored, encoded and served back without hitting a recursion limit.
    """
    todo: list[tuple[dict[str, Any] | list[Any], int]] = [(obj, 1)]
    while todo:
        v, depth = todo.pop()
        if depth > max_depth:
            raise BadRequest(f"{name}: nested deeper than {max_depth} levels")
        for x in ([*v, *v.values()] if isinstance(v, dict) else v):
            if isinstance(x, dict | list):
                todo.append((x, depth + 1))
            elif isinstance(x, str) and not x.isascii():
                try:
                    x.encode()
                except UnicodeEncodeError:
                    raise BadRequest(f"{name}: text is not valid Unicode") from None


def field(d: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...,
          maxlen: int = 4096) -> Any:
    """``d[name]`` checked against ``kind`` (a bool is no int) and ``maxlen``.

    Without ``default`` the field is required.
    """
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


def key_field(d: dict[str, Any], name: str, optional: bool = False) -> Key | None:
    v = field(d, name, str, None if optional else ..., maxlen=64)
    if v is None:
        return None
    try:
        return Key(v)
    except KeyFormatError as e:
        raise BadRequest(f"{name}: {e}") from None


def tags(d: dict[str, Any]) -> list[str]:
    found = field(d, "tags", list, [], maxlen=_TAG_MAX)
    for t in found:
        if not isinstance(t, str) or not TAG_RE.match(t):
            raise BadRequest(f"tags: {t!r} is not tag:NAME")
    return found


def relay_map_of(doc: Any) -> nm.RelayMap:
    """A relay map from its JSON (the admin API's or the ``--relay-map`` file's)."""
    try:
        rm = nm.relay_map_from_json(doc)
        for node in (n for r in rm.regions for n in r.nodes):
            urlsplit(node.url).port  # noqa: B018 - a relay client would fail on it later
    except nm.NetmapFormatError as e:
        raise BadRequest(str(e)) from None
    except ValueError as e:  # urlsplit refuses "http://[::1" or a port of "bad"
        raise BadRequest(f"relay_map: a relay URL is malformed ({e})") from None
    return rm


def is_uint(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit() and len(text) <= 18  # fits an SQL BIGINT


def bearer(request: web.Request) -> str:
    h = request.headers.get("Authorization", "")
    if not h.startswith("Bearer "):
        raise Unauthorized("missing bearer credential")
    return h[7:].strip()


@web.middleware
async def json_errors(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every failure is a JSON body with a 4xx/5xx status; nothing escapes as a crash."""
    try:
        return await handler(request)
    except ControlError as e:
        if e.status >= 500:  # the service's trouble (a full disk), not the caller's: one line
            log.error("%s %s refused: %s", request.method, request.path, e.message)
        headers = ({"Retry-After": str(math.ceil(e.retry_after_s))}
                   if isinstance(e, TooManyRequests) else None)
        return web.json_response(e.body(), status=e.status, headers=headers)
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
