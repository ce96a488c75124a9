"""Mesh lock: admin-signed membership that even the control service cannot forge.

Lock state is a hash chain of updates. The genesis names the first trusted lock keys
(Ed25519, held by admins and never by the control service); every later update names
its parent's hash and is signed by a key trusted at that point of the chain. Nodes
verify the chain themselves and configure a peer only when ``LockState.allows`` its
node key, so the control service can store, order and withhold updates but cannot add
a node, trust a key, or undo a revocation.

Sans-I/O on purpose: signing keys, nonces and timestamps come in as arguments, so the
same code runs in the admin CLI, the node and the tests, with no clock or randomness.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, KeyFormatError

__all__ = [
    "BadSignature", "BrokenChain", "ForkedChain", "InvalidUpdate", "Kind", "LastKeyRemoved",
    "LockError", "LockPrivateKey", "LockPublicKey", "LockState", "MalformedUpdate",
    "ReplayedUpdate", "SignatureOverOtherKey", "TruncatedChain", "UntrustedSigner", "Update",
    "add_key", "apply", "decode_update", "genesis", "remove_key", "revoke_node", "sign_node",
    "verify",
]

VERSION = 1
KEY_LEN = 32
SIG_LEN = 64
HASH_LEN = 32
NONCE_LEN = 16
NO_PARENT = bytes(HASH_LEN)
#: Domain separation: a lock signature can never be mistaken for any other Ed25519 use.
SIG_DOMAIN = b"wgmesh-lock-update-v1\x00"
HASH_DOMAIN = b"wgmesh-lock-hash-v1\x00"
PUB_PREFIX = "lockpub:"
PRIV_PREFIX = "lockpriv:"
_HEAD = 1 + 1 + HASH_LEN + 8  # version, kind, parent, time
_TAIL = KEY_LEN + SIG_LEN  # signer, signature


# --------------------------------------------------------------------------- errors


class LockError(WgmeshError):
    """The lock chain or an update is not acceptable; ``seq`` is the offending update's place."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"lock update #{seq}: {message}")
        self.seq = seq


class MalformedUpdate(LockError):
    """The bytes are not a well-formed update of a known version."""


class UntrustedSigner(LockError):
    """The signer is not a trusted lock key at this point of the chain."""


class BadSignature(LockError):
    """The signature does not verify under the named signer."""


class SignatureOverOtherKey(BadSignature):
    """A signature lifted from another update (say, another node's) was reused here."""


class BrokenChain(LockError):
    """The update does not link to the head: a gap, a second genesis, or an empty chain."""


class ForkedChain(LockError):
    """Two updates claim the same parent; a node follows one linear history only."""


class TruncatedChain(LockError):
    """The chain does not contain the head this node last verified (cut short or rewritten)."""


class ReplayedUpdate(LockError):
    """The update is already in the chain."""


class LastKeyRemoved(LockError):
    """Removing the last trusted key would leave a lock nobody can administer."""


class InvalidUpdate(LockError):
    """Signed and linked, but it makes no sense in this state (e.g. signing a revoked key)."""


# --------------------------------------------------------------------------- keys


def _b64_key(text: str, prefix: str) -> bytes:
    if not text.startswith(prefix):
        raise KeyFormatError(f"lock key must start with {prefix!r}")
    try:
        raw = base64.b64decode(text[len(prefix):], validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyFormatError("lock key is not valid base64") from e
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"lock key must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True, repr=False)
class LockPublicKey:
    """An Ed25519 lock key, printed as ``lockpub:<base64>`` so it is never confused with a
    WireGuard key (both are 32 bytes of base64)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"lock key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> LockPublicKey:
        return cls(_b64_key(text.strip(), PUB_PREFIX))

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            VerifyKey(self.raw).verify(message, signature)
        except (CryptoError, ValueError):
            return False
        return True

    def short(self) -> str:
        return str(self)[: len(PUB_PREFIX) + 8]

    def __str__(self) -> str:
        return PUB_PREFIX + base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:
        return f"LockPublicKey({str(self)!r})"


class LockPrivateKey:
    """The admin half of a lock key: a 32-byte Ed25519 seed, redacted in ``repr``/``str``.

    Made from a seed the caller draws (``secrets.token_bytes(32)``) so this module stays
    free of randomness; ``text()`` is the one deliberate way to print it.
    """

    __slots__ = ("_signing",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_LEN:
            raise KeyFormatError(f"lock key seed must be {KEY_LEN} bytes, got {len(seed)}")
        self._signing = SigningKey(bytes(seed))

    @classmethod
    def parse(cls, text: str) -> LockPrivateKey:
        return cls(_b64_key(text.strip(), PRIV_PREFIX))

    @property
    def public(self) -> LockPublicKey:
        return LockPublicKey(bytes(self._signing.verify_key))

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def text(self) -> str:
        return PRIV_PREFIX + base64.b64encode(bytes(self._signing)).decode()

    def __repr__(self) -> str:
        return f"LockPrivateKey(<redacted>, public={self.public.short()})"

    __str__ = __repr__


# --------------------------------------------------------------------------- updates


class Kind(enum.IntEnum):
    """Update kinds; the numbers are wire values and never change."""

    GENESIS = 1
    ADD_KEY = 2
    REMOVE_KEY = 3
    SIGN_NODE = 4
    REVOKE_NODE = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


_NODE_KINDS = (Kind.SIGN_NODE, Kind.REVOKE_NODE)
_KEY_KINDS = (Kind.ADD_KEY, Kind.REMOVE_KEY)


@dataclass(frozen=True)
class Update:
    """One signed link of the chain (an AUM in Tailscale's words).

    Wire form, all fixed-width so there is exactly one encoding and no parser leeway::

        version:1 kind:1 parent:32 time:8 payload signer:32 signature:64
        payload  genesis: nonce:16 count:1 key:32*count
                 add-key / remove-key: lock key:32    sign-node / revoke-node: node key:32

    The signature covers every byte before it (prefixed by ``SIG_DOMAIN``); the hash, the
    next update's ``parent``, covers all of it.
    """

    kind: Kind
    parent: bytes
    time: int
    signer: LockPublicKey
    signature: bytes
    lock_keys: tuple[LockPublicKey, ...] = ()
    node_key: Key | None = None
    nonce: bytes = b""

    def __post_init__(self) -> None:
        genesis = self.kind is Kind.GENESIS
        if len(self.parent) != HASH_LEN or genesis != (self.parent == NO_PARENT):
            raise MalformedUpdate("only the genesis has no parent")
        if not 0 <= self.time < 1 << 64 or len(self.signature) != SIG_LEN:
            raise MalformedUpdate("time or signature out of range")
        if len(self.nonce) != (NONCE_LEN if genesis else 0):
            raise MalformedUpdate(f"the genesis (only) carries a {NONCE_LEN}-byte nonce")
        keys = len(self.lock_keys)
        # genesis: 1 to 255 keys; add-key / remove-key: exactly one; node updates: none
        wrong = not 0 < keys < 256 if genesis else keys != int(self.kind in _KEY_KINDS)
        if wrong:
            raise MalformedUpdate(f"{self.kind.label} carries the wrong number of lock keys")
        if (self.kind in _NODE_KINDS) != (self.node_key is not None):
            raise MalformedUpdate(f"{self.kind.label} carries the wrong node key")

    def body(self) -> bytes:
        """Everything the signature covers."""
        if self.kind is Kind.GENESIS:
            payload = self.nonce + bytes([len(self.lock_keys)])
            payload += b"".join(k.raw for k in self.lock_keys)
        elif self.node_key is not None:
            payload = self.node_key.raw
        else:
            payload = self.lock_keys[0].raw
        return (bytes([VERSION, self.kind]) + self.parent + self.time.to_bytes(8, "big")
                + payload + self.signer.raw)

    def encode(self) -> bytes:
        return self.body() + self.signature

    @cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(HASH_DOMAIN + self.encode()).digest()

    def describe(self) -> str:
        """``sign-node <key>``: for status output and error messages."""
        if self.node_key is not None:
            subject = str(self.node_key)
        else:
            subject = " ".join(str(k) for k in self.lock_keys)
        return f"{self.kind.label} {subject}"


def decode_update(data: bytes) -> Update:
    """Parse one update; anything but exactly one well-formed update is ``MalformedUpdate``."""
    if len(data) < _HEAD + KEY_LEN + _TAIL or data[0] != VERSION:
        raise MalformedUpdate("not a version-1 lock update")
    try:
        kind = Kind(data[1])
    except ValueError:
        raise MalformedUpdate(f"unknown update kind {data[1]}") from None
    size = NONCE_LEN + 1 + data[_HEAD + NONCE_LEN] * KEY_LEN if kind is Kind.GENESIS else KEY_LEN
    if len(data) != _HEAD + size + _TAIL:
        raise MalformedUpdate(f"{kind.label} update has the wrong length {len(data)}")
    payload, tail = data[_HEAD:_HEAD + size], data[_HEAD + size:]
    nonce, node_key = b"", None
    lock_keys: tuple[LockPublicKey, ...] = ()
    if kind is Kind.GENESIS:
        nonce, raw_keys = payload[:NONCE_LEN], payload[NONCE_LEN + 1:]
        lock_keys = tuple(LockPublicKey(raw_keys[i:i + KEY_LEN])
                          for i in range(0, len(raw_keys), KEY_LEN))
    elif kind in _NODE_KINDS:
        node_key = Key.from_raw(payload)
    else:
        lock_keys = (LockPublicKey(payload),)
    return Update(kind=kind, parent=data[2:2 + HASH_LEN],
                  time=int.from_bytes(data[2 + HASH_LEN:_HEAD], "big"),
                  signer=LockPublicKey(tail[:KEY_LEN]), signature=tail[KEY_LEN:],
                  lock_keys=lock_keys, node_key=node_key, nonce=nonce)


# --------------------------------------------------------------------------- state


class LockState:
    """What a verified chain says now. Mutated only by ``apply``, which checks first, so a
    rejected update leaves it exactly as it was."""

    def __init__(self, first: Update) -> None:
        if first.kind is not Kind.GENESIS:
            raise BrokenChain("the chain must start with a genesis", 0)
        if len(set(first.lock_keys)) != len(first.lock_keys):
            raise InvalidUpdate("the genesis lists a lock key twice", 0)
        _check_signature(first, first.lock_keys, {}, 0)
        self.lock_id: bytes = first.hash  #: names this mesh's lock; fixed for its life
        self.head: bytes = first.hash
        self.seq = 1  #: updates applied, so the next one's place in the chain
        self._trusted = set(first.lock_keys)
        self._retired: set[LockPublicKey] = set()
        self._signed: dict[Key, LockPublicKey] = {}
        self._revoked: set[Key] = set()
        self._seen = {first.hash}
        self._sigs = {first.signature: f"#0 ({first.kind.label})"}

    def allows(self, node_key: Key) -> bool:
        """May this node key be a peer? Signed by a key that is still trusted, not revoked."""
        return self._signed.get(node_key) in self._trusted and node_key not in self._revoked

    def is_revoked(self, node_key: Key) -> bool:
        return node_key in self._revoked

    def label(self, node_key: Key) -> str:
        """For status output: "signed", "needs signature" or "revoked"."""
        if self.allows(node_key):
            return "signed"
        return "revoked" if node_key in self._revoked else "needs signature"

    def contains(self, update_hash: bytes) -> bool:
        return update_hash in self._seen

    @property
    def trusted(self) -> frozenset[LockPublicKey]:
        return frozenset(self._trusted)

    @property
    def signed(self) -> dict[Key, LockPublicKey]:
        """Allowed node keys and the lock key that signed each."""
        return {k: s for k, s in self._signed.items() if self.allows(k)}

    @property
    def revoked(self) -> frozenset[Key]:
        return frozenset(self._revoked)


def _check_signature(update: Update, trusted: Collection[LockPublicKey],
                     sigs: dict[bytes, str], seq: int) -> None:
    if update.signer not in trusted:
        raise UntrustedSigner(f"signed by {update.signer.short()}, not a trusted lock key", seq)
    if not update.signer.verify(SIG_DOMAIN + update.body(), update.signature):
        if update.signature in sigs:
            raise SignatureOverOtherKey(
                f"{update.describe()} carries the signature of update {sigs[update.signature]}",
                seq)
        raise BadSignature(f"{update.describe()}: signature does not verify", seq)


def apply(state: LockState, update: Update) -> None:
    """Verify one update against ``state`` and advance it: O(1), for deltas from control."""
    seq = state.seq
    if update.hash in state._seen:
        raise ReplayedUpdate(f"{update.describe()} is already in the chain", seq)
    if update.kind is Kind.GENESIS:
        raise BrokenChain("a second genesis", seq)
    if update.parent != state.head:
        if update.parent in state._seen:
            raise ForkedChain(f"{update.describe()} forks from an earlier update", seq)
        raise BrokenChain(f"{update.describe()} has an unknown parent (missing updates)", seq)
    _check_signature(update, state._trusted, state._sigs, seq)
    _check_semantics(state, update, seq)
    kind, node = update.kind, update.node_key
    if kind is Kind.ADD_KEY:
        state._trusted.add(update.lock_keys[0])
    elif kind is Kind.REMOVE_KEY:
        state._trusted.discard(update.lock_keys[0])
        state._retired.add(update.lock_keys[0])
    elif node is not None and kind is Kind.SIGN_NODE:
        state._signed[node] = update.signer
    elif node is not None:
        state._signed.pop(node, None)
        state._revoked.add(node)
    state.head = update.hash
    state._seen.add(update.hash)
    state._sigs[update.signature] = f"#{seq} ({update.describe()})"
    state.seq += 1


def _check_semantics(state: LockState, update: Update, seq: int) -> None:
    """Reject updates that are authentic but meaningless, keeping the chain unambiguous."""
    kind, node = update.kind, update.node_key
    if kind in _KEY_KINDS:
        key = update.lock_keys[0]
        if kind is Kind.ADD_KEY and key in state._trusted:
            raise InvalidUpdate(f"{key} is already trusted", seq)
        if kind is Kind.ADD_KEY and key in state._retired:
            raise InvalidUpdate(f"{key} was removed; a removed lock key never returns", seq)
        if kind is Kind.REMOVE_KEY and key not in state._trusted:
            raise InvalidUpdate(f"{key} is not trusted", seq)
        if kind is Kind.REMOVE_KEY and len(state._trusted) == 1:
            raise LastKeyRemoved(f"{key} is the last trusted lock key", seq)
    elif node is not None:
        if node in state._revoked:
            raise InvalidUpdate(f"node {node} is revoked; revocation is final", seq)
        if kind is Kind.SIGN_NODE and state.allows(node):
            raise InvalidUpdate(f"node {node} is already signed", seq)


def verify(chain: Sequence[Update], known_head: bytes | None = None) -> LockState:
    """Verify a whole chain from its genesis. ``known_head`` is the head this node verified
    before: a chain that does not contain it was cut short or rewritten, and is refused."""
    if not chain:
        if known_head is not None:
            raise TruncatedChain("control sent no lock chain, but this node verified one")
        raise BrokenChain("empty lock chain")
    state = LockState(chain[0])
    for update in chain[1:]:
        apply(state, update)
    if known_head is not None and not state.contains(known_head):
        raise TruncatedChain(f"the chain does not contain the last verified head "
                             f"{known_head.hex()[:16]}: it was cut short or rewritten")
    return state


# --------------------------------------------------------------------------- builders


def _signed(signer: LockPrivateKey, kind: Kind, parent: bytes, time: int, *,
            lock_keys: tuple[LockPublicKey, ...] = (), node_key: Key | None = None,
            nonce: bytes = b"") -> Update:
    unsigned = Update(kind=kind, parent=parent, time=time, signer=signer.public,
                      signature=bytes(SIG_LEN), lock_keys=lock_keys, node_key=node_key,
                      nonce=nonce)
    return dataclasses.replace(unsigned, signature=signer.sign(SIG_DOMAIN + unsigned.body()))


def genesis(keys: Sequence[LockPublicKey], signer: LockPrivateKey, *, nonce: bytes,
            time: int) -> Update:
    """Lock a mesh. ``signer`` must be one of ``keys`` (proving an admin holds it); the
    random ``nonce`` makes two meshes with the same admins distinct chains."""
    return _signed(signer, Kind.GENESIS, NO_PARENT, time,
                   lock_keys=tuple(keys), nonce=nonce)


def add_key(state: LockState, key: LockPublicKey, signer: LockPrivateKey, *,
            time: int) -> Update:
    return _signed(signer, Kind.ADD_KEY, state.head, time, lock_keys=(key,))


def remove_key(state: LockState, key: LockPublicKey, signer: LockPrivateKey, *,
               time: int) -> Update:
    return _signed(signer, Kind.REMOVE_KEY, state.head, time, lock_keys=(key,))


def sign_node(state: LockState, node_key: Key, signer: LockPrivateKey, *, time: int) -> Update:
    """Admit a node by its WireGuard key (not its disco key: see docs/security.md)."""
    return _signed(signer, Kind.SIGN_NODE, state.head, time, node_key=node_key)


def revoke_node(state: LockState, node_key: Key, signer: LockPrivateKey, *,
                time: int) -> Update:
    return _signed(signer, Kind.REVOKE_NODE, state.head, time, node_key=node_key)
