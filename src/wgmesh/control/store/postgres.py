"""The replicated dialect: PostgreSQL, shared by control replicas that wake each other by NOTIFY.

``psycopg`` is imported only when a PostgreSQL store opens, so SQLite users
need not install it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from wgmesh.control.errors import ControlError, ResourcesExhausted, StorageFull
from wgmesh.control.store.sql import Store, Tx

__all__ = ["PostgresStore"]

_PG_LOCK = 0x77676D65  # "wgme": the writers' advisory lock
_DISK_FULL = "53100"
_INSUFFICIENT_RESOURCES = "53"  # SQLSTATE class 53: disk, memory, connections, limits


def resource_error(e: Exception) -> ControlError | None:
    """The clear error for a PostgreSQL error of class 53 (``None`` for any other).

    A full disk is :class:`StorageFull` (507), as on SQLite; out of memory, of connections
    or past a configured limit is :class:`ResourcesExhausted` (503). PostgreSQL has rolled
    the transaction back in either case."""
    state = getattr(e, "sqlstate", None) or ""
    if state == _DISK_FULL:
        return StorageFull()
    if state.startswith(_INSUFFICIENT_RESOURCES):
        return ResourcesExhausted(type(e).__name__)
    return None


class _PgTx(Tx):
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        self.cur.execute(sql.replace("?", "%s"), params)
        return self.cur.fetchall() if self.cur.description else []

    def run(self, sql: str, *params: Any) -> int:
        self.cur.execute(sql.replace("?", "%s"), params)
        return int(self.cur.rowcount)


class PostgresStore(Store):
    """For several control replicas: they share the database and wake each other by NOTIFY."""

    channel = "wgmesh_changes"  # each NOTIFY carries the committed change's sequence number

    def __init__(self, dsn: str, **kw: Any) -> None:
        super().__init__(**kw)
        import psycopg

        self.dsn = dsn
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise ControlError(f"cannot connect to PostgreSQL: {e}") from None
        self.migrate()

    def _ddl_types(self) -> dict[str, str]:
        return {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"}

    def _connection(self) -> Any:
        """The connection, re-opened if the database restarted or the link broke."""
        if self.conn.closed or self.conn.broken:
            import psycopg

            self.conn = psycopg.connect(self.dsn, autocommit=True)
        return self.conn

    @contextlib.contextmanager
    def _transaction(self, lock: bool) -> Iterator[Tx]:
        """A transaction (under the writers' lock if ``lock``); class 53 errors made clear."""
        import psycopg

        try:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                if lock:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                yield _PgTx(cur)
        except psycopg.Error as e:
            clear = resource_error(e)
            if clear is None:
                raise
            raise clear from None

    def _tx(self) -> contextlib.AbstractContextManager[Tx]:
        return self._transaction(lock=True)

    def _read(self) -> contextlib.AbstractContextManager[Tx]:
        return self._transaction(lock=False)

    def _notify(self, tx: Tx, seq: int) -> None:
        tx.rows("SELECT pg_notify(?, ?)", self.channel, str(seq))

    def listen(self, stop: threading.Event, on_notify: Callable[[], None]) -> None:
        """Call ``on_notify`` after each batch of change notifications until ``stop`` (blocks)."""
        import psycopg

        while not stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    on_notify()  # whatever committed while we were not listening
                    while not stop.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5, stop_after=1)):
                            on_notify()
            except psycopg.Error:
                stop.wait(1.0)  # the server's poll covers the gap; reconnect

    def close(self) -> None:
        self.conn.close()
