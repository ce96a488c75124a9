"""The control key and the envelope that binds everything a node acts on to it (sans-I/O).

Control holds a long-term Ed25519 key (``ctrlkey:<base64>``); nodes pin its public
half. TLS protects the transport, but a reverse proxy or a trusted-but-wrong CA
terminates it, so what a node acts on is authenticated end to end on top:

* **Answers** (registration): an Ed25519 signature over
  ``domain | recipient node key | the node's 32-byte nonce | the exact body bytes``,
  so an answer cannot be moved to another node or replayed to a later request.
* **Streams** (the netmap): the node sends a fresh 32-byte nonce; the first line is
  a *session* line signed over ``domain | node key | nonce | ephemeral X25519 key``.
  The session's MAC key is derived from X25519(ephemeral, node key), so only the
  recipient node (holding its private key) can compute it. Each later line is
  followed by a MAC line over ``line counter | the exact line bytes``: one
  signature per stream and a keyed BLAKE2b per line keeps a 10,000-recipient
  fan-out cheap, and a line cannot be replayed to another node, reordered,
  dropped from the middle, or replayed from an older stream.

Randomness (the signing seed, nonces, the ephemeral key) comes in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

import attrs
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey

__all__ = ["NONCE_LEN", "ControlKey", "ControlKeyMismatch", "ControlSigner",
           "ControlTrustError", "StreamSealer", "StreamVerifier", "check_key", "split_authkey",
           "verify_answer"]

PUBLIC_PREFIX, PRIVATE_PREFIX = "ctrlkey:", "ctrlpriv:"
NONCE_LEN = 32
_ANSWER = b"wgmesh-control-answer-v1\0"
_SESSION = b"wgmesh-control-session-v1\0"
_MAC_KDF = b"wgmesh-control-mac-v1"
_MAC_PREFIX, _MAC_SUFFIX = b'{"mac":"', b'"}'


class ControlTrustError(WgmeshError):
    """Something claiming to come from control failed verification: refuse it."""


class ControlKeyMismatch(ControlTrustError):
    """Control presented a key other than the pinned one."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, length: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != length:
        raise ControlTrustError(f"{what}: not {length} bytes of base64")
    return raw


@attrs.frozen
class ControlKey:
    """The public control key, printed and pinned as ``ctrlkey:<base64>``."""

    raw: bytes

    @classmethod
    def parse(cls, text: str) -> ControlKey:
        body = text.strip().removeprefix(PUBLIC_PREFIX)
        try:
            return cls(_unb64(body, 32, "control key"))
        except ControlTrustError:
            raise WgmeshError(f"not a control key: {text!r} (expected {PUBLIC_PREFIX}<base64>)"
                              ) from None

    def __str__(self) -> str:
        return PUBLIC_PREFIX + _b64(self.raw)

    @property
    def fingerprint(self) -> str:
        """What a database records of the key it belongs to (SHA-256, hex)."""
        return hashlib.sha256(_SESSION + self.raw).hexdigest()[:32]

    def verify(self, message: bytes, signature: bytes, what: str) -> None:
        try:
            VerifyKey(self.raw).verify(message, signature)
        except (BadSignatureError, CryptoError, ValueError):
            raise ControlTrustError(f"{what}: bad signature for control key {self}") from None


class ControlSigner:
    """The private control key (control's state dir holds it as ``ctrlpriv:<base64 seed>``)."""

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)
        self.public = ControlKey(bytes(self._key.verify_key))

    @classmethod
    def from_text(cls, text: str) -> ControlSigner:
        body = text.strip()
        if not body.startswith(PRIVATE_PREFIX):
            raise WgmeshError(f"not a private control key (expected {PRIVATE_PREFIX}<base64>)")
        try:
            return cls(_unb64(body.removeprefix(PRIVATE_PREFIX), 32, "private control key"))
        except ControlTrustError as e:
            raise WgmeshError(str(e)) from None

    def text(self) -> str:
        return PRIVATE_PREFIX + _b64(bytes(self._key))

    def sign_answer(self, node_key: Key, nonce: bytes, body: bytes) -> str:
        """The signature header for an answer of ``body`` to ``node_key``'s request."""
        return _b64(self._key.sign(_ANSWER + node_key.raw + nonce + body).signature)

    def open_stream(self, node_key: Key, nonce: bytes, ephemeral: bytes
                    ) -> tuple[bytes, StreamSealer]:
        """The signed session line and the sealer for every line after it.

        ``ephemeral``: 32 fresh random bytes (an X25519 private key, used once)."""
        eph_pub = crypto_scalarmult_base(ephemeral)
        sig = self._key.sign(_SESSION + node_key.raw + nonce + eph_pub).signature
        line = json.dumps({"type": "session", "key": str(self.public), "eph": _b64(eph_pub),
                           "sig": _b64(sig)}, separators=(",", ":")).encode() + b"\n"
        shared = crypto_scalarmult(ephemeral, node_key.raw)
        return line, StreamSealer(_mac_key(shared, eph_pub, node_key.raw, nonce))


def _mac_key(shared: bytes, eph_pub: bytes, node_pub: bytes, nonce: bytes) -> bytes:
    if not any(shared):
        raise ControlTrustError("stream session: a low-order key")
    return hashlib.blake2b(shared + eph_pub + node_pub + nonce, key=_MAC_KDF,
                           digest_size=32).digest()


def _mac_line(digest: bytes) -> bytes:
    return _MAC_PREFIX + base64.b64encode(digest) + _MAC_SUFFIX


class StreamSealer:
    """Control's side of a stream: pass each written chunk through :meth:`feed`.

    Chunks may split or join lines (a full map goes out in pieces); a MAC line
    follows each line as soon as its newline has been written."""

    def __init__(self, key: bytes) -> None:
        self._key, self._counter = key, 0
        self._h = self._start()

    def _start(self) -> hashlib.blake2b:
        return hashlib.blake2b(self._counter.to_bytes(8, "big"), key=self._key,
                               digest_size=32)

    def feed(self, chunk: bytes) -> bytes:
        out, start = [], 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            self._h.update(chunk[start:nl])
            out += [chunk[start:nl + 1], _mac_line(self._h.digest()), b"\n"]
            self._counter += 1
            self._h = self._start()
            start = nl + 1
        if start < len(chunk):
            self._h.update(chunk[start:])
            out.append(chunk[start:])
        return b"".join(out)


class StreamVerifier:
    """A node's side of a stream: :meth:`feed` each line (without its newline); it returns
    a verified message line, or None while it waits for the line's MAC.

    ``pinned``: the key the node trusts (None: trust on first use; :attr:`key` then
    holds what the session line named). Raises :class:`ControlTrustError`."""

    def __init__(self, node: PrivateKey, nonce: bytes, pinned: ControlKey | None) -> None:
        self._node, self._nonce = node, nonce
        self.key = pinned
        self._mac_key: bytes | None = None
        self._pending: bytes | None = None
        self._counter = 0

    def feed(self, line: bytes) -> bytes | None:
        if self._mac_key is None:
            self._session(line)
            return None
        if self._pending is None:
            self._pending = line
            return None
        body, self._pending = self._pending, None
        want = _mac_line(hashlib.blake2b(self._counter.to_bytes(8, "big") + body,
                                         key=self._mac_key, digest_size=32).digest())
        if not hmac.compare_digest(want, line):
            raise ControlTrustError(f"netmap stream: line {self._counter} failed "
                                    f"authentication (changed, reordered or replayed)")
        self._counter += 1
        return body

    def _session(self, line: bytes) -> None:
        try:
            d = json.loads(line)
        except ValueError:
            d = None
        if not isinstance(d, dict) or d.get("type") != "session" \
                or not isinstance(d.get("key"), str):
            raise ControlTrustError("netmap stream: control did not open an authenticated "
                                    "session (is it an older wgmesh, or something else?)")
        try:
            named = ControlKey.parse(d["key"])
        except WgmeshError as e:
            raise ControlTrustError(f"netmap stream: {e}") from None
        check_key(self.key, named)
        eph = _unb64(d.get("eph"), 32, "stream session eph")
        node_pub = self._node.public.raw
        named.verify(_SESSION + node_pub + self._nonce + eph,
                     _unb64(d.get("sig"), 64, "stream session sig"), "stream session")
        self.key = named
        try:
            shared = crypto_scalarmult(self._node.raw(), eph)
        except (CryptoError, RuntimeError, ValueError):
            shared = b""
        self._mac_key = _mac_key(shared, eph, node_pub, self._nonce)


def check_key(pinned: ControlKey | None, presented: ControlKey) -> None:
    if pinned is not None and presented != pinned:
        raise ControlKeyMismatch(f"control presented key {presented}, not the pinned key "
                                 f"{pinned}: refusing it")


def verify_answer(pinned: ControlKey | None, presented: str | None, node_key: Key,
                  nonce: bytes, body: bytes, signature: str | None) -> ControlKey:
    """Check an answer's signature headers; returns the key it verified under."""
    if presented is None or signature is None:
        raise ControlTrustError("control did not sign its answer (is it an older wgmesh?)")
    try:
        key = ControlKey.parse(presented)
    except WgmeshError as e:
        raise ControlTrustError(str(e)) from None
    check_key(pinned, key)
    key.verify(_ANSWER + node_key.raw + nonce + body, _unb64(signature, 64, "signature"),
               "answer")
    return key


def split_authkey(text: str) -> tuple[str, ControlKey | None]:
    """``wgk_...#ctrlkey:...`` (what ``wgmesh control authkey create`` prints) into the auth
    key and the control key it carries; a bare auth key carries none."""
    authkey, sep, key = text.partition("#")
    return authkey, ControlKey.parse(key) if sep else None
