"""Mesh lock core: the chain verifies, every forgery is refused by name, encoding is fixed."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh import lock
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, KeyFormatError
from wgmesh.lock import (
    BadSignature,
    BrokenChain,
    ForkedChain,
    InvalidUpdate,
    LastKeyRemoved,
    LockError,
    LockPrivateKey,
    LockPublicKey,
    LockState,
    MalformedUpdate,
    ReplayedUpdate,
    SignatureOverOtherKey,
    TruncatedChain,
    UntrustedSigner,
    Update,
)

pytestmark = pytest.mark.unit

T0 = 1_700_000_000
NONCE = bytes(range(16))
KNOWN_HEAD = "27d803924229237a179185151f2e78a02e93f92799cec4eea8224aeb14e0ac93"


def admin(i: int) -> LockPrivateKey:
    return LockPrivateKey(hashlib.sha256(b"admin %d" % i).digest())


def node(i: int) -> Key:
    return Key.from_raw(hashlib.sha256(b"node %d" % i).digest())


A, B, C, D, E = (admin(i) for i in range(5))
POOL = [A, B, C, D, E]


def locked(*keys: LockPrivateKey, signer: LockPrivateKey | None = None,
           nonce: bytes = NONCE) -> tuple[list[Update], LockState]:
    """A fresh lock over ``keys``: (chain, state)."""
    g = lock.genesis([k.public for k in keys], signer or keys[0], nonce=nonce, time=T0)
    return [g], lock.verify([g])


def extend(chain: list[Update], state: LockState, update: Update) -> Update:
    lock.apply(state, update)
    chain.append(update)
    return update


def snapshot(state: LockState) -> tuple[object, ...]:
    return state.head, state.seq, state.trusted, state.signed, state.revoked


# --------------------------------------------------------------------------- happy path


def test_lifecycle_init_sign_revoke_add_remove() -> None:
    chain, s = locked(A, B)
    assert s.trusted == {A.public, B.public} and s.lock_id == chain[0].hash == s.head
    assert not s.allows(node(1))

    extend(chain, s, lock.sign_node(s, node(1), A, time=T0 + 1))
    extend(chain, s, lock.sign_node(s, node(2), B, time=T0 + 2))
    extend(chain, s, lock.sign_node(s, node(3), A, time=T0 + 3))
    assert s.allows(node(1)) and s.allows(node(2)) and not s.allows(node(4))

    extend(chain, s, lock.revoke_node(s, node(1), B, time=T0 + 4))
    assert not s.allows(node(1)) and s.is_revoked(node(1))

    extend(chain, s, lock.add_key(s, C.public, B, time=T0 + 5))
    extend(chain, s, lock.sign_node(s, node(4), C, time=T0 + 6))
    assert s.allows(node(4))

    # Removing a lock key withdraws what it signed: a stolen key's nodes go with it.
    extend(chain, s, lock.remove_key(s, A.public, C, time=T0 + 7))
    assert s.trusted == {B.public, C.public}
    assert not s.allows(node(3)) and s.allows(node(2)) and s.allows(node(4))
    extend(chain, s, lock.sign_node(s, node(3), C, time=T0 + 8))
    assert s.allows(node(3))

    assert s.signed == {node(2): B.public, node(3): C.public, node(4): C.public}
    assert s.revoked == {node(1)}
    assert (s.head, s.seq) == (chain[-1].hash, len(chain))
    # The whole chain from scratch says the same, and accepts our last head.
    again = lock.verify(chain, known_head=s.head)
    assert snapshot(again) == snapshot(s)
    # A removed key can no longer sign anything.
    with pytest.raises(UntrustedSigner):
        lock.apply(s, lock.sign_node(s, node(9), A, time=T0 + 9))


def test_genesis_may_be_signed_by_any_of_its_keys() -> None:
    _, s = locked(A, B, signer=B)
    assert s.trusted == {A.public, B.public}


def test_lock_key_text_round_trips_and_private_keys_stay_redacted() -> None:
    pub = A.public
    assert str(pub).startswith("lockpub:") and LockPublicKey.parse(str(pub)) == pub
    assert LockPrivateKey.parse(A.text()).public == pub
    assert A.text().startswith("lockpriv:")
    assert A.text()[9:] not in repr(A) + str(A) and "redacted" in repr(A)
    assert hash(LockPublicKey.parse(str(pub) + "\n")) == hash(pub)


@pytest.mark.parametrize("text", [
    str(node(1)),  # a WireGuard key is not a lock key
    "lockpriv:" + str(node(1)),  # nor is a private key where a public one belongs
    "lockpub:not base64!",
    "lockpub:" + "A" * 40,
    "lockpub:",
])
def test_bad_lock_key_text_is_a_key_format_error(text: str) -> None:
    with pytest.raises(KeyFormatError):
        LockPublicKey.parse(text)


# --------------------------------------------------------------------------- rejections


def test_update_signed_by_an_untrusted_key_is_rejected_and_state_kept() -> None:
    _, s = locked(A, B)
    before = snapshot(s)
    with pytest.raises(UntrustedSigner, match="not a trusted lock key") as e:
        lock.apply(s, lock.sign_node(s, node(1), C, time=T0))
    assert e.value.seq == 1 and isinstance(e.value, WgmeshError)
    assert snapshot(s) == before and not s.allows(node(1))


def test_genesis_signed_by_a_key_it_does_not_trust_is_rejected() -> None:
    g = lock.genesis([A.public], B, nonce=NONCE, time=T0)
    with pytest.raises(UntrustedSigner):
        lock.verify([g])


def test_bad_signature_is_rejected() -> None:
    chain, s = locked(A)
    u = lock.sign_node(s, node(1), A, time=T0)
    forged = dataclasses.replace(u, signature=bytes(64))
    with pytest.raises(BadSignature) as e:
        lock.verify([*chain, forged])
    assert not isinstance(e.value, SignatureOverOtherKey)


def test_signature_moved_onto_another_key_is_rejected() -> None:
    chain, s = locked(A)
    honest = lock.sign_node(s, node(1), A, time=T0)
    # Swapped in place, the signature no longer covers the key.
    with pytest.raises(BadSignature):
        lock.verify([*chain, dataclasses.replace(honest, node_key=node(666))])
    # Copied from an applied update onto a rogue key at the head: named as such.
    extend(chain, s, honest)
    rogue = dataclasses.replace(honest, node_key=node(666), parent=s.head)
    with pytest.raises(SignatureOverOtherKey, match=re.escape(f"#1 (sign-node {node(1)})")):
        lock.apply(s, rogue)
    assert not s.allows(node(666))


def test_forked_chain_is_rejected() -> None:
    chain, s = locked(A, B)
    left = lock.sign_node(s, node(1), A, time=T0)
    right = lock.sign_node(s, node(2), B, time=T0)
    with pytest.raises(ForkedChain):
        lock.verify([*chain, left, right])


def test_truncated_or_rewritten_chain_is_rejected_against_the_known_head() -> None:
    chain, s = locked(A)
    for i in range(3):
        extend(chain, s, lock.sign_node(s, node(i), A, time=T0 + i))
    head = s.head
    assert lock.verify(chain, known_head=chain[2].hash).head == head
    with pytest.raises(TruncatedChain):
        lock.verify(chain[:-1], known_head=head)
    with pytest.raises(TruncatedChain):
        lock.verify([], known_head=head)
    other, _ = locked(A, nonce=bytes(16))  # same admin, a fresh chain
    with pytest.raises(TruncatedChain):
        lock.verify(other, known_head=head)


def test_removing_the_last_trusted_key_is_rejected() -> None:
    chain, s = locked(A, B)
    extend(chain, s, lock.remove_key(s, A.public, A, time=T0))
    with pytest.raises(LastKeyRemoved):
        lock.apply(s, lock.remove_key(s, B.public, B, time=T0))
    assert s.trusted == {B.public}


def test_replayed_update_is_rejected() -> None:
    chain, s = locked(A)
    first = extend(chain, s, lock.sign_node(s, node(1), A, time=T0))
    extend(chain, s, lock.revoke_node(s, node(1), A, time=T0))
    for old in (chain[0], first, chain[-1]):
        with pytest.raises(ReplayedUpdate):
            lock.apply(s, old)
    with pytest.raises(ReplayedUpdate):
        lock.verify([*chain, first])


def test_gaps_and_misplaced_genesis_are_broken_chains() -> None:
    chain, s = locked(A)
    extend(chain, s, lock.sign_node(s, node(1), A, time=T0))
    extend(chain, s, lock.sign_node(s, node(2), A, time=T0))
    other, _ = locked(B)
    for bad in ([chain[0], chain[2]], chain[1:], [*chain, other[0]], []):
        with pytest.raises(BrokenChain):
            lock.verify(bad)


def _invalid_cases() -> dict[str, tuple[list[Update], Update]]:
    """name -> (valid chain, authentic update that makes no sense after it)."""
    cases = {}
    chain, s = locked(A, B)
    extend(chain, s, lock.sign_node(s, node(1), A, time=T0))
    extend(chain, s, lock.revoke_node(s, node(2), A, time=T0))
    extend(chain, s, lock.add_key(s, C.public, A, time=T0))
    extend(chain, s, lock.remove_key(s, C.public, A, time=T0))
    cases["sign twice"] = (chain, lock.sign_node(s, node(1), B, time=T0))
    cases["sign revoked"] = (chain, lock.sign_node(s, node(2), A, time=T0))
    cases["revoke twice"] = (chain, lock.revoke_node(s, node(2), A, time=T0))
    cases["add trusted"] = (chain, lock.add_key(s, B.public, A, time=T0))
    cases["re-add removed"] = (chain, lock.add_key(s, C.public, A, time=T0))
    cases["remove untrusted"] = (chain, lock.remove_key(s, D.public, A, time=T0))
    dup = lock.genesis([A.public, A.public], A, nonce=NONCE, time=T0)
    cases["genesis lists a key twice"] = ([], dup)
    return cases


@pytest.mark.parametrize("name", list(_invalid_cases()))
def test_authentic_but_meaningless_updates_are_rejected(name: str) -> None:
    chain, update = _invalid_cases()[name]
    with pytest.raises(InvalidUpdate):
        lock.verify([*chain, update])


# --------------------------------------------------------------------------- encoding


def test_encoding_is_deterministic_and_pinned() -> None:
    def build() -> list[Update]:
        chain, s = locked(A, B)
        extend(chain, s, lock.sign_node(s, node(1), B, time=T0 + 1))
        extend(chain, s, lock.add_key(s, C.public, A, time=T0 + 2))
        return chain

    first = [u.encode() for u in build()]
    assert [u.encode() for u in build()] == first
    # Known answer (the head hash covers every byte of every update): a change here is a
    # wire-format change and needs a new VERSION.
    assert build()[-1].hash.hex() == KNOWN_HEAD
    assert [len(b) for b in first] == [42 + 17 + 64 + 96, 42 + 32 + 96, 42 + 32 + 96]
    for raw in first:
        assert raw[0] == lock.VERSION
        assert lock.decode_update(raw).encode() == raw


def test_decode_round_trips_every_kind() -> None:
    chain, s = locked(A, B)
    extend(chain, s, lock.sign_node(s, node(1), A, time=T0))
    extend(chain, s, lock.revoke_node(s, node(1), A, time=T0))
    extend(chain, s, lock.add_key(s, C.public, A, time=T0))
    extend(chain, s, lock.remove_key(s, C.public, A, time=T0))
    assert {u.kind for u in chain} == set(lock.Kind)
    assert [lock.decode_update(u.encode()) for u in chain] == chain


@pytest.mark.parametrize("mangle", [
    lambda b: b[:-1], lambda b: b + b"\0", lambda b: b"",
    lambda b: b"\x02" + b[1:],  # an unknown version
    lambda b: b[:1] + b"\x09" + b[2:],  # an unknown kind
])
def test_malformed_bytes_are_refused(mangle: Callable[[bytes], bytes]) -> None:
    _, s = locked(A)
    raw = lock.sign_node(s, node(1), A, time=T0).encode()
    with pytest.raises(MalformedUpdate):
        lock.decode_update(mangle(raw))


# --------------------------------------------------------------------------- properties


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[Update], set[LockPublicKey], dict[Key, LockPublicKey],
                                     set[Key]]:
    """A random valid chain, with what a simple model says its state is."""
    first = draw(st.lists(st.sampled_from(POOL[:3]), min_size=1, max_size=3, unique=True))
    chain, s = locked(*first, nonce=draw(st.binary(min_size=16, max_size=16)))
    trusted = [k for k in POOL if k in first]
    retired: set[LockPrivateKey] = set()
    signed: dict[Key, LockPrivateKey] = {}
    revoked: set[Key] = set()
    ops = draw(st.lists(st.tuples(st.sampled_from(["sign", "revoke", "add", "remove"]),
                                  st.integers(0, 1 << 16)), max_size=10))
    for t, (op, x) in enumerate(ops, start=1):
        signer, n = trusted[x % len(trusted)], node(x % 6)
        if op == "sign" and n not in revoked and signed.get(n) not in trusted:
            signed[n] = signer
            extend(chain, s, lock.sign_node(s, n, signer, time=T0 + t))
        elif op == "revoke" and n not in revoked:
            signed.pop(n, None)
            revoked.add(n)
            extend(chain, s, lock.revoke_node(s, n, signer, time=T0 + t))
        elif op == "add" and (k := POOL[x % len(POOL)]) not in trusted and k not in retired:
            trusted.append(k)
            extend(chain, s, lock.add_key(s, k.public, signer, time=T0 + t))
        elif op == "remove" and len(trusted) > 1:
            gone = trusted[(x // 7) % len(trusted)]
            trusted.remove(gone)
            retired.add(gone)
            extend(chain, s, lock.remove_key(s, gone.public, signer, time=T0 + t))
    allowed = {n: k.public for n, k in signed.items() if k in trusted}
    return chain, {k.public for k in trusted}, allowed, revoked


@settings(max_examples=examples(150), deadline=None)
@given(chains())
def test_random_valid_chains_verify_to_the_model(
        case: tuple[list[Update], set[LockPublicKey], dict[Key, LockPublicKey], set[Key]]) -> None:
    chain, trusted, allowed, revoked = case
    state = lock.verify(chain)
    assert (state.trusted, state.signed, state.revoked) == (trusted, allowed, revoked)
    assert all(state.allows(n) == (n in allowed) for n in map(node, range(6)))
    # Wire round trip, and every earlier head is extended by the full chain.
    decoded = [lock.decode_update(u.encode()) for u in chain]
    for prefix in range(1, len(chain) + 1):
        assert lock.verify(decoded, known_head=chain[prefix - 1].hash).head == state.head


@settings(max_examples=examples(300), deadline=None)
@given(chains(), st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(1, 255))
def test_any_single_byte_mutation_fails_verification(
        case: tuple[list[Update], object, object, object], which: int, where: int,
        xor: int) -> None:
    chain = case[0]
    encoded = [u.encode() for u in chain]
    i = which % len(encoded)
    mutated = bytearray(encoded[i])
    mutated[where % len(mutated)] ^= xor
    encoded[i] = bytes(mutated)
    with pytest.raises(LockError):
        lock.verify([lock.decode_update(b) for b in encoded])


def _genesis_shaped(count: int, body: bytes) -> bytes:
    return bytes([lock.VERSION, lock.Kind.GENESIS]) + bytes(32) + body[:24] + bytes([count]) + (
        body[24:] + bytes(32 * count + 96))[:32 * count + 96]


@settings(max_examples=examples(500))
@given(st.one_of(
    st.binary(max_size=400),
    st.builds(lambda kind, rest: bytes([lock.VERSION, kind]) + rest,
              st.integers(0, 7), st.binary(min_size=150, max_size=400)),
    st.builds(lambda kind, rest: bytes([lock.VERSION, kind]) + rest,
              st.integers(2, 5), st.binary(min_size=168, max_size=168)),
    st.builds(_genesis_shaped, st.integers(0, 4), st.binary(min_size=24, max_size=300)),
))
def test_decoding_arbitrary_bytes_raises_only_lock_errors(data: bytes) -> None:
    try:
        update = lock.decode_update(data)
    except LockError:
        return
    assert update.encode() == data
