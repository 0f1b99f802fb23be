"""SQLiteStore: the cache in one SQLite file, shared by every process on the host.

WAL mode with ``synchronous=NORMAL``: readers never block the writer, and a committed put survives
its process being killed (``kill -9``) at any point; an interrupted transaction is rolled back by
the next opener. Ids come from AUTOINCREMENT, so they are never reused and "every id above the
last one I saw" is exactly what other processes added. ``PRAGMA data_version`` (plus this object's
own write count) tells a reader in microseconds that nothing changed; clears and invalidations
bump an ``epoch`` row so every reader rebuilds its index. A random ``file`` id, stored in the file
when it is created, is part of every cursor: a file deleted and created again (an operator's
reset) restarts ids at 1, and a reader that indexed the old file (it reconnects after
``close()`` or a fork) must rebuild, not read the new file's rows under the old file's ids.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..exceptions import ConfigurationError
from .stores import Cursor, Entry, Store

__all__ = ["SQLiteStore", "check_folder"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(
  id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, namespace TEXT NOT NULL,
  query TEXT NOT NULL, vector BLOB NOT NULL, payload BLOB NOT NULL, is_bytes INTEGER NOT NULL,
  created REAL NOT NULL, accessed REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_ns ON entries(model, namespace);
CREATE INDEX IF NOT EXISTS entries_accessed ON entries(accessed);
CREATE INDEX IF NOT EXISTS entries_created ON entries(created);
CREATE INDEX IF NOT EXISTS entries_query ON entries(model, namespace, query);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('epoch', 0);
"""
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes (sqlite.org/rescode.html)
_COLUMNS = "id, model, namespace, query, vector, payload, is_bytes, created"


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (with any extended code): another connection holds the
    file, so the same statement may succeed later."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def check_folder(path: str) -> str:
    """``path`` with ``~`` expanded, once its folder is known to exist; else a
    :class:`ConfigurationError` naming the absolute path.

    Why at construction: a missing folder is no transient failure (a locked or corrupt file
    may mend; this never does), and every put and lookup would then fail with only a warning,
    the cache silently off. The usual cause is the URL form: in ``sqlite:///var/cache/x.db``
    the path after the third slash is relative to the working directory (SQLAlchemy's
    convention); an absolute path takes four slashes."""
    if path == ":memory:":
        return path
    path = os.path.expanduser(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigurationError(
            f"The semantic cache's SQLite file {path!r} would be in {folder!r}, a folder that "
            "does not exist. Create the folder first. In a 'sqlite:///' URL the path after the "
            "third slash is relative to the working directory; an absolute path takes four "
            "slashes: 'sqlite:////var/cache/rag/semantic.db'."
        )
    return path


def _row(row: tuple) -> Entry:
    key, model, namespace, query, vector, payload, is_bytes, created = row
    return Entry(
        key,
        model,
        namespace,
        query,
        np.frombuffer(vector, dtype=np.float32),
        bytes(payload),
        bool(is_bytes),
        created,
    )


class SQLiteStore(Store):
    """A SQLite file shared by every process on one host (WAL; see the module docstring).

    ``timeout``: seconds to wait for a lock held by another process before the operation fails
    (a failed lookup is a miss, a failed put is skipped; both are counted). ``synchronous``:
    "NORMAL" (survives a killed process) or "FULL" (also survives a power cut, slower puts).
    The file is opened on first use, so a locked or corrupt file never fails construction; a
    folder that does not exist does (:func:`check_folder`). ``~`` is expanded.
    A put of a stored question replaces it in its own transaction, whichever process stored it.
    """

    replaces_same_query = True

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 2.0,
                 synchronous: str = "NORMAL") -> None:  # fmt: skip
        self.path = check_folder(os.fspath(path))
        self.timeout = timeout
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._writes = 0  # writes through this object (data_version counts only the others')
        # A new connection's data_version starts over (at 1): versions of each connection start
        # above every version handed out before, or a cursor taken before close() (or in the
        # parent before a fork) would match a new connection's version and hide what other
        # processes stored meanwhile.
        self._issued = 0
        self._offset = 0
        self._file = 0  # the open file's random id (meta 'file'), read when it is opened

    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._set_up(conn)
            (file,) = conn.execute("SELECT value FROM meta WHERE key = 'file'").fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid, self._file = conn, os.getpid(), int(file)
        self._offset = self._issued + 1
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, retried while another process holds the file, up to
        ``timeout``. Needed because processes that open a new file at the same moment all try to
        switch it to WAL, and SQLite answers all but one "database is locked" at once, without
        waiting ``timeout`` as for any other lock (its deadlock rule). Every statement here is
        idempotent, so a retry after a partial run is safe."""
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.executescript(_SCHEMA)
                # The first opener's id wins (OR IGNORE); a file of an earlier version gets one.
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('file', ?)",
                    (secrets.randbits(62) + 1,),
                )
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() + pause > deadline:
                    raise
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _version(self, db: sqlite3.Connection) -> int:
        """Changes whenever anything changed the file since the last call (both terms only
        grow); never equal to a version of an earlier connection (see ``_offset``)."""
        (version,) = db.execute("PRAGMA data_version").fetchone()
        issued = self._offset + int(version) * 1_000_000_007 + self._writes
        self._issued = max(self._issued, issued)
        return issued

    def put(
        self, entry: Entry, *, max_entries: int | None, ttl: float | None
    ) -> tuple[int, list[int]]:
        with self._lock, self._transaction() as db:
            # One write transaction: the replacement, the insert and its evictions land
            # together, so two processes putting one question leave one entry (the later
            # one's), never a dead copy holding a max_entries slot.
            db.execute(
                "DELETE FROM entries WHERE model = ? AND namespace = ? AND query = ?",
                (entry.model, entry.namespace, entry.query),
            )
            cur = db.execute(
                "INSERT INTO entries(model, namespace, query, vector, payload, is_bytes, "
                "created, accessed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.model, entry.namespace, entry.query,
                 np.ascontiguousarray(entry.vector, dtype=np.float32).tobytes(),
                 entry.payload, int(entry.is_bytes), entry.created, entry.created),
            )  # fmt: skip
            key = int(cur.lastrowid or 0)
            removed: list[int] = []
            if ttl is not None:
                rows = db.execute(
                    "DELETE FROM entries WHERE created < ? RETURNING id",
                    (entry.created - ttl,),
                )
                removed += [r[0] for r in rows]
            if max_entries is not None:
                (n,) = db.execute("SELECT COUNT(*) FROM entries").fetchone()
                if n > max_entries:
                    # Never the entry just stored (as in MemoryStore): its ``accessed`` is when
                    # this put began, and a hit in another thread or process since then, or a
                    # clock stepped back, would make it the "least recently used" one, evicted
                    # by the put that reported it stored.
                    rows = db.execute(
                        "DELETE FROM entries WHERE id IN (SELECT id FROM entries WHERE id != ? "
                        "ORDER BY accessed, id LIMIT ?) RETURNING id",
                        (key, n - max_entries),
                    )
                    removed += [r[0] for r in rows]
        return key, removed

    @contextmanager
    def _transaction(self, bump: bool = False) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` write transaction: committed when the block ends (after
        bumping the epoch if ``bump``: other processes then reload), rolled back on any error."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            if bump:
                self._bump(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._writes += 1

    def get(self, ids: Iterable[int]) -> dict[int, Entry]:
        keys = list(ids)
        if not keys:
            return {}
        with self._lock:
            marks = ",".join("?" * len(keys))
            rows = self._db().execute(f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})", keys)
            return {row[0]: _row(row) for row in rows}

    def touch(self, key: int, now: float) -> None:
        with self._lock:
            self._db().execute("UPDATE entries SET accessed = ? WHERE id = ?", (now, key))

    def remove(self, ids: Iterable[int]) -> None:
        keys = [(k,) for k in ids]
        with self._lock:
            self._db().executemany("DELETE FROM entries WHERE id = ?", keys)
            self._writes += 1

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'epoch'")

    def invalidate(self, model: str | None, namespace: str, subspaces: bool = False) -> int:
        # substr, not LIKE: a namespace may hold % or _.
        where = "(namespace = ? OR (? AND substr(namespace, 1, ?) = ?))"
        args: tuple[Any, ...] = (namespace, int(subspaces), len(namespace) + 1, namespace + ":")
        with self._lock, self._transaction(bump=True) as db:
            if model is None:
                cur = db.execute(f"DELETE FROM entries WHERE {where}", args)
            else:
                cur = db.execute(
                    f"DELETE FROM entries WHERE model = ? AND {where}",
                    (model, *args),
                )
        return cur.rowcount

    def clear(self) -> None:
        with self._lock, self._transaction(bump=True) as db:
            db.execute("DELETE FROM entries")

    def count(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def changes(self, since: Cursor | None) -> tuple[bool, list[Entry], Cursor]:
        with self._lock:
            db = self._db()
            version = self._version(db)
            if since is not None and version == since[3]:
                return False, [], since
            (epoch,) = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            reset = since is None or since[:2] != (self._file, epoch)
            after = -1 if reset or since is None else since[2]
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE id > ? ORDER BY id", (after,)
            ).fetchall()
            last = rows[-1][0] if rows else (-1 if since is None or reset else since[2])
            return reset, [_row(r) for r in rows], (self._file, epoch, last, version)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
