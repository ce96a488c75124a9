"""The home relay is the one with the lowest measured latency: two regions, one of them
40 ms further away (behind a delaying TCP hop; this kernel has no netem)."""

from __future__ import annotations

import asyncio
import functools
import socket
from pathlib import Path

import pytest

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Lab
from wgmesh.netmap import RelayMap, RelayNode, RelayRegion
from wgmesh.relaynet.client import RelayClient
from wgmesh.wireguard.netns import socket_in

pytestmark = pytest.mark.netns

DELAY_HOP = """
import asyncio, sys
listen, target, port, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

async def pump(r, w):
    q = asyncio.Queue()
    async def out():
        while (item := await q.get()) is not None:
            at, data = item
            await asyncio.sleep(max(0, at - asyncio.get_running_loop().time()))
            w.write(data); await w.drain()
        w.close()
    t = asyncio.create_task(out())
    while (data := await r.read(65536)):
        q.put_nowait((asyncio.get_running_loop().time() + delay, data))
    q.put_nowait(None); await t

async def handle(r1, w1):
    r2, w2 = await asyncio.open_connection(target, port)
    await asyncio.gather(pump(r1, w2), pump(r2, w1), return_exceptions=True)

async def main():
    srv = await asyncio.start_server(handle, listen, port)
    print("ready", flush=True)
    await srv.serve_forever()

asyncio.run(main())
"""


def test_home_relay_is_the_nearest(lab: Lab, tmp_path: Path) -> None:
    near, far_relay = lab.add_public_host("near"), lab.add_public_host("farrelay")
    hop = lab.add_public_host("hop")
    node = lab.add_node_host("node", "eim")
    for i, h in enumerate((near, far_relay)):
        lab.python(h, "-m", "wgmesh", "relay", "serve", "--listen", f"{h.ip}:3340",
                   "--stun-port", "-1", "--key-file", str(tmp_path / f"r{i}.key")
                   ).wait_for_output("listening", timeout=60)
    lab.python(hop, "-c", DELAY_HOP, hop.ip, far_relay.ip, "3340", "0.04"
               ).wait_for_output("ready")
    relay_map = RelayMap(regions=(
        RelayRegion(1, "far", nodes=(RelayNode("far", f"http://{hop.ip}:3340"),)),
        RelayRegion(2, "near", nodes=(RelayNode("near", f"http://{near.ip}:3340"),))))

    async def main() -> tuple[int | None, dict[str, float | None]]:
        client = RelayClient(PrivateKey.generate(), relay_map,
                             make_socket=functools.partial(socket_in, node.ns,
                                                           type=socket.SOCK_STREAM))
        await client.start(wait=10)
        try:
            return client.home_region, dict(client.node_rtt)
        finally:
            await client.close()

    home, rtts = asyncio.run(main())
    far_rtt, near_rtt = rtts[f"http://{hop.ip}:3340"], rtts[f"http://{near.ip}:3340"]
    assert far_rtt is not None and near_rtt is not None
    assert far_rtt >= 0.075 and far_rtt > near_rtt + 0.04, rtts  # 40 ms each way via the hop
    assert home == 2, (home, rtts)
