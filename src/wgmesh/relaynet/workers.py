"""One relay as several worker processes on one port: ``wgmesh relay serve --workers N``.

Why processes: one asyncio relay forwards on one core (the GIL), so a second core needs
a second process. How they stay one relay:

* Before forking, the supervisor binds one listening socket per worker on the relay's
  port with ``SO_REUSEPORT`` (the kernel spreads new connections over them), one
  UNIX listener per worker for the other workers, and STUN's UDP socket (worker 0
  answers STUN). It keeps them all open, so a worker that dies is replaced by a fresh
  fork on the same sockets: connections the kernel hashed to a dead worker's socket
  wait in its backlog for the replacement instead of being refused.
* Each worker is a :class:`~wgmesh.relaynet.server.RelayServer` meshed with the others
  over UNIX sockets (abstract names: nothing to clean up) (:meth:`~wgmesh.relaynet.server.RelayServer.serve_siblings`) under a
  key made for this run: presence, forwarding by key, the region mesh and ``/metrics``
  see one relay. That link has backpressure: a node whose packets go to a backed-up
  sibling is not read until the link drains (dropping there would waste work done).
* A node that talks mostly with a node of another worker is moved there, connection and
  all (:mod:`~wgmesh.relaynet.handoff`), over a ``SOCK_SEQPACKET`` socket pair per two
  workers, made before forking: a private channel no other process can reach.
* The caps count across workers in shared memory
  (:class:`~wgmesh.relaynet.admission.SharedAdmission`); the supervisor clears a dead
  worker's share before its replacement starts. The queue budget (what slow readers'
  backlogs may hold together) is split between the workers, so the relay's memory bound
  stays what it was with one.

The supervisor forks: build and :meth:`RelayWorkers.start` it before the process starts
threads or an event loop (the CLI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable

from wgmesh.errors import WgmeshError
from wgmesh.libc import LIBC
from wgmesh.relaynet.admission import SharedAdmission
from wgmesh.relaynet.server import RelayServer

__all__ = ["RelayWorkers"]

log = logging.getLogger("wgmesh.relay")
_PR_SET_PDEATHSIG = 1
#: builds one worker's server (in that worker, after the fork) around the shared caps
MakeServer = Callable[[SharedAdmission], RelayServer]


def _listener(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio does: [::] and 0.0.0.0 each native
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class RelayWorkers:
    """``workers`` relay processes on ``host:port`` (0: any free port; ``::``: both
    families, which needs a fixed port), STUN on ``stun_port`` (``None``: none) answered
    by worker 0; the caps ``max_connections`` and ``max_per_source`` are the relay's.

    :meth:`start` forks them and returns once each serves; :meth:`supervise` replaces
    any that dies until :meth:`stop` (or SIGTERM/SIGINT, in :meth:`run`).
    """

    def __init__(self, workers: int, make_server: MakeServer, *, host: str = "0.0.0.0",
                 port: int = 0, stun_port: int | None = None, max_connections: int = 10_000,
                 max_per_source: int = 1024) -> None:
        if workers < 2:
            raise WgmeshError("a relay of workers needs at least 2 (1: run RelayServer)")
        self.workers = workers
        self.make_server = make_server
        self.host = host
        self.port = port
        self.stun_port: int | None = stun_port
        self.admission = SharedAdmission(workers, max_connections, max_per_source)
        self.pids: list[int] = [0] * workers
        self._started_at = [0.0] * workers
        self._public: list[list[socket.socket]] = []
        self._internal: list[socket.socket] = []
        self._internal_names: list[str] = []
        self._handoff: dict[tuple[int, int], socket.socket] = {}  # (i, j): i's end towards j
        self._stun: socket.socket | None = None
        self._key = secrets.token_bytes(32)
        self._ready_r, self._ready_w = -1, -1
        self._stopping = False

    # ---- supervisor ----------------------------------------------------------------------
    def _bind(self) -> None:
        hosts = ["0.0.0.0", "::"] if self.host == "::" else [self.host]
        if self.host == "::" and not self.port:
            raise WgmeshError("listening on [::] (both families) needs a fixed port")
        for _ in range(self.workers):
            socks = []
            for h in hosts:
                socks.append(_listener(h, self.port))
                self.port = socks[-1].getsockname()[1]
            self._public.append(socks)
        tag = secrets.token_hex(8)
        self._internal_names = [f"\0wgmesh-relay-{tag}-{i}" for i in range(self.workers)]
        for name in self._internal_names:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(name)
            s.listen(64)
            s.setblocking(False)
            self._internal.append(s)
        for i in range(self.workers):
            for j in range(i + 1, self.workers):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                a.setblocking(False)
                b.setblocking(False)
                self._handoff[i, j], self._handoff[j, i] = a, b
        if self.stun_port is not None:
            self._stun = _listener(self.host, self.stun_port, socket.SOCK_DGRAM)
            self.stun_port = self._stun.getsockname()[1]

    def start(self, timeout: float = 30.0) -> None:
        """Bind, fork every worker, and wait until each one serves."""
        self._bind()
        self._ready_r, self._ready_w = os.pipe()
        for i in range(self.workers):
            self._fork(i)
        os.set_blocking(self._ready_r, False)
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < self.workers:
            if any(self._reaped(p) for p in self.pids):
                self.stop()
                raise WgmeshError("a relay worker exited while starting (its log says why)")
            if time.monotonic() > deadline:
                self.stop()
                raise WgmeshError("relay workers did not start in time")
            with contextlib.suppress(BlockingIOError):
                ready += len(os.read(self._ready_r, self.workers))
            time.sleep(0.01)

    def _fork(self, i: int) -> None:
        self._started_at[i] = time.monotonic()
        pid = os.fork()
        if pid:
            self.pids[i] = pid
            return
        code = 1
        try:
            code = self._worker(i)
        except BaseException:
            log.exception("relay worker %d failed", i)
        finally:
            os._exit(code)

    def supervise(self) -> None:
        """Replace every worker that dies (its share of the caps cleared first) until
        :meth:`stop`; a worker that dies within a second of starting is replaced after a
        growing pause, so a broken configuration does not spin."""
        backoff = 0.0
        while not self._stopping:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            if pid not in self.pids or self._stopping:
                continue
            i = self.pids.index(pid)
            self.admission.clear(i)
            quick = time.monotonic() - self._started_at[i] < 1.0
            backoff = min(max(backoff * 2, 0.1), 5.0) if quick else 0.0
            log.warning("relay worker %d (pid %d) died; starting another", i, pid)
            time.sleep(backoff)
            if not self._stopping:
                self._fork(i)

    def run(self) -> None:
        """:meth:`supervise` until SIGTERM or SIGINT, then :meth:`stop`."""
        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            self.supervise()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every worker, SIGKILL those still there after ``timeout``; close the
        sockets."""
        self._stopping = True
        live = [p for p in self.pids if p]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while live:
            live = [p for p in live if not self._reaped(p)]
            if live and time.monotonic() > deadline:
                for p in live:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)
        self.pids = [0] * self.workers
        for s in [*(s for socks in self._public for s in socks), *self._internal,
                  *self._handoff.values()]:
            s.close()
        if self._stun is not None:
            self._stun.close()

    @staticmethod
    def _reaped(pid: int) -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:
            return True

    # ---- worker --------------------------------------------------------------------------
    def _worker(self, i: int) -> int:
        """In worker ``i``'s process: keep only its own sockets, serve until SIGTERM."""
        with contextlib.suppress(AttributeError):  # die with the supervisor
            LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C stops us through the supervisor
        for j in range(self.workers):
            if j != i:
                for s in [*self._public[j], self._internal[j]]:
                    s.close()
        for (owner, _), s in self._handoff.items():
            if owner != i:
                s.close()
        if i and self._stun is not None:
            self._stun.close()
        os.close(self._ready_r)
        self.admission.become(i)
        others = [p for j, p in enumerate(self._internal_names) if j != i]
        asyncio.run(self._serve(i, others))
        return 0

    async def _serve(self, i: int, others: list[str]) -> None:
        handoff = [self._handoff[i, j] for j in range(self.workers) if j != i]
        srv = self.make_server(self.admission)
        srv.queue_budget.limit = max(srv.queue_bytes, srv.queue_budget.limit // self.workers)
        await srv.start(sockets=self._public[i], stun_sock=self._stun if i == 0 else None)
        await srv.serve_siblings(self._internal[i], self._key, others, handoff)
        os.write(self._ready_w, b"r")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await stop.wait()
        finally:
            await srv.close()
