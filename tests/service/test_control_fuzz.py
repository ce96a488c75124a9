"""Bad input gets a 4xx JSON error, never a crash, and leaves the store as it was."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control import register

from wgmesh.control import ControlClient, ControlServer

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp, keepalive_s=0.3) as srv:
        admin = ControlClient(srv.url, api_key=srv.admin_key)
        ak = admin.create_auth_key(reusable=True)["key"]
        node, _, info = register(srv.url, ak, "victim")
        relay = admin.create_api_key("relay")["key"]
        yield {"srv": srv, "url": srv.url, "admin": admin, "node": node.node_token,
               "relay": relay, "info": info}


def snapshot(admin: ControlClient) -> Any:
    return (admin.nodes(), admin.list_auth_keys(), admin.list_api_keys(), admin.get_policy(),
            admin.get_relay_map())


def call(url: str, method: str, path: str, cred: str | None = None, data: Any = None,
         raw: bytes | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {cred}"} if cred else {}
    if raw is None and data is not None:
        raw = json.dumps(data).encode()
    return requests.request(method, url + path, data=raw, headers=headers, timeout=10)


def bad_requests(e: dict[str, Any]) -> list[tuple[Any, ...]]:
    a, n, r = e["srv"].admin_key, e["node"], e["relay"]
    key = e["info"].node_key.b64()
    return [
        # (method, path, credential, json body or raw bytes, expected status)
        ("POST", "/v1/register/challenge", None, b"{not json", 400),
        ("POST", "/v1/register/challenge", None, [], 400),
        ("POST", "/v1/register/challenge", None, {"node_key": 5}, 400),
        ("POST", "/v1/register/challenge", None, {"node_key": "AAAA"}, 400),
        ("POST", "/v1/register/challenge", None, b"\xff\xfe", 400),
        ("POST", "/v1/register", None, {"node_key": key}, 400),
        ("POST", "/v1/register", None, {"node_key": key, "disco_key": key, "hostname": "x",
                                        "challenge_id": "nope", "proof": "AAAA"}, 401),
        ("POST", "/v1/register", None, {"node_key": key, "disco_key": key, "hostname": 7,
                                        "challenge_id": "x", "proof": "AAAA"}, 400),
        ("POST", "/v1/register", None, {"node_key": key, "disco_key": key, "hostname": "x",
                                        "challenge_id": "x", "proof": "!!"}, 400),
        ("POST", "/v1/register", None, b"{" + b" " * 70_000 + b"}", 413),
        ("POST", "/v1/register", None, b"[" * 60_000, 400),
        ("PUT", "/v1/admin/policy", a, b'{"policy":' + b"[" * 500_000, 400),
        ("GET", "/v1/netmap", None, None, 401),
        ("GET", "/v1/netmap", "wgn_0123456789abcdef_" + "x" * 43, None, 401),
        ("GET", "/v1/netmap?since=abc", n, None, 400),
        ("GET", "/v1/netmap", a, None, 401),
        ("POST", "/v1/node/update", n, {"endpoints": "1.2.3.4:5"}, 400),
        ("POST", "/v1/node/update", n, {"endpoints": ["1.2.3.4"]}, 400),
        ("POST", "/v1/node/update", n, {"endpoints": [{"ip": "999.1.1.1", "port": 1}]}, 400),
        ("POST", "/v1/node/update", n, {"endpoints": ["1.2.3.4:5"] * 33}, 400),
        ("POST", "/v1/node/update", n, {"home_relay": "x"}, 400),
        ("POST", "/v1/node/update", n, {"home_relay": -1}, 400),
        ("POST", "/v1/node/update", n, {"home_relay": True}, 400),
        ("POST", "/v1/node/update", n, {"hostinfo": {"x": "y" * 5000}}, 400),
        ("POST", "/v1/node/update", None, {"home_relay": 1}, 401),
        ("GET", "/v1/relay/nodes", n, None, 401),
        ("GET", "/v1/admin/nodes", None, None, 401),
        ("GET", "/v1/admin/nodes", n, None, 401),
        ("GET", "/v1/admin/nodes", r, None, 403),
        ("GET", "/v1/admin/nodes", "Basic abc", None, 401),
        ("POST", "/v1/admin/nodes/999/expire", a, None, 404),
        ("DELETE", "/v1/admin/nodes/nosuch", a, None, 404),
        ("PUT", "/v1/admin/nodes/1/tags", a, {"tags": ["server"]}, 400),
        ("PUT", "/v1/admin/nodes/1/tags", a, {"tags": "tag:x"}, 400),
        ("POST", "/v1/admin/authkeys", a, {"expiry_s": -1}, 400),
        ("POST", "/v1/admin/authkeys", a, {"reusable": "yes"}, 400),
        ("POST", "/v1/admin/authkeys", a, {"tags": [1]}, 400),
        ("DELETE", "/v1/admin/authkeys/nosuch", a, None, 404),
        ("POST", "/v1/admin/apikeys", a, {"role": "root"}, 400),
        ("DELETE", "/v1/admin/apikeys/nosuch", a, None, 404),
        ("PUT", "/v1/admin/policy", a, {}, 400),
        ("PUT", "/v1/admin/policy", a, {"policy": []}, 400),
        ("PUT", "/v1/admin/policy", a, {"policy": {"rules": [{"src": "*"}]}}, 400),
        ("PUT", "/v1/admin/policy", a, {"policy": {}, "if_version": "1"}, 400),
        ("PUT", "/v1/admin/relay-map", a, {"relay_map": {"regions": [{"region_id": 0}]}}, 400),
        ("PUT", "/v1/admin/relay-map", a, {"relay_map": {"regions": [{
            "region_id": 1, "code": "x", "nodes": [{"name": "r", "url": "ftp://x"}]}]}}, 400),
        ("GET", "/v1/admin/audit?after=-1", a, None, 400),
        ("GET", "/v1/admin/audit?limit=%C2%B2", a, None, 400),
        ("GET", "/v1/admin/audit?after=99999999999999999999999", a, None, 400),
        ("POST", "/v1/admin/nodes/%C2%B2/expire", a, None, 404),
        ("POST", "/v1/admin/nodes/99999999999999999999999/expire", a, None, 404),
        ("POST", "/v1/node/update", n, {"endpoints": ["1.2.3.4:\u00b2"]}, 400),
        ("PUT", "/v1/admin/policy", a, {"policy": {"rules": [{"src": ["*"],
                                                             "dst": ["*:\u00b2"]}]}}, 400),
        ("GET", "/v1/nope", None, None, 404),
        ("DELETE", "/v1/register", None, None, 405),
    ]


def test_bad_input_gets_4xx_json_and_changes_nothing(env: dict[str, Any]) -> None:
    before = snapshot(env["admin"])
    for method, path, cred, body, want in bad_requests(env):
        raw = body if isinstance(body, bytes) else None
        r = call(env["url"], method, path, cred, None if raw is not None else body, raw)
        assert r.status_code == want, (method, path, body, r.status_code, r.text)
        err = r.json()
        assert isinstance(err["error"], str) and isinstance(err["message"], str)
    assert snapshot(env["admin"]) == before
    assert env["admin"].audit_verify()["ok"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["node_key", "disco_key", "hostname", "challenge_id", "proof",
                         "auth_key", "rotate_from", "endpoints", "home_relay", "hostinfo",
                         "tags", "reusable", "expiry_s", "policy", "relay_map", "role",
                         "if_version", "rules", "src", "dst", "ip", "port"]) | st.text(max_size=5),
        kids, max_size=5),
    max_leaves=25)

ENDPOINTS = [("POST", "/v1/register/challenge"), ("POST", "/v1/register"),
             ("POST", "/v1/node/update"), ("PUT", "/v1/admin/nodes/1/tags"),
             ("PUT", "/v1/admin/policy"), ("PUT", "/v1/admin/relay-map"),
             ("POST", "/v1/admin/apikeys"), ("GET", "/v1/netmap"),
             ("GET", "/v1/admin/audit"), ("POST", "/v1/admin/nodes/x/expire")]


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), cred=st.sampled_from(["none", "node", "admin",
                                                                  "garbage"]),
       body=json_values | st.binary(max_size=64),
       query=st.dictionaries(st.sampled_from(["since", "after", "limit"]),
                             st.text(max_size=6), max_size=2))
def test_fuzz_endpoints_never_crash(env: dict[str, Any], endpoint: tuple[str, str], cred: str,
                                    body: Any, query: dict[str, str]) -> None:
    method, path = endpoint
    token = {"none": None, "node": env["node"], "admin": env["srv"].admin_key,
             "garbage": "wga_zz"}[cred]
    if path == "/v1/netmap" and cred == "node":
        token = "wgn_0123456789abcdef_" + "x" * 43  # a valid token would open a stream
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.request(method, env["url"] + path, data=raw, params=query, timeout=10,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


def test_server_survives_fuzzing(env: dict[str, Any]) -> None:
    assert requests.get(env["url"] + "/v1/health", timeout=5).json()["ok"]
    assert env["admin"].audit_verify()["ok"]
    assert [n["name"] for n in env["admin"].nodes()] == ["victim"]


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(since=st.integers(0, 2**50).map(str) | st.text(max_size=12)
       | st.sampled_from(["²", "٣", "9" * 19]))
def test_fuzz_stream_resume_sequence(env: dict[str, Any], since: str) -> None:
    """Any ``since`` gets a 400 or a stream that starts with a map or deltas it can apply."""
    from wgmesh import netmap as nm

    with requests.get(env["url"] + "/v1/netmap", params={"since": since}, stream=True,
                      timeout=10, headers={"Authorization": f"Bearer {env['node']}"}) as r:
        if not (since.isascii() and since.isdigit() and len(since) <= 18):
            assert r.status_code == 400 and r.json()["error"] == "bad_request"
            return
        assert r.status_code == 200
        first = nm.decode(next(r.iter_lines()))
        assert isinstance(first, nm.Netmap | nm.NetmapDelta | nm.Keepalive)


def _deep(depth: int, leaf: str) -> str:
    """JSON text nested ``depth`` levels (lists, a dict now and then), built as text."""
    opens = ['{"k":' if i % 50 == 49 else "[" for i in range(depth)]
    return "".join(opens) + leaf + "".join("}" if o != "[" else "]" for o in reversed(opens))


def _text(v: Any) -> str:
    try:
        return json.dumps(v)
    except (RecursionError, ValueError):
        return "null"


shallow = json_values | st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                         10**400, "\ud800", ""])
# Depths around 970 are where the JSON decoder still coped and the encoder no longer did.
depths = st.integers(1, 40) | st.integers(950, 1000) | st.integers(1, 1500)
leaves = st.sampled_from(["null", "NaN", "-Infinity", "1e999", '"x"', "{}"])
hostile = st.builds(_deep, depths, leaves) | shallow.map(_text)
endpoint = st.builds(lambda ip, port: f"{ip}:{port}",
                     st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
                     st.integers(-5, 70000))
hostile_endpoints = st.lists(endpoint.map(json.dumps) | hostile, max_size=40).map(
    lambda xs: "[" + ",".join(xs) + "]") | hostile


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({}, optional={
    "hostinfo": hostile, "endpoints": hostile_endpoints, "home_relay": hostile}))
def test_fuzz_hostile_node_reports_never_break_the_admin_api(env: dict[str, Any],
                                                             fields: dict[str, str]) -> None:
    """A node's own report: a 4xx or stored, and whatever is stored the admin API still lists."""
    raw = ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()
    r = call(env["url"], "POST", "/v1/node/update", env["node"], raw=raw)
    assert r.status_code in (200, 400, 413), r.text
    assert "error" in r.json() if r.status_code >= 400 else r.json()["ok"]
    r = call(env["url"], "GET", "/v1/admin/nodes", env["srv"].admin_key)
    assert r.status_code == 200, r.text


keys = st.binary(min_size=32, max_size=32).map(
    lambda b: json.dumps(base64.b64encode(b).decode()))
texts = st.text(max_size=20).map(json.dumps) | st.sampled_from(['"\\ud800"', '"a\\udfff"'])


@settings(max_examples=examples(100), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid=st.fixed_dictionaries({"node_key": keys, "disco_key": keys, "proof": keys,
                                    "hostname": texts, "challenge_id": texts}),
       hostile_fields=st.fixed_dictionaries({}, optional={
           "node_key": hostile, "disco_key": hostile, "proof": hostile | texts,
           "hostname": hostile, "challenge_id": hostile, "auth_key": hostile | texts,
           "rotate_from": st.sampled_from(['"' + "A" * 43 + '="', '"AQ' + "A" * 41 + '="'])
           | keys | hostile}))
def test_fuzz_registration_bodies_get_4xx(env: dict[str, Any], valid: dict[str, str],
                                          hostile_fields: dict[str, str]) -> None:
    """Registration bodies, mostly well-formed around a hostile field: a 4xx, never a 500."""
    body = {**valid, **hostile_fields}
    raw = ("{" + ",".join(f'"{k}":{v}' for k, v in body.items()) + "}").encode()
    for path in ("/v1/register/challenge", "/v1/register"):
        r = call(env["url"], "POST", path, raw=raw)
        assert r.status_code in (200, 400, 401, 404, 413, 429), (path, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()
