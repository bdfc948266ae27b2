"""Open files: reads and pipelined writes through one server handle.

A write is on the wire before the syscall returns, but its status is
collected in the background, up to `MAX_WRITES_IN_FLIGHT` per file; the
first failure is returned by the next flush (close), fsync or write, as
NFS and sshfs do. That keeps a copy into the mount at link speed instead of
one round trip per 128 KiB.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from ..remote import protocol as p
from ..remote.client import RemoteFile

if TYPE_CHECKING:
    from .readahead import Reader
    from .vfs import Vfs

log = logging.getLogger(__name__)

MAX_WRITES_IN_FLIGHT = 32


class OpenFile:
    """One open(2) of a file. `path` follows renames (kept current by Vfs)."""

    def __init__(self, vfs: Vfs, path: bytes, remote: RemoteFile, *, writable: bool) -> None:
        self.vfs = vfs
        self.ino = 0  # the kernel's inode number, set by the fs layer
        self.path: bytes | None = path  # None once unlinked or replaced
        self.remote = remote
        self.writable = writable
        self.wrote = False
        self._inflight = trio.Semaphore(MAX_WRITES_IN_FLIGHT)
        self._idle = trio.Event()
        self._idle.set()
        self._pending = 0
        self._error: OSError | None = None
        self.reader: Reader | None = None  # block cache and read-ahead (readahead.py)
        self.keep_cache = False  # the kernel may keep its page cache (version unchanged)

    async def fstat(self) -> p.Attrs:
        """The file's attributes through this handle (it may be unlinked)."""
        return await self.remote.fstat()

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        if self.reader is not None:
            self._raise_error()
            return await self.reader.read(offset, size)
        return await self.read_direct(offset, size)

    async def read_direct(self, offset: int, size: int) -> bytes:
        """Read from the server, bypassing the block cache."""
        self._raise_error()
        max_read = self.vfs.remote.io_sizes[0]
        if size <= max_read:
            return await self.remote.read(offset, size)
        parts: dict[int, bytes] = {}

        async def one(off: int, n: int) -> None:
            parts[off] = await self.remote.read(off, n)

        async with trio.open_nursery() as nursery:
            for off in range(offset, offset + size, max_read):
                nursery.start_soon(one, off, min(max_read, offset + size - off))
        out = bytearray()
        for off in sorted(parts):
            chunk = parts[off]
            out += chunk
            if len(chunk) < min(max_read, offset + size - off):
                break  # short read: end of file
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> int:
        self._raise_error()
        max_write = self.vfs.remote.io_sizes[1]
        view = memoryview(data)
        for start in range(0, len(data), max_write):
            await self._inflight.acquire()
            try:
                status = await self.remote.submit_write(offset + start, view[start:start + max_write])
            except BaseException:
                self._inflight.release()
                raise
            self._pending += 1
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self.vfs.nursery.start_soon(self._collect, status)
        self.wrote = True
        if self.path is not None:
            self.vfs.wrote(self.path, offset + len(data))
        return len(data)

    async def _collect(self, status) -> None:
        try:
            await status()
        except OSError as e:
            if self._error is None:
                log.warning("write to %r failed: %s", self.path, e)
                self._error = e
        finally:
            self._pending -= 1
            self._inflight.release()
            if self._pending == 0:
                self._idle.set()

    def _raise_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    async def flush(self) -> None:
        """Wait for every write sent so far; report the first that failed."""
        await self._idle.wait()
        self._raise_error()

    async def fsync(self) -> None:
        await self.flush()
        await self.remote.fsync()

    async def truncate(self, size: int) -> p.Attrs:
        """ftruncate(2): through the handle, so it works after unlink too."""
        await self.flush()
        await self.remote.fsetstat(p.Attrs(size=size))
        return await self.remote.fstat()

    async def release(self) -> None:
        """close(2) of the last descriptor: drain writes, close, refresh the cache."""
        if self.reader is not None:
            self.reader.close()
        error: OSError | None = None
        try:
            await self.flush()
        except OSError as e:
            error = e
        since = self.vfs.meta.mark()
        try:
            attrs = await self.remote.close(stat=self.wrote)
        except OSError as e:
            error = error or e
            attrs = None
        self.vfs.closed(self, attrs, since)
        if error is not None:
            raise error


def open_flags_to_pflags(flags: int) -> int:
    """open(2) flags as SFTP pflags."""
    acc = flags & os.O_ACCMODE
    pf = {os.O_RDONLY: p.FXF_READ, os.O_WRONLY: p.FXF_WRITE}.get(acc, p.FXF_READ | p.FXF_WRITE)
    if flags & os.O_APPEND:
        pf |= p.FXF_APPEND
    if flags & os.O_CREAT:
        pf |= p.FXF_CREAT
    if flags & os.O_TRUNC:
        pf |= p.FXF_TRUNC
    if flags & os.O_EXCL:
        pf |= p.FXF_EXCL
    return pf
