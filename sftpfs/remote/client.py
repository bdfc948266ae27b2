"""The server as the layers above see it: one reconnecting SFTP session.

Two jobs the raw session cannot do:

* Survive a dropped connection. The next request reconnects (with backoff, so
  a dead server costs a syscall one connect timeout, not forever); requests
  that only read are retried once on the new session; open files reopen
  themselves.
* Give the right errno. OpenSSH folds every errno it has no SFTP code for
  into SSH_FX_FAILURE, so `mkdir` of an existing name, `rmdir` of a non-empty
  directory and a write to a full disk all arrive as the same status. Knowing
  the operation, one extra request tells them apart.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from . import protocol as p
from .errors import ConnectionLost, SftpError
from .sftp import SftpSession, valid_names

log = logging.getLogger(__name__)

Connector = Callable[[], Awaitable[SftpSession]]


class Remote:
    """Reconnecting SFTP access; paths are absolute server paths (bytes)."""

    def __init__(self, connect: Connector, session: SftpSession | None = None, *,
                 max_backoff: float = 30.0) -> None:
        self._connect = connect
        self._session = session
        self._lock = trio.Lock()
        self._backoff = 0.0
        self._next_try = 0.0
        self._max_backoff = max_backoff
        self.generation = 0 if session is None else 1

    # ---- connection ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.closed

    @property
    def rtt(self) -> float | None:
        """The round trip to the server as last measured (None: not yet)."""
        return self._session.rtt if self._session is not None else None

    async def session(self) -> SftpSession:
        s = self._session
        if s is not None and not s.closed:
            return s
        async with self._lock:
            s = self._session
            if s is not None and not s.closed:
                return s
            now = trio.current_time()
            if now < self._next_try:
                raise ConnectionLost(f"not connected to the server (next attempt in "
                                     f"{self._next_try - now:.0f} s)")
            try:
                log.info("connecting to the server")
                s = await self._connect()
            except Exception as e:  # noqa: BLE001 - any failure means: not connected now
                self._backoff = min(max(1.0, self._backoff * 2), self._max_backoff)
                self._next_try = trio.current_time() + self._backoff
                log.warning("reconnect failed (%s); retrying in %.0f s", e, self._backoff)
                raise ConnectionLost(f"not connected to the server: {e}") from e
            self._backoff = 0.0
            self._session = s
            self.generation += 1
            if self.generation > 1:
                log.warning("reconnected to the server")
            return s

    def close(self) -> None:
        if self._session is not None:
            self._session.close("unmounting")

    @property
    def requests(self) -> int:
        """Requests sent on the current connection (stats)."""
        return self._session.sent if self._session is not None else 0

    @property
    def io_sizes(self) -> tuple[int, int]:
        s = self._session
        return (s.max_read, s.max_write) if s else (32768, 32768)

    def has(self, ext: bytes) -> bool:
        return self._session is not None and self._session.has(ext)

    async def _retrying(self, op: str, *args):
        """Run a read-only request, once more on a fresh session if the link dropped."""
        for attempt in (1, 2):
            s = await self.session()
            try:
                return await getattr(s, op)(*args)
            except ConnectionLost:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # ---- read-only requests --------------------------------------------------------

    async def realpath(self, path: bytes) -> bytes:
        return await self._retrying("realpath", path)

    async def realpath_and_stat(self, path: bytes) -> tuple[bytes, p.Attrs]:
        return await self._retrying("realpath_and_stat", path)

    async def lstat(self, path: bytes) -> p.Attrs:
        return await self._retrying("lstat", path)

    async def stat(self, path: bytes) -> p.Attrs:
        return await self._retrying("stat", path)

    async def readlink(self, path: bytes) -> bytes:
        return await self._retrying("readlink", path)

    async def listdir(self, path: bytes) -> list[tuple[bytes, p.Attrs]]:
        return list(valid_names(await self._retrying("listdir", path)))

    async def statvfs(self, path: bytes) -> p.Statvfs | None:
        if not self.has(b"statvfs@openssh.com"):
            await self.session()
            if not self.has(b"statvfs@openssh.com"):
                return None
        return await self._retrying("statvfs", path)

    # ---- changes ---------------------------------------------------------------------

    async def mkdir(self, path: bytes, mode: int) -> p.Attrs:
        s = await self.session()
        try:
            return await s.then_lstat(p.FXP_MKDIR, p.string(path),
                                      p.Attrs(mode=mode & 0o7777).encode(), path=path)
        except SftpError as e:
            raise await self._refine(e, path, exists=errno.EEXIST) from None

    async def rmdir(self, path: bytes) -> None:
        try:
            await (await self.session()).rmdir(path)
        except SftpError as e:
            raise await self._refine_rmdir(e, path) from None

    async def remove(self, path: bytes) -> None:
        try:
            await (await self.session()).remove(path)
        except SftpError as e:
            if e.status == p.FX_FAILURE and await self._is_dir(path):
                raise e.with_errno(errno.EISDIR) from None
            raise

    async def rename(self, old: bytes, new: bytes, *, replace: bool = True) -> None:
        """rename(2): replaces `new` atomically where the server has posix-rename."""
        s = await self.session()
        try:
            if replace and s.has(b"posix-rename@openssh.com"):
                await s.posix_rename(old, new)
                return
            if replace:
                await self._rename_replacing(s, old, new)
                return
            await s.rename(old, new)  # plain SFTP rename never replaces
        except SftpError as e:
            raise await self._refine_rename(e, old, new, replace) from None

    async def _rename_replacing(self, s: SftpSession, old: bytes, new: bytes) -> None:
        # No posix-rename: remove the target first. Not atomic; documented.
        try:
            await s.rename(old, new)
            return
        except SftpError as e:
            if e.status != p.FX_FAILURE:
                raise
        target = await self._try_lstat(new)
        if target is None:
            raise SftpError(p.FX_FAILURE, "rename failed", old)
        if target.is_dir:
            await s.rmdir(new)
        else:
            await s.remove(new)
        await s.rename(old, new)

    async def symlink(self, target: bytes, path: bytes) -> p.Attrs:
        s = await self.session()
        try:
            # Target first: see SftpSession.symlink.
            return await s.then_lstat(p.FXP_SYMLINK, p.string(target), p.string(path), path=path)
        except SftpError as e:
            raise await self._refine(e, path, exists=errno.EEXIST) from None

    async def hardlink(self, old: bytes, new: bytes) -> p.Attrs:
        s = await self.session()
        if not s.has(b"hardlink@openssh.com"):
            raise OSError(errno.EPERM, "the server does not support hard links")
        try:
            return await s.then_lstat(p.FXP_EXTENDED, p.string(b"hardlink@openssh.com"),
                                      p.string(old), p.string(new), path=new)
        except SftpError as e:
            raise await self._refine(e, new, exists=errno.EEXIST) from None

    async def setstat(self, path: bytes, attrs: p.Attrs, *, follow: bool = True,
                      stat: bool = True) -> p.Attrs | None:
        """Change attributes; with `stat`, return them afterwards (same round trip)."""
        s = await self.session()
        try:
            if not stat:
                if not follow and s.has(b"lsetstat@openssh.com"):
                    await s.lsetstat(path, attrs)
                else:
                    await s.setstat(path, attrs)
                return None
            if not follow and s.has(b"lsetstat@openssh.com"):
                return await s.then_lstat(p.FXP_EXTENDED, p.string(b"lsetstat@openssh.com"),
                                          p.string(path), attrs.encode(), path=path)
            return await s.then_lstat(p.FXP_SETSTAT, p.string(path), attrs.encode(), path=path)
        except SftpError as e:
            raise await self._refine(e, path) from None

    def open(self, path: bytes, pflags: int) -> RemoteFile:
        return RemoteFile(self, path, pflags)

    # ---- errno refinement ---------------------------------------------------------------

    async def _try_lstat(self, path: bytes) -> p.Attrs | None:
        try:
            return await (await self.session()).lstat(path)
        except OSError:
            return None

    async def _is_dir(self, path: bytes) -> bool:
        a = await self._try_lstat(path)
        return a is not None and a.is_dir

    async def _disk_full(self, path: bytes) -> bool:
        s = self._session
        if s is None or s.closed or not s.has(b"statvfs@openssh.com"):
            return False
        try:
            v = await s.statvfs(path)
        except OSError:
            return False
        # Reserved blocks and rounding: "full" is less than a few blocks free.
        return v.bavail * (v.frsize or v.bsize) < 4 * max(v.bsize, 4096)

    async def _refine(self, e: SftpError, path: bytes, *, exists: int | None = None) -> OSError:
        if e.status == p.FX_NO_SUCH_FILE:
            return e
        if e.status != p.FX_FAILURE:
            return e
        if exists is not None and await self._try_lstat(path) is not None:
            return e.with_errno(exists)
        if await self._disk_full(path.rpartition(b"/")[0] or b"/"):
            return e.with_errno(errno.ENOSPC)
        return e

    async def _refine_rmdir(self, e: SftpError, path: bytes) -> OSError:
        if e.status != p.FX_FAILURE:
            return e
        a = await self._try_lstat(path)
        if a is None:
            return e.with_errno(errno.ENOENT)
        if not a.is_dir:
            return e.with_errno(errno.ENOTDIR)
        return e.with_errno(errno.ENOTEMPTY)

    async def _refine_rename(self, e: SftpError, old: bytes, new: bytes, replace: bool) -> OSError:
        if e.status != p.FX_FAILURE:
            return e
        src, dst = await self._try_lstat(old), await self._try_lstat(new)
        if src is None:
            return e.with_errno(errno.ENOENT)
        if dst is not None:
            if not replace:
                return e.with_errno(errno.EEXIST)
            if dst.is_dir and not src.is_dir:
                return e.with_errno(errno.EISDIR)
            if src.is_dir and not dst.is_dir:
                return e.with_errno(errno.ENOTDIR)
            if dst.is_dir:
                return e.with_errno(errno.ENOTEMPTY)
        return e

    async def refine_io(self, e: SftpError, path: bytes) -> OSError:
        """A failed write or close: on a full disk that is ENOSPC, not EIO."""
        if e.status == p.FX_FAILURE and await self._disk_full(path.rpartition(b"/")[0] or b"/"):
            return e.with_errno(errno.ENOSPC)
        return e


class RemoteFile:
    """An open server file that reopens itself after a reconnect.

    `path` is kept current by the owner across renames, so a reopen finds the
    file where it is now.
    """

    _REOPEN_MASK = ~(p.FXF_CREAT | p.FXF_TRUNC | p.FXF_EXCL)

    def __init__(self, remote: Remote, path: bytes, pflags: int) -> None:
        self.remote = remote
        self.path = path
        self.pflags = pflags
        self._handle: bytes | None = None
        self._session: SftpSession | None = None
        self._lock = trio.Lock()

    @property
    def is_open(self) -> bool:
        """Open on the server, on a session that is still up."""
        return self._handle is not None and self._session is not None and not self._session.closed

    async def _open(self) -> tuple[SftpSession, bytes]:
        s = await self.remote.session()
        if self._session is s and self._handle is not None:
            return s, self._handle
        async with self._lock:
            if self._session is s and self._handle is not None:
                return s, self._handle
            flags = self.pflags if self._session is None else self.pflags & self._REOPEN_MASK
            try:
                handle = await s.open(self.path, flags, p.Attrs())
            except SftpError as e:
                if flags & p.FXF_EXCL:
                    raise await self.remote._refine(e, self.path, exists=errno.EEXIST) from None
                raise await self.remote._refine(e, self.path) from None
            self._session, self._handle = s, handle
            return s, handle

    async def open(self, mode: int = 0o644) -> p.Attrs:
        """Open (or create, per pflags) and stat the file in one round trip.

        The stat is what close-to-open consistency needs: every open sees the
        server's current version of the file.
        """
        s = await self.remote.session()
        async with self._lock:
            try:
                handle, attrs = await s.open_and_lstat(self.path, self.pflags,
                                                       p.Attrs(mode=mode & 0o7777))
            except SftpError as e:
                raise await self.remote._refine(e, self.path, exists=errno.EEXIST) from None
            self._session, self._handle = s, handle
            return attrs

    async def read(self, offset: int, length: int, *, view: bool = False) -> bytes | memoryview:
        for attempt in (1, 2):
            s, h = await self._open()
            try:
                return await s.read(h, offset, length, view=view)
            except ConnectionLost:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def submit_write(self, offset: int, data: bytes | memoryview) -> Callable[[], Awaitable[None]]:
        """Send a WRITE now; the returned function awaits (and refines) its status."""
        s, h = await self._open()
        status = await s.submit_write(h, offset, data)

        async def done() -> None:
            try:
                await status()
            except SftpError as e:
                raise await self.remote.refine_io(e, self.path) from None

        return done

    async def fstat(self) -> p.Attrs:
        s, h = await self._open()
        return await s.fstat(h)

    async def fsetstat(self, attrs: p.Attrs) -> None:
        s, h = await self._open()
        try:
            await s.fsetstat(h, attrs)
        except SftpError as e:
            raise await self.remote.refine_io(e, self.path) from None

    async def fsync(self) -> None:
        s, h = await self._open()
        if s.has(b"fsync@openssh.com"):
            await s.fsync(h)

    async def submit_finish(self, attrs: p.Attrs) -> Callable[[], Awaitable[p.Attrs]]:
        """Set attributes, read them back and close: sent now, awaited later."""
        s, h = await self._open()
        self._handle = None
        result = await s.submit_finish(h, attrs)

        async def done() -> p.Attrs:
            try:
                return await result()
            except SftpError as e:
                raise await self.remote.refine_io(e, self.path) from None

        return done

    async def close(self, *, stat: bool = False) -> p.Attrs | None:
        """Close the handle; with `stat`, return the file's final attributes too."""
        s, h = self._session, self._handle
        self._handle = None
        if s is None or h is None or s.closed:
            return None
        try:
            if stat:
                return await s.fstat_and_close(h)
            await s.close_handle(h)
        except SftpError as e:
            raise await self.remote.refine_io(e, self.path) from None
        return None
