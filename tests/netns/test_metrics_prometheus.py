"""Prometheus metrics, proven with a real Prometheus (Debian's ``prometheus``).

In the lab, Prometheus runs in node ``a``'s namespace (behind its NAT, as a
monitoring box would sit in a site network) and scrapes control (with an admin
API key), a relay and ``a``'s agent (``--metrics-listen``); the test asks its
HTTP API for peer ``b``'s path and bytes and compares them with ``a``'s status.
On loopback: the relay's content negotiation (JSON stays the default) and who
may read control's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from polling import wait_for
from systools import need

from wgmesh.control.server import ControlServer
from wgmesh.lab.mesh import CONTROL_PORT, RELAY_PORT, MeshLab
from wgmesh.lab.network import Host, Lab
from wgmesh.relaynet.server import RelayServer

pytestmark = pytest.mark.netns

NODE_METRICS_PORT = 9101
PROM = "127.0.0.1:9090"  # inside a's namespace


def prometheus_config(mesh: MeshLab, node: Host, key_file: Path) -> str:
    """Scrape every second: control (HTTPS, admin key), the first relay, ``node``'s agent."""
    jobs = [
        {"job_name": "control", "scheme": "https", "tls_config": {"ca_file": mesh.control_ca},
         "authorization": {"credentials_file": str(key_file)},
         "static_configs": [{"targets": [f"{mesh.control.ip}:{CONTROL_PORT}"]}]},
        {"job_name": "relay",
         "static_configs": [{"targets": [f"{mesh.relay_hosts[0].ip}:{RELAY_PORT}"]}]},
        {"job_name": "node",
         "static_configs": [{"targets": [f"{node.ip}:{NODE_METRICS_PORT}"]}]},
    ]
    return json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                       "scrape_configs": jobs})  # JSON is YAML


def query(lab: Lab, host: Host, promql: str) -> dict[str, float]:
    """Prometheus' instant query from ``host``'s namespace: {label string: value}."""
    url = f"http://{PROM}/api/v1/query?query={quote(promql)}"
    cp = lab.run(host, [sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                        f"urllib.request.urlopen({url!r}, timeout=5).read().decode())"])
    doc: dict[str, Any] = json.loads(cp.stdout)
    assert doc["status"] == "success", doc
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
            for r in doc["data"]["result"]}


def one(lab: Lab, host: Host, promql: str) -> float | None:
    got = query(lab, host, promql)
    return next(iter(got.values())) if len(got) == 1 else None


def test_prometheus_scrapes_control_relay_and_a_node(lab: Lab) -> None:
    prometheus = need("prometheus")
    mesh = MeshLab(lab, relays=1, metrics_allow="0.0.0.0/0")
    a = mesh.add_node("a", "eim", metrics_port=NODE_METRICS_PORT)
    mesh.add_node("b", "eim")
    data = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-prom-"))
    proc = None
    try:
        (data / "prometheus.yml").write_text(prometheus_config(mesh, a.host, mesh.api_key_file))
        proc = lab.spawn(a.host, [prometheus, f"--config.file={data / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={data / 'tsdb'}",
                                  f"--web.listen-address={PROM}"])
        mesh.wait_connected()
        wait_for(lambda: (p := a.peer("b")) and p["path"] == "direct", timeout=60,
                 what="a reaches b directly")
        # every target scraped and up: control took the admin key, the relay the allow-list
        wait_for(lambda: query(lab, a.host, "up") and all(
            v == 1 for v in query(lab, a.host, "up").values())
            and len(query(lab, a.host, "up")) == 3, timeout=60, what="three targets up", interval=0.5)
        # the peer's path, as Prometheus saw it, is what a's status says
        wait_for(lambda: one(lab, a.host,
                             'wgmesh_node_peer_path{name="b",path="direct"}') == 1,
                 timeout=30, what="b direct in Prometheus", interval=0.5)
        assert one(lab, a.host, 'wgmesh_node_peer_path{name="b",path="relay"}') == 0
        assert a.peer("b")["path"] == "direct"  # type: ignore[index]
        # bytes (a ping makes some): a scrape after one status read, before the next
        wait_for(lambda: a.ping("b", timeout=1)["rtt_ms"] is not None, what="a pings b")
        before = a.peer("b")["rx_bytes"]  # type: ignore[index]
        assert before > 0
        seen = wait_for(lambda: (v := one(lab, a.host,
                                          'wgmesh_node_peer_rx_bytes_total{name="b"}'))
                        and v >= before and v, timeout=30, what="a scrape after the status", interval=0.5)
        assert before <= seen <= a.peer("b")["rx_bytes"]  # type: ignore[index]
        key = a.peer("b")["key"]  # type: ignore[index]
        assert set(query(lab, a.host, 'wgmesh_node_peer_tx_bytes_total{name="b"}')) == {
            json.dumps({"__name__": "wgmesh_node_peer_tx_bytes_total", "instance":
                        f"{a.host.ip}:{NODE_METRICS_PORT}", "job": "node", "key": key,
                        "name": "b"}, sort_keys=True)}
        # the relay and control as seen by the same Prometheus
        wait_for(lambda: one(lab, a.host, "wgmesh_relay_clients") == 2, timeout=30,
                 what="both nodes on the relay", interval=0.5)
        assert one(lab, a.host, 'wgmesh_relay_frames_total{direction="in"}') is not None
        assert one(lab, a.host, "wgmesh_control_streams") == 2
        assert one(lab, a.host, 'wgmesh_control_registrations_total{result="ok"}') == 2
        assert (one(lab, a.host, "wgmesh_control_audit_entries") or 0) >= 1
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(data, ignore_errors=True)
        mesh.close()


def test_relay_metrics_json_by_default_prometheus_when_asked() -> None:
    async def main() -> None:
        async with RelayServer(host="127.0.0.1") as srv:
            await srv.start()
            for accept, ctype in (("", "application/json"),
                                  ("text/plain;version=0.0.4", "text/plain; version=0.0.4"),
                                  ("application/openmetrics-text;version=1.0.0",
                                   "application/openmetrics-text")):
                r, w = await asyncio.open_connection("127.0.0.1", srv.port)
                w.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                        f"{f'Accept: {accept}' + chr(13) + chr(10) if accept else ''}"
                        "\r\n".encode())
                head, _, body = (await r.read()).partition(b"\r\n\r\n")
                w.close()
                assert f"Content-Type: {ctype}".encode() in head, (accept, head)
                if accept:
                    assert b"wgmesh_relay_clients 0" in body
                else:
                    assert json.loads(body)["clients"] == 0

    asyncio.run(main())


def test_control_metrics_need_an_admin_key_outside_the_allow_list(tmp_path: Path) -> None:
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path,
                       metrics_allow=["192.0.2.0/24"]) as srv:  # loopback not allowed
        assert requests.get(f"{srv.url}/metrics", timeout=10).status_code == 401
        r = requests.get(f"{srv.url}/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {srv.admin_key}"})
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "\nwgmesh_control_policy_version " in r.text
        assert 'wgmesh_control_store_seconds_count{op="audit_count"}' in r.text
    with ControlServer(listen="127.0.0.1:0", state_dir=tmp_path / "b") as srv:
        assert requests.post(f"{srv.url}/v1/register", json={}, timeout=10).status_code == 400
        r = requests.get(f"{srv.url}/metrics", timeout=10)  # loopback: no key needed
        assert r.status_code == 200
        assert ('wgmesh_control_registrations_total{reason="bad_request",result="refused"} 1.0'
                in r.text)


def test_agent_refuses_metrics_on_every_network(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "wgmesh", "up", "--control", "http://127.0.0.1:9",
                         "--state-dir", str(tmp_path / "st"), "--socket",
                         str(tmp_path / "a.sock"), "--metrics-listen", "0.0.0.0:9101"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0
    assert cp.stderr.count("\n") == 1 and "--metrics-listen-any" in cp.stderr
