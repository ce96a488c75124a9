"""Blocking control client (requests): registration, the netmap stream, node reports, admin.

A node uses :meth:`ControlClient.register` once (it proves it holds its private
key by opening a NaCl box sealed to its public key; the key never leaves the
process), then :meth:`ControlClient.follow`, which yields the current
:class:`~wgmesh.netmap.Netmap` after every message and survives disconnects:
it reconnects with exponential backoff and jitter and resumes from the last
sequence number it saw. Provisioning scripts use the admin methods with an API
key. Every error the server reports becomes :class:`ControlAPIError`.

Given the node's private key, the client verifies everything the node acts on
against the control key (:mod:`~wgmesh.control.envelope`): the pinned one, or
the one the first answer names (trust on first use; :attr:`control_key` then
holds it for the caller to pin). Plain ``http://`` is refused except to
loopback: tokens and auth keys must not cross a network in the clear.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import secrets
import socket
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import attrs
import requests
import requests.adapters
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey
from urllib3.connection import HTTPConnection

from wgmesh import netmap as nm
from wgmesh.control.envelope import (
    NONCE_LEN,
    ControlKey,
    ControlTrustError,
    StreamVerifier,
    check_key,
    split_authkey,
    verify_answer,
)
from wgmesh.control.errors import ControlAPIError
from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.sockaddr import plain_ip
from wgmesh.urls import check_credential_url

log = logging.getLogger(__name__)

__all__ = ["Backoff", "ControlClient", "Registered", "check_control_url"]


def check_control_url(url: str) -> None:
    """Refuse a URL that would send node tokens or auth keys in the clear."""
    check_credential_url(url, "control")


@attrs.define
class Backoff:
    """Exponential backoff with full jitter (sans-I/O: the caller sleeps)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = 0
    rng: random.Random = attrs.field(factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@attrs.frozen
class Registered:
    node: nm.NodeInfo
    node_token: str


#: How long a request's bytes may go unacknowledged before its connection counts as dead
#: (``TCP_USER_TIMEOUT``). A kept-alive connection that went out from an address the host
#: no longer has (a roam) then fails a call within seconds instead of at the read timeout;
#: a slow control service is unaffected, as its kernel acknowledges at once.
UNACKED_TIMEOUT_S = 3.0


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with ``TCP_USER_TIMEOUT`` on every connection it opens."""

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        kw["socket_options"] = [*HTTPConnection.default_socket_options,
                                (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                 int(UNACKED_TIMEOUT_S * 1000))]
        super().init_poolmanager(*args, **kw)


class ControlClient:
    """One control server. ``node_token`` for node calls, ``api_key`` for admin calls.

    ``node_key``: the node's private key, which turns on verification of what the node
    acts on (:meth:`register` sets it); ``control_key``: the pinned control key
    (None: trust the first one seen); ``ca``: a CA bundle for a private CA."""

    def __init__(self, url: str, *, node_token: str | None = None, api_key: str | None = None,
                 timeout_s: float = 10.0, stream_timeout_s: float = 45.0,
                 node_key: PrivateKey | None = None,
                 control_key: ControlKey | None = None, ca: str | None = None) -> None:
        check_control_url(url)
        self.url = url.rstrip("/")
        self.node_token, self.api_key = node_token, api_key
        self.timeout_s, self.stream_timeout_s = timeout_s, stream_timeout_s
        self.node_key, self.control_key = node_key, control_key
        self._key_proved = False  # this process has seen control prove its key
        self.session = requests.Session()
        self.session.mount("https://", _Adapter())
        self.session.mount("http://", _Adapter())
        # Per request, not session.verify, which $REQUESTS_CA_BUNDLE would override.
        self._verify = ca
        #: The last sequence number a stream delivered: ``stream(since=client.last_seq)`` resumes.
        self.last_seq: int | None = None
        self._stream_sock: socket.socket | None = None  # the running stream's, for a roam

    def close(self) -> None:
        self.session.close()

    def addresses_changed(self, local: Collection[str]) -> None:
        """This host's addresses are now ``local`` (a roam). Close the kept-alive
        connections (the next call opens a new one): a call on one would wait its whole
        timeout for an answer that goes to an address this host no longer has. End a
        running stream that went out from such an address: it only reads, so neither
        ``TCP_USER_TIMEOUT`` nor anything else would notice before its read timeout, and
        until then no netmap change reaches the node; its follower reconnects at once."""
        self.session.close()
        sock = self._stream_sock
        if sock is None:
            return
        try:
            if plain_ip(sock.getsockname()[0]) in local:
                return
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # closed meanwhile: the stream is ending anyway
        log.info("control %s: our address is gone; reconnecting the netmap stream", self.url)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing
    def _headers(self, cred: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {cred}"} if cred else {}

    def _request(self, method: str, path: str, cred: str | None,
                 body: dict[str, Any] | None, params: dict[str, Any] | None
                 ) -> requests.Response:
        try:
            return self.session.request(method, self.url + path, json=body, params=params,
                                        headers=self._headers(cred), timeout=self.timeout_s,
                                        verify=self._verify)
        except requests.RequestException as e:
            raise WgmeshError(f"control server {self.url} unreachable: {e}") from None

    def _call(self, method: str, path: str, cred: str | None = None,
              body: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Any:
        return _result(self._request(method, path, cred, body, params))

    def _signed(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None) -> Any:
        """A node call whose answer must be signed by the control key, for this node and a
        fresh nonce; pins the key on first use when none is pinned."""
        assert self.node_key is not None
        nonce = secrets.token_bytes(NONCE_LEN)
        text = base64.urlsafe_b64encode(nonce).decode()
        body, params = ({**body, "nonce": text} if body is not None else None,
                        {**params, "nonce": text} if params is not None else None)
        r = self._request(method, path, None, body, params)
        if r.status_code >= 400:
            _result(r)
        self.control_key = verify_answer(
            self.control_key, r.headers.get("Wgmesh-Control-Key"), self.node_key.public, nonce,
            r.content, r.headers.get("Wgmesh-Signature"))
        self._key_proved = True
        return json.loads(r.content)

    def prove_control_key(self) -> ControlKey:
        """Have control prove its key (a signed health answer) before a credential goes to it."""
        assert self.node_key is not None
        if not self._key_proved:
            self._signed("GET", "/v1/health", params={"node": self.node_key.public.b64()})
        assert self.control_key is not None
        return self.control_key

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None,
               params: dict[str, Any] | None = None) -> Any:
        if not self.api_key:
            raise WgmeshError("this call needs an admin API key")
        return self._call(method, "/v1/admin" + path, self.api_key, body, params)

    # ------------------------------------------------------------- node side
    def register(self, private_key: PrivateKey, disco_key: Key, hostname: str,
                 auth_key: str | None = None, rotate_from: PrivateKey | None = None
                 ) -> Registered:
        """Register (or re-register) this node; ``rotate_from`` moves the node to a new key.

        ``auth_key`` may carry the control key to pin (``wgk_...#ctrlkey:...``)."""
        if auth_key is not None:
            # ``wgk_...#ctrlkey:...``: the auth key also pins the control key
            auth_key, embedded = split_authkey(auth_key)
            if embedded is not None:
                check_key(self.control_key, embedded)
                self.control_key = embedded
        self.node_key = private_key
        req: dict[str, Any] = {"node_key": private_key.public.b64()}
        if rotate_from is not None:
            req["rotate_from"] = rotate_from.public.b64()
        # A signed challenge: the auth key goes only to a control service that proved its key.
        ch = self._signed("POST", "/v1/register/challenge", body=req)
        server = NaclPublicKey(Key(ch["server_key"]).raw)
        secret = Box(private_key.nacl(), server).decrypt(base64.b64decode(ch["sealed"]))
        if rotate_from is not None:
            secret += Box(rotate_from.nacl(), server).decrypt(base64.b64decode(ch["sealed_old"]))
        body = {**req, "disco_key": disco_key.b64(), "hostname": hostname,
                "challenge_id": ch["challenge_id"], "proof": base64.b64encode(secret).decode()}
        if auth_key is not None:
            body["auth_key"] = auth_key
        out = self._signed("POST", "/v1/register", body=body)
        node = nm.NodeInfo.from_json(out["node"])
        self.node_token = out["node_token"]
        self.last_seq = None
        return Registered(node=node, node_token=out["node_token"])

    def update(self, *, endpoints: Sequence[nm.Endpoint | str] | None = None,
               home_relay: int | None = None, hostinfo: dict[str, Any] | None = None,
               routes: Sequence[str] | None = None) -> None:
        """Publish this node's endpoints, home relay region, host info and/or the routes
        it advertises (they carry traffic once approved)."""
        body: dict[str, Any] = {}
        if endpoints is not None:
            body["endpoints"] = [nm.to_json(e) if isinstance(e, nm.Endpoint) else e
                                 for e in endpoints]
        if home_relay is not None:
            body["home_relay"] = home_relay
        if hostinfo is not None:
            body["hostinfo"] = hostinfo
        if routes is not None:
            body["routes"] = list(routes)
        self._call("POST", "/v1/node/update", self.node_token, body)

    def stream(self, since: int | None = None) -> Generator[nm.Message, None, None]:
        """One stream connection's messages (keepalives included) until it ends.

        Raises :class:`~wgmesh.control.envelope.ControlTrustError` at the first line that
        fails verification (nothing from it is yielded)."""
        params: dict[str, Any] = {} if since is None else {"since": since}
        verifier = None
        if self.node_key is not None:
            self.prove_control_key()
            nonce = secrets.token_bytes(NONCE_LEN)
            params["nonce"] = base64.urlsafe_b64encode(nonce).decode()
            verifier = StreamVerifier(self.node_key, nonce, self.control_key)
        try:
            r = self.session.get(self.url + "/v1/netmap", params=params, stream=True,
                                 headers=self._headers(self.node_token),
                                 timeout=(self.timeout_s, self.stream_timeout_s),
                                 verify=self._verify)
        except requests.RequestException as e:
            raise WgmeshError(f"control server {self.url} unreachable: {e}") from None
        with r:
            if r.status_code != 200:
                _result(r)
            conn = getattr(r.raw, "connection", None)
            self._stream_sock = getattr(conn, "sock", None)
            buf = b""
            try:
                for chunk in r.iter_content(chunk_size=None):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line and verifier is not None:
                            line = verifier.feed(line) or b""
                            self.control_key = verifier.key
                        if line:
                            msg = nm.decode(line)
                            self.last_seq = msg.seq
                            yield msg
            except requests.RequestException as e:
                raise WgmeshError(f"netmap stream broke: {e}") from None
            finally:
                self._stream_sock = None

    def follow(self, stop: threading.Event | None = None, backoff: Backoff | None = None,
               on_rejected: Callable[[ControlTrustError], object] | None = None,
               on_link: Callable[[bool], object] | None = None) -> Iterator[nm.Netmap]:
        """The current netmap after every change, forever (or until ``stop`` is set).

        Reconnects on any network failure; a 401 (node deleted, token replaced)
        ends the iteration with :class:`ControlAPIError`. A line that fails
        verification is refused (the last good map stays current), reported to
        ``on_rejected``, and the stream reconnects. ``on_link(True)`` is called when a
        stream connection delivers its first line (a resumed stream may bring no map),
        ``on_link(False)`` when one ends or a connection attempt fails.
        """
        stop = stop or threading.Event()
        backoff = backoff or Backoff()
        current: nm.Netmap | None = None
        while not stop.is_set():
            linked = False
            try:
                for msg in self.stream(None if current is None else current.seq):
                    backoff.reset()
                    if not linked and on_link is not None:
                        on_link(True)
                    linked = True
                    if isinstance(msg, nm.Netmap):
                        current = msg
                    elif isinstance(msg, nm.NetmapDelta) and current is not None:
                        current = nm.apply(current, msg)
                    else:
                        continue
                    yield current
                    if stop.is_set():
                        return
            except ControlAPIError as e:
                if e.status in (401, 403, 404):
                    raise
            except ControlTrustError as e:
                if on_rejected is not None:
                    on_rejected(e)
            except (WgmeshError, nm.NetmapFormatError):
                pass
            if on_link is not None and not stop.is_set():
                on_link(False)
            stop.wait(backoff.next_delay())

    # ----------------------------------------------------------- admin side
    def create_auth_key(self, *, reusable: bool = False, tags: Sequence[str] = (),
                        expiry_s: float = 3600, description: str = "",
                        ephemeral: bool = False, preapproved: bool = False) -> dict[str, Any]:
        """``{"auth_key": {...}, "key": "wgk_..."}``; the key text is shown only once.

        ``ephemeral``: its nodes are removed a grace period after going offline;
        ``preapproved``: its nodes skip the admin's approval.
        """
        return self._admin("POST", "/authkeys", {"reusable": reusable, "tags": list(tags),
                                                 "expiry_s": expiry_s,
                                                 "description": description,
                                                 "ephemeral": ephemeral,
                                                 "preapproved": preapproved})

    def list_auth_keys(self) -> list[dict[str, Any]]:
        return self._admin("GET", "/authkeys")["auth_keys"]

    def revoke_auth_key(self, key_id: str) -> None:
        self._admin("DELETE", f"/authkeys/{key_id}")

    def create_api_key(self, role: str = "admin", description: str = "") -> dict[str, Any]:
        return self._admin("POST", "/apikeys", {"role": role, "description": description})

    def list_api_keys(self) -> list[dict[str, Any]]:
        return self._admin("GET", "/apikeys")["api_keys"]

    def revoke_api_key(self, key_id: str) -> None:
        self._admin("DELETE", f"/apikeys/{key_id}")

    def nodes(self) -> list[dict[str, Any]]:
        return self._admin("GET", "/nodes")["nodes"]

    # A node ``ref``: an int is an id; a str is ``id:N``, ``name:NAME`` or either,
    # bare, where it cannot mean both (the server refuses an ambiguous one).
    def expire_node(self, ref: str | int) -> dict[str, Any]:
        return self._admin("POST", f"/nodes/{_ref(ref)}/expire")["node"]

    def extend_node(self, ref: str | int, expiry_s: float | None = None) -> dict[str, Any]:
        """Renew the node's key lifetime from now (default: the server's; 0: never expires)."""
        body = {} if expiry_s is None else {"expiry_s": expiry_s}
        return self._admin("POST", f"/nodes/{_ref(ref)}/extend", body)["node"]

    def set_node_expiry(self, ref: str | int, key_expiry: float) -> dict[str, Any]:
        """Set the node's key expiry to the unix time ``key_expiry`` (0: never expires)."""
        return self._admin("PUT", f"/nodes/{_ref(ref)}/expiry",
                           {"key_expiry": key_expiry})["node"]

    def approve_node(self, ref: str | int) -> dict[str, Any]:
        """Let a pending node in (the server runs with ``approval=required``)."""
        return self._admin("POST", f"/nodes/{_ref(ref)}/approve")["node"]

    def delete_node(self, ref: str | int) -> None:
        self._admin("DELETE", f"/nodes/{_ref(ref)}")

    def tag_node(self, ref: str | int, tags: Sequence[str]) -> dict[str, Any]:
        return self._admin("PUT", f"/nodes/{_ref(ref)}/tags", {"tags": list(tags)})["node"]

    def rename_node(self, ref: str | int, name: str) -> dict[str, Any]:
        """Assign ``name``: the one kind of node name a policy selector matches."""
        return self._admin("PUT", f"/nodes/{_ref(ref)}/name", {"name": name})["node"]

    def get_policy(self) -> dict[str, Any]:
        """``{"version": n, "policy": {...}}``."""
        return self._admin("GET", "/policy")

    def set_policy(self, policy: dict[str, Any], if_version: int | None = None) -> int:
        body: dict[str, Any] = {"policy": policy}
        if if_version is not None:
            body["if_version"] = if_version
        return int(self._admin("PUT", "/policy", body)["version"])

    def get_relay_map(self) -> nm.RelayMap:
        return nm.relay_map_from_json(self._admin("GET", "/relay-map")["relay_map"])

    def set_relay_map(self, relay_map: nm.RelayMap | dict[str, Any]) -> None:
        doc = nm.to_json(relay_map) if isinstance(relay_map, nm.RelayMap) else relay_map
        self._admin("PUT", "/relay-map", {"relay_map": doc})

    def audit(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        return self._admin("GET", "/audit", params={"after": after, "limit": limit})["entries"]

    def audit_verify(self) -> dict[str, Any]:
        return self._admin("GET", "/audit/verify")

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/stats")

    def list_routes(self) -> list[dict[str, Any]]:
        """Nodes with routes: advertised, approved, enabled, primary."""
        return self._admin("GET", "/routes")["nodes"]

    def approve_routes(self, ref: str | int, routes: Sequence[str], approve: bool = True
                       ) -> dict[str, Any]:
        """Approve (``approve=False``: reject) a node's routes; returns the node."""
        verb = "approve" if approve else "reject"
        return self._admin("POST", f"/routes/{_ref(ref)}/{verb}",
                           {"routes": list(routes)})["node"]

    def lock_chain(self, since: str = "") -> dict[str, Any]:
        """``{"lock_id", "head", "updates": [base64...]}`` after head ``since`` (hex) or all,
        with the node token or else the admin key. Verify it (:mod:`wgmesh.lock`): control
        is not trusted with it."""
        return self._call("GET", "/v1/lock", self.node_token or self.api_key,
                          params={"since": since} if since else None)

    def lock_append(self, update: bytes) -> dict[str, Any]:
        """Append one signed lock update (admin key): ``{"lock_id", "head", "seq"}``."""
        return self._call("POST", "/v1/lock/updates", self.api_key,
                          {"update": base64.b64encode(update).decode()})

    def server_control_key(self) -> str | None:
        """The control key the server names (``ctrlkey:...``), to hand to nodes out of band:
        as trustworthy as this admin connection."""
        return self._call("GET", "/v1/health").get("control_key")

    def relay_nodes(self) -> dict[str, Any]:
        """For relays (a relay or admin API key): ``{"seq", "node_keys": [b64...]}``."""
        return self._call("GET", "/v1/relay/nodes", self.api_key)


def _ref(ref: str | int) -> str:
    return f"id:{ref}" if isinstance(ref, int) else quote(ref, safe=":")


def _result(r: requests.Response) -> Any:
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        if isinstance(body, dict) and "error" in body:
            raise ControlAPIError(r.status_code, str(body["error"]),
                                  str(body.get("message", "")), body.get("details"))
        raise ControlAPIError(r.status_code, "http_error", r.reason or "error")
    return body
