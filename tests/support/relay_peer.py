"""A node stand-in for relay lab tests: talks to a peer only through RelayClient.

Until a WireGuard device rides on the relay, this carries what a tunnel
would: every payload is sealed end to end with NaCl box under the two node
keys (as WireGuard ciphertext would be), so the relay only ever sees opaque
bytes. Modes::

    relay_peer.py echo   KEYFILE RELAYS                 answer pings
    relay_peer.py ping   KEYFILE RELAYS PEER [--count N] [--forever]
    relay_peer.py send   KEYFILE RELAYS PEER FILE       reliable go-back-N transfer
    relay_peer.py recv   KEYFILE RELAYS PEER OUTFILE

RELAYS is a comma-separated list of URLs (one region, in preference order).
Output is JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time

from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from wgmesh.keys import Key, PrivateKey
from wgmesh.relaynet.client import RelayClient

CHUNK = 1200
WINDOW = 192


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


class Peer:
    def __init__(self, a: argparse.Namespace) -> None:
        self.key = PrivateKey.load(a.keyfile)
        self.peer = Key(a.peer) if getattr(a, "peer", None) else None
        self.boxes: dict[Key, Box] = {}
        self.client = RelayClient(self.key, a.relays.split(","), on_packet=self.on_packet,
                                  backoff_min=0.05, backoff_max=1.0, keepalive=1.0,
                                  idle_timeout=4.0)
        self.inbox: asyncio.Queue[tuple[Key, bytes]] = asyncio.Queue()

    def box(self, k: Key) -> Box:
        b = self.boxes.get(k)
        if b is None:
            b = self.boxes[k] = Box(self.key.nacl(), NaclPublicKey(k.raw))
        return b

    def on_packet(self, src: Key, data: bytes) -> None:
        try:
            plain = self.box(src).decrypt(data)
        except CryptoError:
            return  # not sealed for us (e.g. the test's plaintext control packet)
        self.inbox.put_nowait((src, plain))

    async def send(self, dst: Key, plain: bytes) -> None:
        await self.client.send(dst, bytes(self.box(dst).encrypt(plain)))

    def url(self) -> str | None:
        return self.client.status()["links"][self.client.home_region]["url"]


async def echo(p: Peer) -> None:
    emit(ready=True, key=p.key.public.b64(), url=p.url())
    while True:
        src, msg = await p.inbox.get()
        if msg[:1] == b"P":
            await p.send(src, b"R" + msg[1:])


async def ping(p: Peer, count: int, forever: bool) -> None:
    assert p.peer is not None
    seq = 0
    emit(ready=True, url=p.url())
    while forever or seq < count:
        seq += 1
        t0 = time.monotonic()
        await p.send(p.peer, b"P" + seq.to_bytes(4, "big"))
        try:
            async with asyncio.timeout(0.5):
                while True:
                    _, msg = await p.inbox.get()
                    if msg == b"R" + seq.to_bytes(4, "big"):
                        break
            emit(pong=seq, rtt=time.monotonic() - t0, url=p.url())
        except TimeoutError:
            emit(lost=seq, url=p.url())
        await asyncio.sleep(0.1)


async def send_file(p: Peer, path: str) -> None:
    assert p.peer is not None
    data = open(path, "rb").read()  # noqa: SIM115 - test payloads live in /tmp
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    # a plaintext control packet: the capture test proves it *can* see plaintext
    p.client.send_nowait(p.peer, b"CONTROL-PLAINTEXT-MARKER")
    base, nxt, total = 0, 0, len(chunks)
    last_progress = time.monotonic()
    t0 = last_progress
    done = asyncio.Event()

    async def acks() -> None:
        nonlocal base, last_progress
        while True:
            _, msg = await p.inbox.get()
            if msg[:1] == b"A":
                n = int.from_bytes(msg[1:5], "big")
                if n > base:
                    base, last_progress = n, time.monotonic()
                if n > total:
                    done.set()

    task = asyncio.get_running_loop().create_task(acks())
    while not done.is_set():
        if base >= total:
            await p.send(p.peer, b"F" + total.to_bytes(4, "big"))
            await asyncio.sleep(0.05)
            continue
        if nxt < base:
            nxt = base
        if time.monotonic() - last_progress > 0.3:  # go back N
            nxt, last_progress = base, time.monotonic()
        if nxt < min(base + WINDOW, total):
            await p.send(p.peer, b"D" + nxt.to_bytes(4, "big") + chunks[nxt])
            nxt += 1
        else:
            await asyncio.sleep(0.001)
    task.cancel()
    dt = time.monotonic() - t0
    emit(sent=len(data), sha256=hashlib.sha256(data).hexdigest(), seconds=dt,
         mbps=len(data) * 8 / dt / 1e6)


async def recv_file(p: Peer, out: str) -> None:
    assert p.peer is not None
    emit(ready=True, url=p.url())
    parts: list[bytes] = []
    last_ack = 0.0
    while True:
        src, msg = await p.inbox.get()
        if src != p.peer:
            continue
        kind, n = msg[:1], int.from_bytes(msg[1:5], "big")
        if kind == b"D" and n == len(parts):
            parts.append(msg[5:])
        if kind == b"F" and n == len(parts):
            await p.send(src, b"A" + (n + 1).to_bytes(4, "big"))
            break
        now = time.monotonic()
        if kind == b"D" and (n % 32 == 0 or now - last_ack > 0.02 or n != len(parts) - 1):
            last_ack = now
            await p.send(src, b"A" + len(parts).to_bytes(4, "big"))
    data = b"".join(parts)
    with open(out, "wb") as f:
        f.write(data)
    emit(received=len(data), sha256=hashlib.sha256(data).hexdigest())
    # keep answering a retransmitted FIN briefly, in case our final ack was lost
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            async with asyncio.timeout(0.2):
                src, msg = await p.inbox.get()
        except TimeoutError:
            continue
        if msg[:1] == b"F":
            await p.send(src, b"A" + (len(parts) + 1).to_bytes(4, "big"))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["echo", "ping", "send", "recv"])
    ap.add_argument("keyfile")
    ap.add_argument("relays")
    ap.add_argument("peer", nargs="?")
    ap.add_argument("file", nargs="?")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--forever", action="store_true")
    a = ap.parse_args()
    p = Peer(a)
    await p.client.start(wait=20)
    try:
        if a.mode == "echo":
            await echo(p)
        elif a.mode == "ping":
            await ping(p, a.count, a.forever)
        elif a.mode == "send":
            await send_file(p, a.file)
        else:
            await recv_file(p, a.file)
    finally:
        await p.client.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
