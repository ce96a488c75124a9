"""The control server's Prometheus/OpenMetrics metrics, served at ``GET /metrics``.

What is cheap to count is counted where it happens (registrations, by the
refusal's error code; the in-memory fan-out time of each batch of changes; how
long each store call took, queueing on the store thread included); what the
world already knows (open streams, lines and bytes queued to streams, the
policy version) is read when Prometheus scrapes, and so is the length of the
audit chain (one indexed query per scrape). Labels come from fixed sets: error
codes and store method names, never node names or keys.

Who may read it: addresses in ``allow`` (default: loopback), or anyone with an
admin API key (``Authorization: Bearer``; Prometheus' ``authorization:
credentials_file``). A node token is not enough.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import ParamSpec, TypeVar

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from wgmesh.control.api import StoreThread, bearer
from wgmesh.control.errors import ControlError, Forbidden
from wgmesh.control.store import Store
from wgmesh.control.world import World
from wgmesh.errors import WgmeshError

__all__ = ["ControlMetrics", "TimedStoreThread"]

P = ParamSpec("P")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: paths whose outcome counts as a registration attempt (both steps of the proof)
_REGISTRATION = ("/v1/register/challenge", "/v1/register")
_FAST = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)


class TimedStoreThread(StoreThread):
    """The store thread, timing each call (queueing included: what a handler waits)."""

    def __init__(self, latency: Histogram) -> None:
        super().__init__()
        self.latency = latency

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        t0 = time.perf_counter()
        try:
            return await super().__call__(fn, *args, **kw)
        finally:
            self.latency.labels(getattr(fn, "__name__", "call")).observe(
                time.perf_counter() - t0)


class _WorldCollector(Collector):
    """What the world knows, read at scrape time (O(subscribers))."""

    def __init__(self) -> None:
        self.world: World | None = None

    def collect(self) -> Iterator[Metric]:
        w = self.world
        if w is None:
            return
        yield GaugeMetricFamily("wgmesh_control_streams", "open netmap streams",
                                value=sum(s.streams for s in w.subs.values()))
        yield GaugeMetricFamily("wgmesh_control_nodes", "nodes known", value=len(w.nodes))
        yield GaugeMetricFamily("wgmesh_control_live_nodes", "nodes not expired",
                                value=len(w.live))
        yield GaugeMetricFamily("wgmesh_control_policy_version", "the policy in force",
                                value=w.policy.version)
        yield GaugeMetricFamily("wgmesh_control_change_seq", "the last change folded in",
                                value=w.seq)
        for key, name, doc in (("lines", "deltas", "netmap delta lines queued to streams"),
                               ("bytes", "delta_bytes", "bytes of those delta lines"),
                               ("full_maps", "full_maps", "full netmaps sent"),
                               ("resumes", "resumes", "streams resumed from a sequence")):
            yield CounterMetricFamily(f"wgmesh_control_{name}", doc, value=w.stats[key])


class ControlMetrics:
    """One control server's registry and the hooks that feed it."""

    def __init__(self, allow: Sequence[str] | None = None) -> None:
        try:
            self.allow = tuple(ipaddress.ip_network(n.strip(), strict=False)
                               for n in (allow or ("127.0.0.0/8", "::1/128")))
        except ValueError as e:
            raise WgmeshError(f"metrics allow-list: {e}") from e
        self.registry = r = CollectorRegistry(auto_describe=False)  # several servers a process
        self.registrations = Counter(
            "wgmesh_control_registrations", "registration attempts; reason: the refusal's "
            "error code", ["result", "reason"], registry=r)
        self.fanout = Histogram(
            "wgmesh_control_fanout_seconds", "folding one batch of committed changes into "
            "every affected stream's next line", buckets=_FAST, registry=r)
        self.store_latency = Histogram(
            "wgmesh_control_store_seconds", "store calls as the event loop waits for them",
            ["op"], buckets=_FAST, registry=r)
        self.audit_entries = Gauge("wgmesh_control_audit_entries",
                                   "entries in the audit chain", registry=r)
        self._world = _WorldCollector()
        r.register(self._world)
        self._store: Store | None = None
        self._db: StoreThread | None = None

    def store_thread(self) -> TimedStoreThread:
        return TimedStoreThread(self.store_latency)

    def install(self, app: web.Application, store: Store, world: World,
                db: StoreThread) -> None:
        """Serve ``/metrics`` on ``app`` and count its registrations."""
        self._store, self._db, self._world.world = store, db, world
        app.middlewares.append(self._count_registrations)
        app.router.add_get("/metrics", self.handle)

    @web.middleware
    async def _count_registrations(self, request: web.Request,
                                   handler: Handler) -> web.StreamResponse:
        if request.path not in _REGISTRATION:
            return await handler(request)
        try:
            resp = await handler(request)
        except ControlError as e:
            self.registrations.labels("refused", e.code).inc()
            raise
        except web.HTTPException as e:
            self.registrations.labels("refused", f"http_{e.status}").inc()
            raise
        if request.path == "/v1/register":
            self.registrations.labels("ok", "").inc()
        return resp

    async def handle(self, request: web.Request) -> web.Response:
        assert self._store is not None and self._db is not None
        if not self._allowed(request.remote):
            _, role = await self._db(self._store.api_key_role, bearer(request))
            if role != "admin":
                raise Forbidden("metrics need an admin API key from this address")
        self.audit_entries.set(await self._db(self._store.audit_count))
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    def _allowed(self, remote: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((remote or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.allow)
