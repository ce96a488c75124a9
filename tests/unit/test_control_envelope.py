"""The control key envelope (wgmesh.control.envelope): answers and streams bound to the key."""

from __future__ import annotations

import os
import re

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh.control.envelope import (
    ControlKey,
    ControlKeyMismatch,
    ControlSigner,
    ControlTrustError,
    StreamVerifier,
    split_authkey,
    verify_answer,
)
from wgmesh.errors import WgmeshError
from wgmesh.keys import PrivateKey

pytestmark = pytest.mark.unit

SIGNER = ControlSigner(bytes(range(32)))
NODE = PrivateKey(bytes(range(1, 33)))
NONCE = bytes(32)
MAP = b'{"type":"netmap","seq":3,"peers":[]}'
DELTA = b'{"type":"delta","seq":4,"peers_removed":[7]}'


def stream(node: PrivateKey = NODE, nonce: bytes = NONCE, chunks: tuple[bytes, ...] = (
        MAP[:10], MAP[10:] + b"\n" + DELTA + b"\n")) -> list[bytes]:
    """The lines control writes for ``chunks`` (which split and join lines freely)."""
    session, sealer = SIGNER.open_stream(node.public, nonce, bytes(range(2, 34)))
    return (session + b"".join(sealer.feed(c) for c in chunks)).split(b"\n")[:-1]


def verify(lines: list[bytes], pinned: ControlKey | None = SIGNER.public,
           node: PrivateKey = NODE, nonce: bytes = NONCE) -> list[bytes]:
    v = StreamVerifier(node, nonce, pinned)
    return [m for line in lines if (m := v.feed(line)) is not None]


def test_keys_print_and_parse() -> None:
    text = str(SIGNER.public)
    assert text.startswith("ctrlkey:") and ControlKey.parse(text) == SIGNER.public
    assert ControlSigner.from_text(SIGNER.text()).public == SIGNER.public
    with pytest.raises(WgmeshError, match="not a control key"):
        ControlKey.parse("ctrlkey:AAAA")
    with pytest.raises(WgmeshError, match="not a private control key"):
        ControlSigner.from_text(text)
    assert split_authkey("wgk_1_x") == ("wgk_1_x", None)
    assert split_authkey(f"wgk_1_x#{text}") == ("wgk_1_x", SIGNER.public)


def test_a_stream_verifies_line_by_line_whatever_the_chunking() -> None:
    assert verify(stream()) == [MAP, DELTA]
    assert verify(stream(chunks=(MAP + b"\n", DELTA[:1], DELTA[1:] + b"\n"))) == [MAP, DELTA]
    v = StreamVerifier(NODE, NONCE, None)  # trust on first use learns the key
    for line in stream():
        v.feed(line)
    assert v.key == SIGNER.public


def test_a_changed_reordered_or_dropped_line_is_refused() -> None:
    lines = stream()
    changed = [*lines[:3], DELTA.replace(b"7", b"8"), *lines[4:]]
    with pytest.raises(ControlTrustError, match="line 1 failed"):
        verify(changed)
    with pytest.raises(ControlTrustError, match="line 0 failed"):
        verify([lines[0], *lines[3:5]])  # the delta moved up to where the map was


def test_a_stream_cannot_be_replayed_to_another_node_or_stream() -> None:
    lines = stream()
    with pytest.raises(ControlTrustError, match="bad signature"):
        verify(lines, node=PrivateKey.generate())
    with pytest.raises(ControlTrustError, match="bad signature"):
        verify(lines, nonce=os.urandom(32))
    # The right session line spliced in front of another stream's lines.
    other = stream(nonce=b"\1" * 32)
    with pytest.raises(ControlTrustError, match="line 0 failed"):
        verify([lines[0], *other[1:]])


def test_another_control_key_is_refused_before_anything_else() -> None:
    other = ControlSigner(os.urandom(32)).public
    with pytest.raises(ControlKeyMismatch, match=re.escape(
            f"presented key {SIGNER.public}, not the pinned key {other}")):
        verify(stream(), pinned=other)
    with pytest.raises(ControlTrustError, match="did not open an authenticated session"):
        verify([MAP])


def test_answers_are_bound_to_node_nonce_and_body() -> None:
    sig = SIGNER.sign_answer(NODE.public, NONCE, b"{}")
    key = str(SIGNER.public)
    assert verify_answer(None, key, NODE.public, NONCE, b"{}", sig) == SIGNER.public
    for node, nonce, body in ((PrivateKey.generate().public, NONCE, b"{}"),
                              (NODE.public, b"\1" * 32, b"{}"),
                              (NODE.public, NONCE, b"{ }")):
        with pytest.raises(ControlTrustError, match="bad signature"):
            verify_answer(SIGNER.public, key, node, nonce, body, sig)
    with pytest.raises(ControlKeyMismatch):
        verify_answer(ControlSigner(os.urandom(32)).public, key, NODE.public, NONCE, b"{}", sig)
    with pytest.raises(ControlTrustError, match="did not sign"):
        verify_answer(SIGNER.public, None, NODE.public, NONCE, b"{}", None)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.integers(0, 4), st.binary(max_size=8))
def test_fuzz_the_verifier_refuses_cleanly(junk: list[bytes], at: int, flip: bytes) -> None:
    """Arbitrary lines, or a genuine stream with bytes spliced in, never verify and never
    raise anything but ControlTrustError."""
    lines = stream()
    for candidate in (junk, [*lines[:at], *junk, *lines[at:]],
                      [*lines[:at], lines[at] + flip, *lines[at + 1:]] if flip else junk):
        if candidate == lines:
            continue
        try:
            out = verify(candidate)
        except ControlTrustError:
            continue
        # Whatever did verify is a prefix of what control sent.
        assert out == [MAP, DELTA][:len(out)]
