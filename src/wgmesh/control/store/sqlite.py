"""The embedded default dialect: SQLite, one file in WAL mode, one control process."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wgmesh.control.errors import StorageFull
from wgmesh.control.store.sql import Store, Tx

__all__ = ["SQLiteStore"]


class _SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, *params: Any) -> int:
        return self.conn.execute(sql, params).rowcount


class SQLiteStore(Store):
    """The embedded default: one file in WAL mode."""

    def __init__(self, path: str | os.PathLike[str], **kw: Any) -> None:
        super().__init__(**kw)
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                    timeout=10)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self.migrate()

    def _ddl_types(self) -> dict[str, str]:
        return {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"}

    def _notify(self, tx: Tx, seq: int) -> None:
        """One process per database file: the server polls, nobody to wake."""

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; a full disk is :class:`StorageFull`.

        SQLite may or may not have rolled back by itself after an I/O error (a failed
        ``COMMIT`` leaves the transaction open), so roll back whatever is still open:
        the next transaction must not start inside this one."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteTx(self.conn)
            except BaseException:
                self._rollback()
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._rollback()
            if e.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
                raise StorageFull() from None
            raise

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()
