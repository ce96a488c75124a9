"""A registration storm from many sources (issue 14, Load): the limits hold and honest
nodes still get in.

Sources are loopback addresses (127.0.1.x flood, 127.0.2.x honest nodes): the whole of
127/8 is this host's, so a client can bind any of them and the server sees each as its
own source. The flood asks for challenges past every source's burst and sends
registrations with made-up challenges; together its sources overfill the network-wide
challenge table. Honest nodes register with an auth key, each once, while it goes on.
"""

from __future__ import annotations

import base64
import http.client
import json
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from requests.adapters import HTTPAdapter

from wgmesh.control import ControlClient, ControlServer
from wgmesh.keys import PrivateKey

pytestmark = pytest.mark.service

FLOOD_SOURCES = [f"127.0.1.{i}" for i in range(1, 21)]
HONEST_SOURCES = [f"127.0.2.{i}" for i in range(1, 11)]
BURST, RATE = 60, 10.0  # the server's defaults, set here so the bounds below are the spec's
MAX_CHALLENGES = 600  # below the flood's 20 x 60 burst: the table overflows


class _FromSource(HTTPAdapter):
    """A requests adapter whose connections leave from one source address."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def _flood(port: int, source: str, challenges: int,
           registrations: int) -> tuple[Counter[int], float, float]:
    """One flooding source on one keep-alive connection: status codes by count, and when
    its first and last challenge went (its bucket refilled in between)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                      source_address=(source, 0))
    key = PrivateKey.generate().public.b64()
    codes: Counter[int] = Counter()

    def post(path: str, body: dict[str, Any]) -> None:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        codes[r.status] += 1

    try:
        t0 = time.monotonic()
        for _ in range(challenges):
            post("/v1/register/challenge", {"node_key": key})
        t1 = time.monotonic()
        for i in range(registrations):  # challenges nobody issued
            post("/v1/register", {"node_key": key, "disco_key": key, "hostname": f"f{i}",
                                  "challenge_id": f"{i:032x}",
                                  "proof": base64.b64encode(bytes(32)).decode()})
    finally:
        conn.close()
    return codes, t0, t1


def _outstanding(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM challenges").fetchone()[0])


def test_a_storm_from_many_sources_is_limited_and_honest_nodes_get_in(tmp_path: Path) -> None:
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path, flush_delay_s=0.0,
                       challenge_rate=RATE, challenge_burst=BURST,
                       max_challenges=MAX_CHALLENGES) as server:
        admin = ControlClient(server.url, api_key=server.admin_key)
        authkey = admin.create_auth_key(reusable=True)["key"]
        flooding = threading.Event()

        def honest(source: str) -> str:
            flooding.wait(30)
            client = ControlClient(server.url)
            client.session.mount("http://", _FromSource(source))
            return client.register(PrivateKey.generate(), PrivateKey.generate().public,
                                   f"honest-{source.rsplit('.', 1)[1]}",
                                   auth_key=authkey).node.name

        with ThreadPoolExecutor(len(FLOOD_SOURCES) + len(HONEST_SOURCES)) as pool:
            # First every source's burst and more, so the table is full...
            first = list(pool.map(lambda s: _flood(server.port, s, 2 * BURST, 0),
                                  FLOOD_SOURCES))
            assert _outstanding(tmp_path / "control.db") == MAX_CHALLENGES
            # ...then more of the same while the honest nodes register.
            flood = [pool.submit(_flood, server.port, s, BURST, 20) for s in FLOOD_SOURCES]
            names = [pool.submit(honest, s) for s in HONEST_SOURCES]
            flooding.set()
            second = [f.result() for f in flood]
            registered = [f.result() for f in names]  # each raises if refused

        assert sorted(registered) == sorted(f"honest-{s.rsplit('.', 1)[1]}"
                                            for s in HONEST_SOURCES)
        listed = {n["name"] for n in admin.nodes()}
        assert set(registered) <= listed
        for source, (a, a0, _), (b, _, b1) in zip(FLOOD_SOURCES, first, second, strict=True):
            # The rate limit held: a burst, then only what the rate refilled meanwhile.
            assert a[429] + b[429] > 0, (source, a, b)
            assert BURST <= a[200] + b[200] <= BURST + RATE * (b1 - a0) + 1, \
                (source, a, b, b1 - a0)
            # Made-up challenges are refused as such, never a 500.
            assert b[401] + b[400] == 20 and set(b) <= {200, 429, 401, 400}, (source, b)
        assert _outstanding(tmp_path / "control.db") <= MAX_CHALLENGES
