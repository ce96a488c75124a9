"""``wgmesh relay serve`` keeps the memory it frees for reuse (``cli.relay._steady_heap``;
benchmarks/README.md, relay workers). The pattern is the relay's own: decoding the runs a
worker gets from the other worker (DELIVER frames of ~32 KiB, eight to a 256 KiB read).
With glibc's defaults that faults in about one fresh page per page decoded; as the relay
tunes it, next to none. Each arm runs in a fresh interpreter, as the tuning is for a whole
process, and builds its input itself (what a process allocated and freed before changes
what glibc does)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

FEEDS = 500
SCRIPT = """
import resource, sys
from wgmesh.relay import FrameDecoder, frame_deliver
if sys.argv[1] == "tuned":
    from wgmesh.cli.relay import _steady_heap
    _steady_heap()
recv = bytes((5,)) + (32 + 1400).to_bytes(4, "big") + bytes(32 + 1400)  # RECV, 1400 bytes
data = frame_deliver(bytes(32), bytes(32), 22, recv * 22) * 8
dec = FrameDecoder()
for _ in range(50):  # the heap grows to what this needs
    dec.feed(data)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    dec.feed(data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, len(data))
"""


def faults(arm: str) -> tuple[int, int]:
    """(page faults, pages decoded) of one arm."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, arm, str(FEEDS)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), FEEDS * int(out[1]) // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_a_relay_decoding_runs_reuses_the_memory_it_freed() -> None:
    tuned, pages = faults("tuned")
    assert tuned < pages // 100, f"{tuned} page faults decoding {pages} pages"
    default, _ = faults("default")  # what the tuning is for (so this test can fail)
    assert default > pages // 2, f"untuned: {default} page faults decoding {pages} pages"
