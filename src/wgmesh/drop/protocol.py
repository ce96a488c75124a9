"""The file-drop protocol, sans I/O: offers, names, identities, admission and refusals.

Protocol (version 1, JSON errors ``{"error": "..."}``), spoken by
:mod:`~wgmesh.drop.server` and :mod:`~wgmesh.drop.sender`::

    GET  /v1/whoami                                  -> {"name", "key", "may_send"}
    GET  /v1/offset?name=N&size=S[&sha256=H]         -> {"offset": K}   (admission check)
    PUT  /v1/files?name=N&size=S&offset=K            body: bytes K..S  -> 200 {"offset": S}
    POST /v1/commit?name=N&size=S&sha256=H           -> 201 {"name", ...}
    PUT  /v1/files?name=N&size=S&sha256=H&offset=K   body: bytes K..S  -> 201 {"name", ...}

A sender hashes the file as it streams it and names the digest last, in the
commit: the bytes go out from the first moment, and a file is read from disk
once. (The digest-first PUT, where the offer carries ``sha256`` and the
receiver checks it as the body ends, is how earlier senders speak; it stays.)
``offset`` is how much of this offer (sender, name, size, and the digest when
it is offered) the receiver already holds, so an interrupted transfer resumes
where it stopped. Either way the receiver hashes every byte it keeps and checks
the whole file's SHA-256 before the file appears; a commit whose digest does
not match discards what was held (422), so a resume onto another file's bytes
costs a resend, never a wrong file. Refusals: 400 bad name or request, 403 not
a peer or not allowed, 409 offset ahead of the receiver or a commit before all
bytes arrived (the answer tells ``offset``), 413 over quota, 422 digest
mismatch, 500 the receiver could not write, 507 disk full.

Who is sending is decided by the receiver alone, from the source address of
the TCP connection: WireGuard's cryptokey routing only admits a source address
through the peer whose allowed IPs contain it, so the address names the key.
The node supplies ``identify(remote_ip)`` (its netmap's allowed IPs) and
``authorize(identity)`` (the policy's ``file-send`` capability); see
:func:`netmap_identify` and :func:`netmap_authorize`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import attrs

from wgmesh.display import human_bytes
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key
from wgmesh.netmap import CAP_FILE_SEND, Netmap

__all__ = [
    "CHUNK",
    "DEFAULT_PORT",
    "MAX_NAME_BYTES",
    "Authorize",
    "BadName",
    "BadRequest",
    "DropError",
    "DropRefused",
    "Identify",
    "Offer",
    "PeerIdentity",
    "Refusal",
    "admit",
    "behind",
    "cannot_store",
    "check_name",
    "digest_mismatch",
    "disk_filled",
    "netmap_authorize",
    "netmap_identify",
    "not_a_peer",
    "not_allowed",
    "parse_offer",
    "refusal_text",
]

#: The peer API's TCP port on every node's tunnel addresses.
DEFAULT_PORT = 4173
#: The unit both ends read, hash and write in.
CHUNK = 1 << 20
MAX_NAME_BYTES = 255
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a malformed request, not a big file
_FORBIDDEN = set('/\\:*?"<>|')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                    *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


class DropError(WgmeshError):
    """A file could not be sent; the message says why, for a person."""


class DropRefused(DropError):
    """The receiver answered with an error status (kept in ``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadRequest(DropError):
    """A malformed peer API request: answered 400."""


class BadName(WgmeshError, ValueError):
    """A file name that is not one safe, portable path component."""


class Refusal(DropError):
    """What the receiver answers instead of taking the file: ``status`` and a reason.

    ``extra`` goes into the JSON body beside ``error`` (a 409 tells the offset).
    """

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# ------------------------------------------------------------------ names


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe base name for the inbox, else raise :class:`BadName`.

    A name is a single path component that is also portable, because received
    files are meant to be moved on to anywhere. Refused: empty, ``.``/``..``
    and any leading dot (hidden files, and the resume area lives there), path
    separators, NUL and every other control or bidi-formatting character (names
    that lie on a terminal), characters Windows forbids, trailing dots or
    spaces, device names such as ``CON`` or ``lpt1.txt``, and more than 255
    bytes of UTF-8.
    """
    if not name:
        raise BadName("empty file name")
    if name.startswith("."):
        raise BadName(f"file name {name!r} starts with a dot (., .. and hidden names are refused)")
    bad = sorted({c for c in name if c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf",
                                                                                     "Cs")})
    if bad:
        raise BadName(f"file name {name!r} contains forbidden characters {''.join(bad)!r}"
                      " (path separators, control or formatting characters, or :*?\"<>|)")
    if name.endswith((" ", ".")):
        raise BadName(f"file name {name!r} ends with a space or a dot")
    if name.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        raise BadName(f"file name {name!r} is a reserved device name")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise BadName(f"file name is longer than {MAX_NAME_BYTES} bytes")
    return name


# ------------------------------------------------------------------ identity seam


@attrs.frozen
class PeerIdentity:
    """Who a connection comes from, as the receiver's WireGuard config says."""

    name: str
    node_key: Key


Identify = Callable[[str], "PeerIdentity | None"]
Authorize = Callable[[PeerIdentity], bool]


def netmap_identify(get_netmap: Callable[[], Netmap | None]) -> Identify:
    """``identify`` for a node: the peer whose allowed IPs hold the address (longest prefix).

    Allowed IPs are exactly what WireGuard enforces on inbound packets, so this
    is the key the packets were authenticated with, never a sender's claim.
    """

    def identify(remote_ip: str) -> PeerIdentity | None:
        nm = get_netmap()
        if nm is None:
            return None
        ip = ipaddress.ip_address(remote_ip)
        best: tuple[int, PeerIdentity] | None = None
        for p in nm.peers.values():
            for cidr in (*p.allowed_ips, p.ipv4, p.ipv6):
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(cidr, strict=False)
                    if ip in net and (best is None or net.prefixlen > best[0]):
                        best = (net.prefixlen, PeerIdentity(p.name, p.node_key))
        return None if best is None else best[1]

    return identify


def netmap_authorize(get_netmap: Callable[[], Netmap | None]) -> Authorize:
    """``authorize`` for a node: does the current policy give the peer ``file-send`` here?"""

    def authorize(who: PeerIdentity) -> bool:
        nm = get_netmap()
        peer = None if nm is None else nm.peer_by_key(who.node_key)
        return peer is not None and nm is not None and nm.peer_has_cap(peer, CAP_FILE_SEND)

    return authorize


# ------------------------------------------------------------------ the offer


@attrs.frozen
class Offer:
    """One request to deliver ``name`` (``size`` bytes, SHA-256 ``sha256``) from ``offset``.

    ``sha256`` is empty when the sender names it only in the commit.
    """

    name: str
    size: int
    sha256: str
    offset: int = 0


def _int_param(q: Mapping[str, str], key: str, default: int | None = None) -> int:
    v = q.get(key)
    if v is None:
        if default is None:
            raise BadRequest(f"missing parameter {key!r}")
        return default
    if not v.isascii() or not v.isdigit() or len(v) > 16:
        raise BadRequest(f"parameter {key!r} must be a non-negative integer")
    return int(v)


def parse_offer(q: Mapping[str, str], *, with_offset: bool, with_digest: bool = False) -> Offer:
    """Validate query parameters into an :class:`Offer`; raise :class:`BadRequest`/``BadName``.

    ``sha256`` may be left out (a streamed offer) unless ``with_digest``.
    """
    name = q.get("name")
    if name is None:
        raise BadRequest("missing parameter 'name'")
    check_name(name)
    size = _int_param(q, "size")
    if size > _MAX_SIZE:
        raise BadRequest("size is implausibly large")
    sha = q.get("sha256", "")
    if (sha or with_digest) and not _SHA_RE.match(sha):
        raise BadRequest("sha256 must be 64 lowercase hex digits")
    offset = _int_param(q, "offset") if with_offset else 0
    if offset > size:
        raise BadRequest("offset is beyond the end of the file")
    return Offer(name, size, sha, offset)


def admit(offer: Offer, have: int, *, free: int, quota: int | None = None,
          held: int = 0) -> int:
    """The bytes still to come if the receiver takes the offer; else a :class:`Refusal`.

    ``have``: bytes of the offer already kept; ``free``: disk space it may use;
    ``held``: what the inbox holds or has promised to other transfers, counted
    against ``quota``.
    """
    remaining = offer.size - have
    if quota is not None and held + offer.size > quota:
        raise Refusal(413, f"{offer.name} ({human_bytes(offer.size)}) exceeds the"
                           f" receiver's inbox quota ({human_bytes(quota)},"
                           f" {human_bytes(max(0, quota - held))} free)")
    if remaining > free:
        raise Refusal(507, f"the receiver's disk has no room for {offer.name}"
                           f" ({human_bytes(remaining)} needed,"
                           f" {human_bytes(max(0, free))} free)")
    return remaining


# ------------------------------------------------------------------ refusals


def over_sender_quota(offer: Offer, quota: int, held: int) -> Refusal:
    return Refusal(413, f"{offer.name} ({human_bytes(offer.size)}) exceeds the receiver's"
                        f" per-sender quota for unfinished transfers ({human_bytes(quota)},"
                        f" {human_bytes(held)} held)")


def not_a_peer(ip: str) -> Refusal:
    return Refusal(403, f"{ip or 'this address'} is not a peer of this node's mesh")


def not_allowed(who: PeerIdentity) -> Refusal:
    return Refusal(403, f"{who.name} may not send files to this node"
                        " (the policy grants no file-send capability)")


def behind(offer: Offer, have: int) -> Refusal:
    """The sender offered to resume past what the receiver kept, or committed before all
    bytes arrived: it must ask again."""
    return Refusal(409, f"the receiver holds only {have} bytes of {offer.name}", offset=have)


def digest_mismatch(offer: Offer, got: str) -> Refusal:
    return Refusal(422, f"{offer.name}: the bytes received hash to {got},"
                        f" not the sender's {offer.sha256}")


def disk_filled(offer: Offer) -> Refusal:
    return Refusal(507, f"the receiver's disk filled up while receiving {offer.name};"
                        " nothing was kept")


def cannot_store(offer: Offer, reason: str | None) -> Refusal:
    return Refusal(500, f"the receiver could not store {offer.name}: {reason}")


def refusal_text(status: int, body: Mapping[str, Any], host: str) -> str:
    """The sender's one line for a refusal: the receiver's reason, else the status."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return f"{host} refused the file ({status}): {body.get('error') or phrase}"
