"""``wgmesh relay serve`` and ``wgmesh up`` keep the memory they free for reuse
(``libc.steady_heap``; benchmarks/README.md, relay workers and relay bridge). Two patterns:
the relay's own, decoding the runs a worker gets from the other worker (DELIVER frames of
~32 KiB, eight to a 256 KiB read), and a relay client's, reading a busy connection with
256 KiB reads (asyncio's) and decoding the RECV frames. Each arm runs in a fresh
interpreter, as the tuning is for a whole process, and builds its input itself.

glibc's thresholds start at 128 KiB and then move with what the process allocated and
freed before, so whether an untuned process gives memory back on a given pattern depends
on its history (a busy relay did: 60,000-120,000 faults a second), down to the size of
the modules it imported: one property more on FrameDecoder turned the untuned relay
pattern from ~1 fault per page into none. Both arms therefore run with glibc's initial
thresholds pinned (``GLIBC_TUNABLES``: 128 KiB each, no moving): untuned that faults in
about one fresh page per page decoded, so the test can fail; tuned (``steady_heap``
overrides them), next to none."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

FEEDS = 500
#: glibc's documented initial mmap and trim thresholds, pinned (no dynamic adjustment)
GLIBC_INITIAL = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
SETUP = """
import resource, socket, sys
from wgmesh.relay import FrameDecoder, frame_deliver
if sys.argv[1] == "tuned":
    from wgmesh.libc import steady_heap
    steady_heap()
recv = bytes((5,)) + (32 + 1400).to_bytes(4, "big") + bytes(32 + 1400)  # RECV, 1400 bytes
dec = FrameDecoder()
"""
PATTERNS = {
    "relay": """
data = frame_deliver(bytes(32), bytes(32), 22, recv * 22) * 8
def one():
    dec.feed(data)
""",
    "client": """
data = recv * 90  # ~129 KiB: what one read of a busy relay connection brings
a, b = socket.socketpair()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
def one():
    a.sendall(data)
    got = 0
    while got < len(data):
        chunk = b.recv(256 * 1024)
        got += len(chunk)
        dec.feed(chunk)
""",
}
MEASURE = """
for _ in range(50):  # the heap grows to what this needs
    one()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    one()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, len(data))
"""


def faults(pattern: str, arm: str) -> tuple[int, int]:
    """(page faults, pages decoded) of one arm."""
    script = SETUP + PATTERNS[pattern] + MEASURE
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_INITIAL}
    out = subprocess.run([sys.executable, "-c", script, arm, str(FEEDS)], check=True,
                         capture_output=True, text=True, env=env).stdout.split()
    return int(out[0]), FEEDS * int(out[1]) // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_streaming_frames_reuses_the_memory_it_freed(pattern: str) -> None:
    tuned, pages = faults(pattern, "tuned")
    assert tuned < pages // 100, f"{tuned} page faults decoding {pages} pages"
    default, _ = faults(pattern, "default")  # what the tuning is for (so this test can fail)
    assert default > pages // 2, f"untuned: {default} page faults decoding {pages} pages"
