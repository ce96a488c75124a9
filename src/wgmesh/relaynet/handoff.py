"""Moving a node's connection between the workers of one relay, so that pairs meet.

Why: with ``--workers N`` the kernel spreads connections over the workers by a hash of their
addresses, so the two ends of a busy pair land on different workers about half the time,
and every packet between them is then handled twice: read, rewritten and written to the
workers' link by one worker, read and written again by the other (~1.5x the CPU of a
packet that stays on one worker; ``benchmarks/README.md``, "Relay workers"). A worker that
sees one of its nodes talk mostly with one node of a sibling hands the connection over:
the TCP socket itself (``SCM_RIGHTS`` over a socket pair the supervisor made before
forking, which no other process can reach), with the bytes of a frame read in part and
what the relay remembers of the node. The node notices nothing: the same connection, the
same relay key, no new handshake.

Which end moves, decided without a word between the workers: both workers of a crossing
pair count its packets, each for its own end and in both directions, so both see the same
pair; the end with the smaller key moves to the other's worker and the other stays
(:func:`partner`). Exactly one of them moves.

This module is the pure part (the message and the choice); the server does the I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

from wgmesh.keys import KEY_LEN

__all__ = ["MAX_KEYS", "MAX_MESSAGE", "Handoff", "HandoffError", "decode", "encode", "partner"]

_MAGIC = b"WGH1"
_HEAD = struct.Struct("!4s32sBHHI")  # magic, key, flags, interest, heard_from, pending
_PREFERRED = 1
#: the most remembered peers a handoff carries of each kind (what the server caps them at)
MAX_KEYS = 1024
#: the largest message: the head, both key lists full and a whole frame read in part
MAX_MESSAGE = _HEAD.size + 2 * MAX_KEYS * KEY_LEN + 128 * 1024


class HandoffError(ValueError):
    """A handoff message that is not one (never from a sibling: counted and dropped)."""


@attrs.frozen
class Handoff:
    """What a node's connection takes to another worker besides its socket: its key, its
    home-relay flag, the bytes of a frame read in part, and the peers it sent to
    (``interest``) and heard from (``heard_from``), which say whose comings and goings it
    is told."""

    key: bytes
    preferred: bool = False
    pending: bytes = b""
    interest: tuple[bytes, ...] = ()
    heard_from: tuple[bytes, ...] = ()


def encode(h: Handoff) -> bytes:
    interest, heard = h.interest[:MAX_KEYS], h.heard_from[:MAX_KEYS]
    return b"".join([_HEAD.pack(_MAGIC, h.key, _PREFERRED if h.preferred else 0,
                                len(interest), len(heard), len(h.pending)),
                     *interest, *heard, h.pending])


def decode(data: bytes) -> Handoff:
    """The handoff in ``data``; :class:`HandoffError` if it is not exactly one."""
    if len(data) < _HEAD.size:
        raise HandoffError("short handoff")
    magic, key, flags, n_interest, n_heard, n_pending = _HEAD.unpack_from(data)
    if magic != _MAGIC or flags & ~_PREFERRED or max(n_interest, n_heard) > MAX_KEYS:
        raise HandoffError("not a handoff")
    keys_end = _HEAD.size + (n_interest + n_heard) * KEY_LEN
    if len(data) != keys_end + n_pending:
        raise HandoffError("handoff length mismatch")
    keys = [bytes(data[i:i + KEY_LEN]) for i in range(_HEAD.size, keys_end, KEY_LEN)]
    return Handoff(bytes(key), bool(flags & _PREFERRED), bytes(data[keys_end:]),
                   tuple(keys[:n_interest]), tuple(keys[n_interest:]))


def partner(key: bytes, crossing: Mapping[bytes, int], total: int,
            min_packets: int) -> bytes | None:
    """The node whose worker the node ``key`` should move to, or None.

    ``crossing``: packets between ``key`` and nodes of other workers, by that node, both
    directions, over the last interval; ``total``: every packet it sent or received in it.
    It moves if one such node carried at least ``min_packets`` and most of its traffic,
    and its key is the larger of the two (that node's worker sees the same pair and leaves
    it be): a node that talks to many (a hub) stays where it is.
    """
    if not crossing:
        return None
    peer, n = max(crossing.items(), key=lambda kv: kv[1])
    if n < min_packets or 2 * n <= total or key >= peer:
        return None
    return peer
