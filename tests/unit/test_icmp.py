"""``wgmesh ping``'s ICMP echo in an agent with many open sockets."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest

from wgmesh.node.icmp import echo

pytestmark = pytest.mark.unit


@pytest.fixture
def fds_past_1023() -> Iterator[None]:
    """A hard-NAT agent holds hundreds of search sockets: the netns run saw 1045 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP socket needs root")
def test_echo_works_with_a_file_descriptor_past_1023(fds_past_1023: None) -> None:
    assert echo("127.0.0.1", timeout=5) is not None
