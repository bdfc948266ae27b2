"""Epochs written ahead: one write(2) per changed file instead of a database commit.

Every file this mount creates, writes or renames gets a new epoch (blocks.py:
a block is only served for the version it was read from), and the epochs must
outlive the mount. Written straight into the diskcache Index, in a worker
thread, they were a sixth of the time of an rsync of 1,000 small files into
the mount at zero latency (two commits per file). So each epoch is appended
to this mount's own log, a write into the page cache (as durable against a
crash of this process as diskcache's own commits), and the block cache
moves them into the Index in large batches, then starts a fresh log.

Each mount's log is `epochs-<pid>-<ns>.log` beside the Index and held under
flock while the mount lives. A starting mount reads every log before it reads
any epoch (`recover`): those nobody holds were left by crashes and are folded
into the Index and deleted; those of running mounts are only read, since
mounts of one remote share the cache. Folds keep the larger epoch of a path
(epochs are nanosecond times, never handed out twice), so an old log
recovered late cannot undo a newer epoch.
Records are `<epoch> <path>\\0` (a path never holds a NUL); an incomplete
last record (a crash mid-write) is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

PATTERN = "epochs-*.log"


def _encode(items: Iterable[tuple[bytes, int]]) -> bytes:
    return b"".join(b"%d %b\0" % (e, path) for path, e in items)


def parse(data: bytes) -> list[tuple[bytes, int]]:
    out = []
    for rec in data.split(b"\0")[:-1]:  # the last piece is "" or a torn record
        e, _, path = rec.partition(b" ")
        with contextlib.suppress(ValueError):
            out.append((path, int(e)))
    return out


class EpochLog:
    """This mount's log. Used from the trio thread only; every call is one or a
    few small syscalls into the page cache. Raises OSError when the disk does
    not take a record whole."""

    def __init__(self, directory: Path, pending: Iterable[tuple[bytes, int]] = ()) -> None:
        self.directory = directory
        self.path, self.fd = self._new_file(_encode(pending))

    def _new_file(self, content: bytes) -> tuple[Path, int]:
        """Written and locked under a temporary name, then renamed into view."""
        name = f"epochs-{os.getpid()}-{time.time_ns()}.log"
        tmp, path = self.directory / f".{name}", self.directory / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write(fd, content)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path, fd

    def append(self, path: bytes, epoch: int) -> None:
        _write(self.fd, b"%d %b\0" % (epoch, path))

    def restart(self, pending: Iterable[tuple[bytes, int]]) -> None:
        """The log's records are in the Index now, except `pending` (bumped since):
        continue in a new log that holds just those, then drop the old one."""
        path, fd = self._new_file(_encode(pending))
        old_path, old_fd = self.path, self.fd
        self.path, self.fd = path, fd
        try:
            old_path.unlink(missing_ok=True)
        finally:
            os.close(old_fd)

    def close(self, *, folded: bool) -> None:
        """`folded`: every record is in the Index, the log can go. Otherwise it
        stays (unlocked) for the next mount to recover."""
        try:
            if folded:
                with contextlib.suppress(OSError):
                    self.path.unlink()
        finally:
            os.close(self.fd)
            self.fd = -1


def _write(fd: int, data: bytes) -> None:
    if data and os.write(fd, data) != len(data):  # a regular file: short only when full
        raise OSError(errno.ENOSPC, "short write to the epoch log")


def recover(directory: Path) -> tuple[list[tuple[bytes, int]], list[tuple[Path, int]]]:
    """The records of every log, oldest first, and the logs no live mount holds
    (left by crashes), still locked: the caller folds the records into the Index,
    then calls `release(dead, done=True)`, which deletes those.

    Live mounts' logs are read too, not taken: a mount starting beside a running
    one must know the epochs that one has made but not folded yet.
    """
    records: list[tuple[bytes, int]] = []
    dead: list[tuple[Path, int]] = []

    def age(p: Path) -> int:
        with contextlib.suppress(ValueError):
            return int(p.name.rsplit("-", 1)[-1].split(".")[0])
        return 0

    try:
        for path in sorted(chain(directory.glob(PATTERN), directory.glob("." + PATTERN)), key=age):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                dead.append((path, fd))
                live = False
            except OSError:
                live = True
            try:
                with open(fd, "rb", closefd=False) as f:
                    records.extend(parse(f.read()))
            finally:
                if live:
                    os.close(fd)
    except BaseException:
        release(dead, done=False)
        raise
    return records, dead


def release(logs: list[tuple[Path, int]], *, done: bool) -> None:
    for path, fd in logs:
        try:
            if done:
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            os.close(fd)
