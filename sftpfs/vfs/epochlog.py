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
flock while the mount lives, so mounts sharing a cache never take each
other's logs; a log nobody holds was left by a crash, and the next mount
folds it into the Index before it reads any epoch (`recover`).
Records are `<epoch> <path>\\0` (a path never holds a NUL); an incomplete
last record (a crash mid-write) is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable
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
    few small syscalls into the page cache."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path, self.fd = self._new_file(b"")

    def _new_file(self, content: bytes) -> tuple[Path, int]:
        """Written and locked under a name `recover` ignores, then renamed into view."""
        name = f"epochs-{os.getpid()}-{time.time_ns()}.log"
        tmp, path = self.directory / f".{name}", self.directory / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if content:
                os.write(fd, content)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return path, fd

    def append(self, path: bytes, epoch: int) -> None:
        os.write(self.fd, b"%d %b\0" % (epoch, path))

    def restart(self, pending: Iterable[tuple[bytes, int]]) -> None:
        """The log's records are in the Index now, except `pending` (bumped since):
        continue in a new log that holds just those, then drop the old one."""
        path, fd = self._new_file(_encode(pending))
        old_path, old_fd = self.path, self.fd
        self.path, self.fd = path, fd
        old_path.unlink(missing_ok=True)
        os.close(old_fd)

    def close(self, *, folded: bool) -> None:
        """`folded`: every record is in the Index, the log can go. Otherwise it
        stays (unlocked) for the next mount to recover."""
        if folded:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


def recover(directory: Path) -> tuple[list[tuple[bytes, int]], list[tuple[Path, int]]]:
    """Records of the logs no live mount holds, oldest log first, and those logs,
    still locked: the caller folds the records, then calls `release(logs, done=True)`."""
    records: list[tuple[bytes, int]] = []
    held: list[tuple[Path, int]] = []

    def age(p: Path) -> int:
        with contextlib.suppress(ValueError):
            return int(p.stem.rsplit("-", 1)[-1])
        return 0

    for path in sorted(directory.glob(PATTERN), key=age):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live mount's log
            continue
        held.append((path, fd))
        with open(fd, "rb", closefd=False) as f:
            records.extend(parse(f.read()))
    return records, held


def release(logs: list[tuple[Path, int]], *, done: bool) -> None:
    for path, fd in logs:
        if done:
            path.unlink(missing_ok=True)
        os.close(fd)
