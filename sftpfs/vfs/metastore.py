"""Directory listings on disk, so a remount starts warm.

One SQLite row per directory: its entries (name + SFTP attributes, in the
SFTP wire encoding) and when they were listed. SQLite gives what a cache
shared by two mounts of the same remote needs: atomic writes and locking.
It is a cache: a corrupt or vanished file is replaced by an empty one,
never an error, and nothing here is needed for correctness (a loaded
listing is served only as stale and revalidated at once, see vfs.Vfs).

Blocking; callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from ..remote import protocol as p

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def encode_entries(entries: Iterable[tuple[bytes, p.Attrs]]) -> bytes:
    return b"".join(p.string(name) + a.encode() for name, a in entries)


def decode_entries(blob: bytes) -> list[tuple[bytes, p.Attrs]]:
    r = p.Reader(blob)
    out = []
    while not r.at_end():
        name = r.string()
        out.append((name, r.attrs()))
    return out


class MetaStore:
    """Persistent listings of one remote tree, in `directory/meta.sqlite`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "meta.sqlite"
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._db: sqlite3.Connection | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            log.warning("metadata cache %s is unusable (%s): starting a new one", self.path, e)
            self._reset()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False,
                             isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last second is fine
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            db.close()
            raise sqlite3.DatabaseError(f"schema version {version}")
        db.execute("CREATE TABLE IF NOT EXISTS listing ("
                   " path BLOB PRIMARY KEY, listed REAL NOT NULL, entries BLOB NOT NULL)")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("SELECT count(*) FROM listing").fetchone()  # fails early if corrupt
        self.path.chmod(0o600)
        return db

    def _reset(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as e:
            log.warning("cannot create metadata cache %s (%s): running without it", self.path, e)
            self._db = None

    def load(self, path: bytes) -> tuple[list[tuple[bytes, p.Attrs]], float] | None:
        """The stored listing of `path` and when it was made, or None."""
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT entries, listed FROM listing WHERE path=?",
                                       (path,)).fetchone()
                if row is None:
                    return None
                return decode_entries(row[0]), row[1]
            except (sqlite3.DatabaseError, ValueError, IndexError) as e:
                log.warning("metadata cache %s is corrupt (%s): starting a new one", self.path, e)
                self._reset()
                return None

    def save(self, listings: list[tuple[bytes, float, bytes | None]]) -> None:
        """Write (path, listed, encoded entries) rows; entries None deletes the row."""
        with self._lock:
            if self._db is None or not listings:
                return
            try:
                self._db.execute("BEGIN")
                for path, listed, blob in listings:
                    if blob is None:
                        self._db.execute("DELETE FROM listing WHERE path=?", (path,))
                    else:
                        self._db.execute("INSERT OR REPLACE INTO listing VALUES (?, ?, ?)",
                                         (path, listed, blob))
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                log.warning("metadata cache %s: write failed (%s): starting a new one", self.path, e)
                self._reset()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
